// The origin's status page: the overview every 10 s, and the audit search.
"use strict";
(function () {
  const P = window.shoalPlot;
  const $ = (id) => document.getElementById(id);
  const SOURCES = ["cache", "peers", "registry"];

  function render(doc) {
    const tiles = $("tiles");
    P.clear(tiles);
    P.tile(tiles, "tile-torrents", "swarms seeded", doc.swarm.torrents);
    P.tile(tiles, "tile-peers", "peers connected", doc.swarm.peers_connected);
    P.tile(tiles, "tile-saved", "registry bytes saved", doc.registry.saved_bytes, P.bytes(doc.registry.saved_bytes));
    P.tile(tiles, "tile-fetched", "registry bytes fetched to seed", doc.registry.fetched_bytes,
           P.bytes(doc.registry.fetched_bytes));
    P.tile(tiles, "tile-cache", "seeder cache", doc.cache.bytes,
           `${P.bytes(doc.cache.bytes)} of ${P.bytes(doc.cache.budget_bytes)} (${doc.cache.blobs} blobs)`);
    P.tile(tiles, "tile-sent", "bytes sent to peers", doc.swarm.sent_payload_bytes,
           P.bytes(doc.swarm.sent_payload_bytes));

    P.lineChart($("served-chart"), doc.history, SOURCES.map((s) => "served_" + s),
                {rate: true, unit: "bytes", labels: {served_cache: "cache", served_peers: "peers",
                                                    served_registry: "registry"}});
    const totals = $("served-totals");
    P.clear(totals);
    totals.appendChild(P.el("span", {}, "since the origin started: "));
    SOURCES.forEach((s, i) => {
      totals.appendChild(P.el("span", {class: `total s${i}`, "data-source": s, "data-value": doc.served[s]},
                              `${s} ${P.bytes(doc.served[s])}`));
    });
    P.lineChart($("peers-chart"), doc.history, ["peers_connected"], {});
    P.lineChart($("fetched-chart"), doc.history, ["registry_fetched"], {rate: true, unit: "bytes"});
    P.bars($("admissions"), doc.admissions);
    P.bars($("seeds"), doc.seeds);
    P.bars($("fallbacks"), doc.registry_by_node, {unit: "bytes", empty: "no node fetched from the registry"});
    P.bars($("fallback-reasons"), doc.fallbacks, {empty: "no swarm download given up"});

    const jobs = $("jobs").tBodies[0];
    P.clear(jobs);
    if (doc.jobs === null || !doc.jobs.length) {
      const row = jobs.insertRow();
      row.appendChild(P.el("td", {colspan: 6, class: "empty"}, doc.jobs === null
          ? "pre-seed jobs are shown to operators with the seed role (their own) or admin"
          : "no pre-seed job since the origin started"));
    }
    for (const job of doc.jobs || []) {
      const row = jobs.insertRow();
      row.setAttribute("data-job", job.id);
      row.appendChild(P.el("td", {}, job.id));
      row.appendChild(P.el("td", {}, job.owner || ""));
      row.appendChild(P.el("td", {}, job.images.join(", ")));
      row.appendChild(P.el("td", {class: "state-" + job.state}, job.state));
      const cell = P.el("td");
      cell.appendChild(P.el("progress", {max: Math.max(job.bytes_total, 1), value: job.bytes_done}));
      cell.appendChild(P.el("span", {}, ` ${P.bytes(job.bytes_done)} of ${P.bytes(job.bytes_total)}`));
      row.appendChild(cell);
      row.appendChild(P.el("td", {}, `${job.blobs_done}/${job.blobs_total}` +
                                     (job.blobs_failed ? ` (${job.blobs_failed} failed)` : "")));
    }
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

  function auditQuery(format) {
    const form = new FormData($("audit-form"));
    const q = new URLSearchParams();
    for (const key of ["image", "principal", "node"]) {
      const v = String(form.get(key) || "").trim();
      if (v) q.set(key, v);
    }
    for (const key of ["since", "until"]) {
      const v = String(form.get(key) || "");
      if (v) q.set(key, new Date(v).toISOString());  // the browser's local time, sent with its zone
    }
    q.set("limit", "500");
    q.set("format", format);
    return document.body.dataset.audit + "?" + q.toString();
  }

  async function search(event) {
    event.preventDefault();
    $("audit-csv").setAttribute("href", auditQuery("csv"));
    const body = $("audit").tBodies[0];
    P.clear(body);
    try {
      const doc = await P.getJSON(auditQuery("json"));
      $("audit-count").textContent = `${doc.count} event(s)` + (doc.count >= 500 ? " (the first 500)" : "");
      for (const e of doc.events) {
        const row = body.insertRow();
        row.setAttribute("data-event", e.event_id);
        const image = e.ns && e.repository ? `${e.ns}/${e.repository}` : (e.action ? `(${e.action})` : "");
        for (const v of [e.ts, e.node, e.principal, image, e.reference || e.digest, e.status,
                         e.bytes === null || e.bytes === undefined ? "" : P.bytes(e.bytes), e.source, e.outcome]) {
          row.appendChild(P.el("td", {}, v === null || v === undefined ? "" : v));
        }
      }
      $("audit").setAttribute("data-count", doc.count);
    } catch (err) {
      $("audit-count").textContent = "search failed: " + err.message;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("audit-csv").setAttribute("href", auditQuery("csv"));
    $("audit-form").addEventListener("submit", search);
    $("audit-form").addEventListener("input", () => $("audit-csv").setAttribute("href", auditQuery("csv")));
    refresh();
    window.setInterval(refresh, 10000);
  });
})();
