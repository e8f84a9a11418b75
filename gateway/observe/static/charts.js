// The last 15 minutes as uPlot charts: /admin/history once, then each "sample" event from the
// status page's event stream (app.js) appended live. Uses app.js's helpers ($, authHeaders, fmtBytes).
"use strict";

const WINDOW_S = 15 * 60;
const PALETTE = ["#2e6fdb", "#e0662c", "#2e9d5b", "#9b4dca", "#d1453b", "#1f9bb0", "#c29a12", "#6b7385"];
const charts = {};   // id -> {plot, keys}
let samples = [];    // oldest first

function colorOf(i) { return PALETTE[i % PALETTE.length]; }

// Each chart: its series keys from the samples, and the value of one key in one sample.
const SPECS = {
  tps: { el: "#chart-tps", keys: (s) => Object.keys(s.rates), value: (s, k) => s.rates[k]?.tps ?? 0,
    fmt: (v) => v.toFixed(1) },
  rps: { el: "#chart-rps", keys: (s) => Object.keys(s.rates), value: (s, k) => s.rates[k]?.rps ?? 0,
    fmt: (v) => v.toFixed(2) },
  mem: { el: "#chart-mem", keys: (s) => Object.keys(s.memory), value: (s, k) => s.memory[k] ?? 0,
    fmt: fmtBytes, stacked: true },
  queue: { el: "#chart-queue", keys: (s) => Object.keys(s.queued), value: (s, k) => s.queued[k] ?? 0,
    fmt: (v) => v.toFixed(0), incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] },
};

function allKeys(spec) {
  const seen = new Set();
  for (const s of samples) for (const k of spec.keys(s)) seen.add(k);
  return [...seen].sort();
}

// Columns for uPlot: x (seconds), then one per key; stacked charts draw running sums, the
// largest first so each smaller fill sits on top of it; the memory chart adds the budget.
function columns(spec, keys) {
  const xs = samples.map((s) => s.time);
  let ys = keys.map((k) => samples.map((s) => spec.value(s, k)));
  if (spec.stacked) {
    const sums = ys.map((_, i) => samples.map((s, j) => ys.slice(0, i + 1).reduce((a, col) => a + col[j], 0)));
    ys = sums.reverse();
    ys.push(samples.map((s) => s.budget));
  }
  return [xs, ...ys];
}

function seriesOf(spec, keys) {
  const order = spec.stacked ? keys.slice().reverse() : keys;
  const series = order.map((k) => {
    const c = colorOf(keys.indexOf(k));
    return { label: k, stroke: c, width: 2, fill: spec.stacked ? c + "cc" : undefined,
      value: (u, v) => (v == null ? "—" : spec.fmt(v)) };
  });
  if (spec.stacked) series.push({ label: "budget", stroke: "#d1453b", width: 2, dash: [6, 4],
    value: (u, v) => (v == null ? "—" : fmtBytes(v)) });
  return [{}, ...series];
}

function build(id) {
  const spec = SPECS[id];
  const el = $(spec.el);
  const keys = allKeys(spec);
  const width = Math.max(320, el.clientWidth || 520);
  const opts = {
    width, height: 200, series: seriesOf(spec, keys),
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, Math.max(hi, 1)] } },
    axes: [{}, { values: (u, vals) => vals.map((v) => spec.fmt(v)), size: 70, incrs: spec.incrs }],
    legend: { live: true },
  };
  if (charts[id]) charts[id].plot.destroy();
  el.replaceChildren();
  const plot = new uPlot(opts, columns(spec, keys), el);
  charts[id] = { plot, keys: keys.join("\u0000") };
  el.dataset.series = keys.join(",");
}

function redraw() {
  const cutoff = (samples.length ? samples[samples.length - 1].time : 0) - WINDOW_S;
  samples = samples.filter((s) => s.time >= cutoff);
  for (const id of Object.keys(SPECS)) {
    const spec = SPECS[id];
    const keys = allKeys(spec);
    if (!charts[id] || charts[id].keys !== keys.join("\u0000")) build(id);
    else charts[id].plot.setData(columns(spec, keys));
  }
  $("#charts").dataset.samples = String(samples.length);
}

async function loadHistory() {
  try {
    const resp = await fetch("/admin/history", { headers: authHeaders(), cache: "no-store" });
    if (!resp.ok) return;
    const doc = await resp.json();
    const last = samples.length ? samples[0].time : Infinity;
    samples = doc.samples.filter((s) => s.time < last).concat(samples);
    redraw();
  } catch (e) { /* the status poll shows the banner */ }
}

eventListeners.push((e) => {
  if (e.kind !== "sample") return;
  samples.push(e);
  redraw();
});

let historyLoaded = false;
statusListeners.push(() => {
  if (historyLoaded) return;
  historyLoaded = true; // once the key works (the status document came back)
  loadHistory();
});

window.addEventListener("resize", () => { for (const id of Object.keys(charts)) build(id); });
document.addEventListener("DOMContentLoaded", redraw);
