// The agent's status page: counts only (see README "Status pages"), refreshed every 10 s.
"use strict";
(function () {
  const P = window.shoalPlot;
  const $ = (id) => document.getElementById(id);
  const SOURCES = ["cache", "peers", "registry"];

  function render(doc) {
    const tiles = $("tiles");
    P.clear(tiles);
    P.tile(tiles, "tile-cache", "cache", doc.cache.bytes,
           `${P.bytes(doc.cache.bytes)} of ${P.bytes(doc.cache.budget_bytes)}`);
    P.tile(tiles, "tile-blobs", "cached blobs", doc.cache.blobs);
    P.tile(tiles, "tile-hits", "cache hits", doc.requests.hits);
    P.tile(tiles, "tile-misses", "cache misses", doc.requests.misses);
    P.tile(tiles, "tile-torrents", "swarms", doc.swarm.torrents);
    P.tile(tiles, "tile-peers", "peers connected", doc.swarm.peers_connected);
    P.tile(tiles, "tile-inflight", "downloads in flight", doc.downloads_in_flight);
    P.lineChart($("served-chart"), doc.history, SOURCES.map((s) => "served_" + s),
                {rate: true, unit: "bytes", labels: {served_cache: "cache", served_peers: "peers",
                                                    served_registry: "registry"}});
    const totals = $("served-totals");
    P.clear(totals);
    totals.appendChild(P.el("span", {}, "since the agent started: "));
    SOURCES.forEach((s, i) => {
      totals.appendChild(P.el("span", {class: `total s${i}`, "data-source": s, "data-value": doc.served[s]},
                              `${s} ${P.bytes(doc.served[s])}`));
    });
    P.lineChart($("hits-chart"), doc.history, ["hits", "misses"], {rate: true});
    P.bars($("fallbacks"), doc.fallbacks);
    document.body.setAttribute("data-generated", doc.now);
    $("updated").textContent = "updated " + new Date(doc.now * 1000).toLocaleTimeString();
  }

  async function refresh() {
    try {
      render(await P.getJSON(document.body.dataset.overview));
    } catch (err) {
      $("updated").textContent = "could not update: " + err.message;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    refresh();
    window.setInterval(refresh, 10000);
  });
})();
