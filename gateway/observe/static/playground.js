// The playground: pick a catalog model, send one message to /v1/chat/completions (streamed),
// watch the answer arrive with its time to first token and tokens/s. A cold model loads on
// demand; its load is shown from the event stream (spawning, loading, ready).
// Uses app.js's helpers ($, key, errorText, readSSE) and its listener lists.
"use strict";

const API_KEY_STORE = "mlx-supervisor.apiKey";
const CHAT_KINDS = new Set(["lm", "vlm", "fake"]);
let playing = null; // {model, t0} while a request runs

function playStatus(text) { $("#playstatus").textContent = text; }

statusListeners.push((st) => {
  const sel = $("#playmodel");
  const ids = st.models.filter((m) => CHAT_KINDS.has(m.kind)).map((m) => m.id);
  const have = [...sel.options].map((o) => o.value);
  if (ids.join("\u0000") === have.join("\u0000")) return;
  const keep = sel.value;
  sel.replaceChildren(...ids.map((id) => h("option", { value: id }, id)));
  if (ids.includes(keep)) sel.value = keep;
});

eventListeners.push((e) => {
  if (!playing || e.model !== playing.model || playing.first) return;
  const t = ((performance.now() - playing.t0) / 1000).toFixed(1);
  if (e.kind === "spawning") playStatus(`starting a worker for ${e.model}… (${t} s)`);
  else if (e.kind === "loading") playStatus(`loading ${e.model} (pid ${e.pid})… (${t} s)`);
  else if (e.kind === "ready") playStatus(`${e.model} loaded in ${(e.load_seconds || 0).toFixed(2)} s; generating…`);
});

function playHeaders() {
  const k = $("#playkey").value.trim() || key();
  return { "Content-Type": "application/json", Accept: "text/event-stream",
    ...(k ? { Authorization: "Bearer " + k } : {}) };
}

async function play(ev) {
  ev.preventDefault();
  if (playing) return;
  const model = $("#playmodel").value;
  const out = $("#playout");
  const k = $("#playkey").value.trim();
  if (k) localStorage.setItem(API_KEY_STORE, k); else localStorage.removeItem(API_KEY_STORE);
  const info = status && status.models.find((m) => m.id === model);
  out.textContent = "";
  out.dataset.done = "";
  playing = { model, t0: performance.now(), first: 0, chunks: 0 };
  $("#playsend").disabled = true;
  playStatus(info && info.state !== "ready" ? `${model} is ${info.state}: loading it on demand…`
    : "waiting for the first token…");
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: playHeaders(),
      body: JSON.stringify({ model, stream: true, max_tokens: 200, stream_options: { include_usage: true },
        messages: [{ role: "user", content: $("#playmsg").value }] }),
    });
    if (!resp.ok) { playStatus(`error: ${await errorText(resp)}`); return; }
    await readSSE(resp, (d) => {
      if (d.error) { playStatus(`error: ${d.error.message}`); return; }
      if (d.usage) usage = d.usage;
      const text = d.choices && d.choices[0] && d.choices[0].delta && d.choices[0].delta.content;
      if (!text) return;
      if (!playing.first) playing.first = performance.now();
      playing.chunks += 1;
      out.textContent += text;
      playStatus(`TTFT ${Math.round(playing.first - playing.t0)} ms · streaming…`);
    });
    const end = performance.now();
    const n = usage ? usage.completion_tokens : playing.chunks;
    const ttft = playing.first ? Math.round(playing.first - playing.t0) : null;
    const span = playing.first ? (end - playing.first) / 1000 : 0;
    const tps = span > 0 ? (Math.max(0, n - 1) / span).toFixed(1) : "—";
    out.dataset.done = "1";
    playStatus(`TTFT ${ttft ?? "—"} ms · ${tps} tokens/s · ${n} tokens in ${((end - playing.t0) / 1000).toFixed(2)} s`);
  } catch (e) {
    playStatus(`error: ${e}`);
  } finally {
    playing = null;
    $("#playsend").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#playkey").value = localStorage.getItem(API_KEY_STORE) || "";
  $("#playform").addEventListener("submit", play);
});
