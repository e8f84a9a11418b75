// mlx-supervisor status page: polls /admin/status, streams /admin/events. No build step; the one
// dependency (uPlot, for charts.js) is vendored under static/vendor.
// The SSE stream is read with fetch() rather than EventSource so the admin key can travel as a
// Bearer header (EventSource cannot send headers).
"use strict";

const KEY_STORE = "mlx-supervisor.adminKey";
const MAX_EVENTS = 200;
const POLL_MS = 1000;
const HOT = new Set(["starting", "idle", "loading", "ready", "draining", "stopping", "killing"]);

let status = null;        // last /admin/status document
let fetchedAt = 0;        // performance.now() when it arrived
let events = [];          // newest last
let lastEventId = 0;
const statusListeners = []; // called with each /admin/status document
let authFailed = false;
const pending = new Set(); // "model:action" while a button's request runs

const $ = (sel) => document.querySelector(sel);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.setAttribute("style", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function key() { return localStorage.getItem(KEY_STORE) || ""; }
function authHeaders() { const k = key(); return k ? { Authorization: "Bearer " + k } : {}; }

function fmtBytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function fmtAge(s) {
  if (s < 1) return "just now";
  if (s < 60) return Math.floor(s) + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  return Math.floor(s / 3600) + "h ago";
}

function fmtSecs(s) {
  s = Math.max(0, Math.ceil(s));
  return s >= 60 ? Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s" : s + "s";
}

function fmtTime(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function banner(text) {
  const b = $("#banner");
  b.hidden = !text;
  b.textContent = text || "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

// ------------------------------------------------------------------ status polling

async function refresh() {
  let resp;
  try {
    resp = await fetch("/admin/status", { headers: authHeaders(), cache: "no-store" });
  } catch (e) {
    banner("The gateway is not answering.");
    return;
  }
  if (resp.status === 401) {
    authFailed = true;
    banner("This gateway needs the admin key: enter it above (it is kept in this browser only).");
    return;
  }
  if (!resp.ok) { banner(await errorText(resp)); return; }
  if (authFailed) { authFailed = false; connectEvents(); }
  banner("");
  status = await resp.json();
  fetchedAt = performance.now();
  render();
  for (const fn of statusListeners) fn(status);
}

function elapsed() { return (performance.now() - fetchedAt) / 1000; }

function render() {
  if (!status) return;
  const budget = status.budget_bytes || 1;
  const workers = status.workers.filter((w) => HOT.has(w.state));
  $("#memtext").textContent = `${fmtBytes(status.used_bytes)} of ${fmtBytes(status.budget_bytes)} ` +
    `(${Math.round(100 * status.used_bytes / budget)}%)`;
  keyed($("#membar"), workers, (w) => w.worker_id,
    (w) => JSON.stringify([w.state, w.charged_bytes, w.spare, budget]), (w) => h("span", {
      class: w.spare ? "spare" : w.state, "data-model": w.model,
      style: `width:${Math.min(100, 100 * w.charged_bytes / budget)}%`,
      title: `${w.model}: ${fmtBytes(w.charged_bytes)} (${w.state})`,
    }, w.model));
  $("#hotcount").textContent = `(${workers.length})`;
  $("#noworkers").hidden = workers.length > 0;
  keyed($("#workers tbody"), workers, (w) => w.worker_id,
    (w) => JSON.stringify([w.state, w.pid, w.charged_bytes, w.memory !== null, w.inflight, w.queued,
      w.pinned, w.spare, budget]), workerRow);
  keyed($("#catalog tbody"), status.models, (m) => m.id,
    (m) => JSON.stringify([m, [...pending].filter((p) => p.startsWith(m.id + ":"))]), catalogRow);
  tick();
}

// Rows are rebuilt only when what they show changed, so a button is not replaced under the
// pointer between mousedown and mouseup (which would swallow the click).
function keyed(parent, items, idOf, sigOf, build) {
  const old = new Map([...parent.children].map((el) => [el.dataset.key, el]));
  const rows = items.map((item) => {
    const sig = sigOf(item);
    let el = old.get(idOf(item));
    if (!el || el.dataset.sig !== sig) {
      el = build(item);
      el.dataset.key = idOf(item);
      el.dataset.sig = sig;
    }
    el.item = item;
    return el;
  });
  const same = rows.length === parent.children.length && rows.every((el, i) => parent.children[i] === el);
  if (!same) parent.replaceChildren(...rows);
}

// Countdowns and ages move between polls.
function tick() {
  if (!status) return;
  $("#summary").textContent = `pid ${status.pid} · up ${fmtSecs(status.uptime + elapsed())} · ` +
    `${status.models.length} models`;
  for (const tr of $("#workers tbody").children) {
    const w = tr.item;
    tr.querySelector(".lastused").textContent = fmtAge((status.now - w.last_used) + elapsed());
    let ttl = "—";
    if (w.pinned) ttl = "pinned";
    else if (w.ttl_remaining !== null && w.ttl_remaining !== undefined) ttl = fmtSecs(w.ttl_remaining - elapsed());
    else if (w.ttl > 0 && w.inflight > 0) ttl = "busy";
    tr.querySelector(".ttl").textContent = ttl;
  }
}

function workerRow(w) {
  const budget = status.budget_bytes || 1;
  const pct = Math.min(100, 100 * w.charged_bytes / budget);
  return h("tr", { "data-model": w.model, "data-state": w.state },
    h("td", {}, w.model, w.pinned ? h("span", { class: "pin" }, "PINNED") : null),
    h("td", {}, h("span", { class: "state " + w.state }, w.spare ? "spare" : w.state)),
    h("td", { class: "num" }, w.pid ?? "—"),
    h("td", {},
      h("div", { class: "bar " + w.state, title: `${pct.toFixed(1)}% of the budget` },
        h("i", { style: `width:${pct}%` })),
      h("span", { class: "bartext" }, fmtBytes(w.charged_bytes) + (w.memory ? "" : " (estimate)"))),
    h("td", { class: "num inflight" }, w.inflight),
    h("td", { class: "num" }, w.queued),
    h("td", { class: "lastused" }),
    h("td", { class: "ttl num" }));
}

function catalogRow(m) {
  const hot = HOT.has(m.state);
  const busy = (a) => pending.has(m.id + ":" + a);
  const btn = (action, label, enabled, cls) => h("button", {
    class: cls, "data-action": action, disabled: !enabled || busy(action) || null,
    onclick: () => act(m.id, action),
  }, busy(action) ? label + "…" : label);
  return h("tr", { "data-model": m.id, "data-state": m.state },
    h("td", {}, m.id, m.pinned ? h("span", { class: "pin" }, "PINNED") : null,
      m.aliases && m.aliases.length ? h("div", { class: "muted" }, "aka " + m.aliases.join(", ")) : null),
    h("td", {}, m.kind),
    h("td", {}, h("span", { class: "state " + m.state }, m.state)),
    h("td", { class: "num" }, fmtBytes(m.memory || m.estimated_bytes)),
    h("td", { class: "num" }, m.loads),
    h("td", {}, m.last_error ? h("div", { class: "err", title: m.last_error }, m.last_error) : ""),
    h("td", { class: "actions" },
      btn("load", "Load", m.state !== "ready"),
      m.pinned ? btn("unpin", "Unpin", true) : btn("pin", "Pin", true),
      btn("unload", "Unload", hot, "danger")));
}

async function act(model, action) {
  const id = model + ":" + action;
  if (pending.has(id)) return;
  pending.add(id);
  render();
  const path = "/admin/models/" + encodeURIComponent(model) + (action === "unload" ? "/unload" : "/load");
  const body = action === "pin" ? { pin: true } : action === "unpin" ? { pin: false } : {};
  try {
    const resp = await fetch(path, {
      method: "POST", headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!resp.ok) banner(`${action} ${model}: ${await errorText(resp)}`);
  } catch (e) {
    banner(`${action} ${model}: ${e}`);
  } finally {
    pending.delete(id);
    await refresh();
  }
}

// ------------------------------------------------------------------ event stream

let streamAbort = null;

function renderEvents() {
  $("#events").replaceChildren(...events.slice().reverse().map((e) => h("li", { "data-kind": e.kind },
    h("span", { class: "muted" }, fmtTime(e.time)),
    h("span", { class: "state " + e.kind }, e.kind),
    h("span", {}, e.model || "", e.pid ? h("span", { class: "muted" }, " pid " + e.pid) : null),
    h("span", {}, describe(e)))));
}

function describe(e) {
  if (e.kind === "ready") return `loaded in ${(e.load_seconds || 0).toFixed(2)}s, ${fmtBytes(e.bytes)}`;
  return e.reason || "";
}

// Other scripts (charts, pulls, playground) see every event; "sample" and "pull" ones are theirs
// alone, not lifecycle lines.
const eventListeners = [];

function onEvent(e) {
  if (e.id <= lastEventId) return;
  lastEventId = e.id;
  for (const fn of eventListeners) fn(e);
  if (e.kind === "sample" || e.kind === "pull") return;
  events.push(e);
  if (events.length > MAX_EVENTS) events.splice(0, events.length - MAX_EVENTS);
  renderEvents();
  scheduleRefresh();
}

let refreshTimer = null;
function scheduleRefresh() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 100);
}

// Each SSE event's data (JSON) in resp to onData until the stream ends: the status
// stream, a pull's and the playground's all go through here.
async function readSSE(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim());
      if (data.length && data[0] !== "[DONE]") onData(JSON.parse(data.join("\n")));
    }
  }
}

async function connectEvents() {
  if (streamAbort) streamAbort.abort();
  const ctrl = new AbortController();
  streamAbort = ctrl;
  const conn = $("#conn");
  while (!ctrl.signal.aborted) {
    try {
      const headers = { ...authHeaders(), Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
      const resp = await fetch("/admin/events", { headers, signal: ctrl.signal, cache: "no-store" });
      if (resp.status === 401) { conn.className = "conn off"; conn.textContent = "no key"; return; }
      if (!resp.ok || !resp.body) throw new Error(resp.statusText);
      conn.className = "conn on";
      conn.textContent = "live";
      await readSSE(resp, onEvent);
    } catch (e) {
      if (ctrl.signal.aborted) return;
    }
    conn.className = "conn off";
    conn.textContent = "reconnecting";
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------ start

function init() {
  const input = $("#key");
  input.value = key();
  $("#keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const k = input.value.trim();
    if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
    refresh();
    connectEvents();
  });
  refresh();
  connectEvents();
  setInterval(refresh, POLL_MS);
  setInterval(tick, 250); // countdowns between polls
}

document.addEventListener("DOMContentLoaded", init);
