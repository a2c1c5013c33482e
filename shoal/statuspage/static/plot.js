// The status pages' drawing, without any library: DOM nodes and inline SVG built from the
// component's JSON. Text is only ever set with textContent (never innerHTML): image names and
// principals come from clients and must show as text.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Number(n) || 0;
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(1)) + " " + units[i];
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // A line chart of some series of a ring of samples (history: {t: [...], series: {name: [...]}}).
  // rate: the series are counters, drawn as their rate per second between samples.
  function lineChart(box, history, names, opts) {
    clear(box);
    const o = opts || {};
    const W = 640, H = 170, L = 70, B = 22, T = 8;
    const t = history.t || [];
    const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", class: "linechart",
                              "data-samples": t.length});
    box.appendChild(chart);
    const lines = [];
    for (const name of names) {
      const raw = (history.series || {})[name] || [];
      let pts = [];
      for (let i = 0; i < raw.length; i++) {
        if (o.rate) {
          if (i === 0) continue;
          const dt = Math.max(t[i] - t[i - 1], 0.001);
          pts.push([t[i], Math.max(raw[i] - raw[i - 1], 0) / dt]);
        } else {
          pts.push([t[i], raw[i]]);
        }
      }
      lines.push({name, raw, pts});
    }
    let ymax = 0;
    for (const line of lines) for (const p of line.pts) ymax = Math.max(ymax, p[1]);
    ymax = ymax > 0 ? ymax * 1.1 : 1;
    const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1;
    const span = Math.max(t1 - t0, 1);
    const x = (when) => L + (W - L - 4) * (when - t0) / span;
    const y = (v) => T + (H - T - B) * (1 - v / ymax);
    chart.appendChild(svg("line", {x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis"}));
    chart.appendChild(svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
    const fmt = o.unit === "bytes" ? (v) => bytes(v) + (o.rate ? "/s" : "") : (v) => String(Math.round(v));
    chart.appendChild(svg("text", {x: L - 6, y: T + 10, class: "tick", "text-anchor": "end",
                                   "data-max": ymax}, fmt(ymax)));
    chart.appendChild(svg("text", {x: L - 6, y: H - B, class: "tick", "text-anchor": "end"}, fmt(0)));
    const minutes = Math.round(span / 60);
    chart.appendChild(svg("text", {x: W - 4, y: H - 6, class: "tick", "text-anchor": "end"}, "now"));
    chart.appendChild(svg("text", {x: L, y: H - 6, class: "tick"},
                          minutes >= 1 ? `${minutes} min ago` : `${Math.round(span)} s ago`));
    if (t.length < (o.rate ? 2 : 1)) {
      chart.appendChild(svg("text", {x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle"},
                            "collecting samples (one every " + (history.interval_seconds || 5) + " s)"));
    }
    lines.forEach((line, i) => {
      const d = line.pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      const last = line.raw.length ? line.raw[line.raw.length - 1] : 0;
      const attrs = {points: d, class: `series s${i}`, "data-series": line.name, "data-points": line.pts.length,
                     "data-last": last, "data-last-t": t.length ? t[t.length - 1] : ""};
      const poly = svg("polyline", attrs);
      poly.appendChild(svg("title", {}, `${line.name}: ${o.unit === "bytes" ? bytes(last) : last}`));
      chart.appendChild(poly);
    });
    if (names.length > 1) {
      const legend = el("p", {class: "keys"});
      names.forEach((name, i) => legend.appendChild(el("span", {class: `key s${i}`}, (o.labels || {})[name] || name)));
      box.appendChild(legend);
    }
  }

  // Horizontal bars, one a label ({label: value}); zero rows are kept (a zero is an answer).
  function bars(box, values, opts) {
    clear(box);
    const o = opts || {};
    const entries = Object.entries(values || {}).sort((a, b) => b[1] - a[1]);
    if (!entries.length) { box.appendChild(el("p", {class: "empty"}, o.empty || "none yet")); return; }
    const max = Math.max(1, ...entries.map((e) => e[1]));
    for (const [label, value] of entries) {
      const row = el("div", {class: "bar", "data-label": label, "data-value": value});
      row.appendChild(el("span", {class: "label"}, label));
      const pic = svg("svg", {viewBox: "0 0 100 10", preserveAspectRatio: "none", class: "barpic"});
      pic.appendChild(svg("rect", {x: 0, y: 0, height: 10, width: (100 * value / max).toFixed(2)}));
      row.appendChild(pic);
      row.appendChild(el("span", {class: "value"}, o.unit === "bytes" ? bytes(value) : String(value)));
      box.appendChild(row);
    }
  }

  function tile(box, id, label, value, shown) {
    const t = el("div", {class: "tile", id: id, "data-value": value});
    t.appendChild(el("span", {class: "tile-value"}, shown === undefined ? String(value) : shown));
    t.appendChild(el("span", {class: "tile-label"}, label));
    box.appendChild(t);
  }

  async function getJSON(url) {
    const resp = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (resp.status === 401) { window.location.assign(document.body.dataset.signin); throw new Error("signed out"); }
    const doc = await resp.json();
    if (!resp.ok) {
      const first = (doc.errors || [])[0] || {};
      throw new Error(first.message || `HTTP ${resp.status}`);
    }
    return doc;
  }

  window.shoalPlot = {el, svg, bytes, clear, lineChart, bars, tile, getJSON};
})();
