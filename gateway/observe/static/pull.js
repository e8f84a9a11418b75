// The pull form: POST /admin/models/pull and draw its SSE events (started, progress, done,
// error) as a progress bar per pull, with a Cancel button (DELETE /admin/pulls/{id}). Pulls
// started elsewhere show up too, from the "pull" events of the status page's stream.
// Uses app.js's helpers ($, h, authHeaders, fmtBytes, errorText, readSSE, refresh).
"use strict";

function fmtEta(s) {
  if (s === null || s === undefined) return "";
  return s >= 60 ? `${Math.floor(s / 60)}m ${String(Math.round(s % 60)).padStart(2, "0")}s left`
    : `${Math.ceil(s)}s left`;
}

const pullRows = new Map(); // pull id -> its row's parts

function pullRow(repo) {
  const bar = h("progress", { max: 1, value: 0 });
  const title = h("b", {}, repo);
  const text = h("span", { class: "muted" }, "asking the Hub…");
  const file = h("span", { class: "muted file" }, "");
  const cancel = h("button", { class: "danger", disabled: true }, "Cancel");
  const row = h("div", { class: "pullrow", "data-repo": repo },
    h("div", { class: "line" }, title, text), bar, h("div", { class: "line" }, file, cancel));
  $("#pulls").prepend(row);
  return { row, bar, title, text, file, cancel };
}

function showPullEvent(r, ev) {
  r.row.dataset.state = ev.event;
  if (ev.event === "started" || ev.event === "progress") {
    r.bar.max = ev.total || 1;
    r.bar.value = ev.bytes || 0;
    const rate = ev.rate ? ` · ${fmtBytes(ev.rate)}/s · ${fmtEta(ev.eta)}` : "";
    r.text.textContent = `${fmtBytes(ev.bytes)} of ${fmtBytes(ev.total)}${rate}`;
    if (ev.file) r.file.textContent = `${ev.file}: ${fmtBytes(ev.file_bytes)} of ${fmtBytes(ev.file_size)}`;
  } else if (ev.event === "done") {
    r.bar.value = r.bar.max;
    r.row.classList.add("done");
    r.text.textContent = `done: served as ${ev.model}`;
    r.file.textContent = "";
    r.cancel.remove();
    refresh();
  } else if (ev.event === "error") {
    r.row.classList.add("error");
    r.text.textContent = ev.message;
    r.cancel.remove();
  }
}

// A row becomes a pull's: keyed by its id, with a working Cancel button.
function adopt(r, id) {
  r.row.dataset.id = id;
  pullRows.set(id, r);
  r.cancel.disabled = false;
  r.cancel.addEventListener("click", async () => {
    r.cancel.disabled = true;
    await fetch("/admin/pulls/" + encodeURIComponent(id), { method: "DELETE", headers: authHeaders() });
  });
  return r;
}

// Pulls started anywhere (the CLI, another page) arrive on the status page's event stream.
eventListeners.push((e) => {
  if (e.kind !== "pull") return;
  const p = e.pull;
  const r = pullRows.get(p.id) || adopt(pullRow(p.repo), p.id);
  if (r.row.dataset.state === "done" || r.row.dataset.state === "error") return;
  showPullEvent(r, p);
});

async function startPull(ev) {
  ev.preventDefault();
  const repo = $("#pullrepo").value.trim();
  const name = $("#pullname").value.trim();
  const r = pullRow(repo);
  const body = { repo, pin: $("#pullpin").checked };
  if (name) body.name = name;
  try {
    const resp = await fetch("/admin/models/pull", {
      method: "POST", body: JSON.stringify(body),
      headers: { ...authHeaders(), "Content-Type": "application/json", Accept: "text/event-stream" },
    });
    if (!resp.ok) {
      showPullEvent(r, { event: "error", message: await errorText(resp) });
      return;
    }
    const id = resp.headers.get("x-pull-id");
    const shown = pullRows.get(id); // the event stream may have shown this pull first
    if (shown) r.row.remove();
    const row = shown || adopt(r, id);
    await readSSE(resp, (e) => showPullEvent(row, e));
  } catch (e) {
    showPullEvent(r, { event: "error", message: String(e) });
  }
}

document.addEventListener("DOMContentLoaded", () => $("#pullform").addEventListener("submit", startPull));
