// fedsim dashboard: polls v1/status and v1/history every 2 s and redraws the page.
// Data is written with textContent only, never as HTML. Errors (the aggregator
// restarting) show a banner and polling goes on; the next answer clears it.
"use strict";

const POLL_MS = 2000;
const TIMEOUT_MS = 5000;
// One colour per digit 0-9 (Tableau 10), for the label-mix bars and their legend.
const LABEL_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                      "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

const $ = (id) => document.getElementById(id);
const dash = (v) => (v === null || v === undefined ? "-" : String(v));
const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%");
// For tests and the benchmark: when the chart first had a point (ms since navigation start).
window.fedsimDashboard = { chartShownMs: null, polls: 0, errors: 0 };

let chart = null;
let historyKey = "";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function ago(iso) {
  if (!iso) return "-";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (Number.isNaN(s)) return "-";
  if (s < 90) return s + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function clock(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? dash(iso) : d.toLocaleTimeString([], { hour12: false });
}

function partitionText(p) {
  if (!p) return "-";
  if (typeof p !== "object") return String(p);
  const rest = Object.entries(p).filter(([k]) => k !== "PARTITION").map(([k, v]) => k + "=" + v);
  return dash(p.PARTITION) + (rest.length ? " (" + rest.join(", ") + ")" : "");
}

// Under AUTH_READS the page is opened as /?access_token=...: the API reads carry it too.
const TOKEN = new URLSearchParams(location.search).get("access_token");

async function getJSON(path) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
  const url = TOKEN ? path + "?access_token=" + encodeURIComponent(TOKEN) : path;
  try {
    const r = await fetch(url, { cache: "no-store", signal: ctrl.signal });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return await r.json();
  } finally {
    clearTimeout(timer);
  }
}

// --- run state, cards, settings -------------------------------------------

function renderState(st) {
  const state = $("state");
  let text = "training";
  let cls = "state";
  if (st.finished) {
    text = "run finished at version " + st.version;
    cls += " finished";
  } else if (st.version === 0 && !st.updates && !st.pending_updates) {
    text = "waiting for the first update";
    cls += " waiting";
  }
  state.textContent = text;
  state.className = cls;
  document.title = "fedsim · version " + st.version;
}

function renderCards(st) {
  $("version").textContent = st.version;
  const r = st.round;
  if (r) {
    $("round").textContent = r.number + " / " + r.rounds + (r.attempt > 1 ? " (try " + r.attempt + ")" : "");
    let detail = r.rounds_done + " done";
    if (!st.finished) {
      detail += " · " + r.pending + " of " + (r.target ?? r.quorum) + " updates in";
      if (r.closes_in !== null && r.closes_in !== undefined)
        detail += " · closes in " + Math.round(r.closes_in) + " s";
    }
    if (st.clock && st.clock.kind === "virtual")
      detail += " · simulated " + Math.round(st.clock.sim_seconds) + " s";
    $("round-detail").textContent = detail + secaggText(st.secagg);
  } else {
    $("round").textContent = st.mode === "async" ? "async" : "-";
    $("round-detail").textContent = st.mode === "async" ? "no rounds" : "";
  }
  $("updates").textContent = st.updates;
  $("updates-detail").textContent =
    st.pending_updates + " pending · " + st.unsaved_updates + " unsaved";
  const ck = st.last_checkpoint && st.last_checkpoint.version != null ? st.last_checkpoint : null;
  $("checkpoint").textContent = ck ? "v" + ck.version : "-";
  $("checkpoint-detail").textContent = ck ? clock(ck.time) : "none yet";
  $("set-model").textContent = dash(st.model);
  $("set-rule").textContent = dash(st.strategy) + (st.mode ? " (" + st.mode + ")" : "");
  $("set-partition").textContent = partitionText(st.partition);
  const run = st.run || {};
  $("set-clients").textContent =
    dash(run.logical_clients) + " logical" +
    (run.clients_per_round ? ", " + run.clients_per_round + " per round" : "") +
    ", " + (st.workers || []).length + " workers";
  $("set-rounds").textContent =
    (st.mode === "async" ? "-" : dash(run.rounds)) +
    (run.eval_every ? " · evaluate every " + run.eval_every : "") +
    (run.task_timeout ? " · task timeout " + run.task_timeout + " s" : "");
  // RUN_LABEL: the cell and seed an experiment's sweep is on.
  $("label-row").hidden = !st.label;
  $("set-label").textContent = st.label || "";
}

// SECAGG=true: the open phase and the last round's protocol figures (never an update's).
function secaggText(sa) {
  if (!sa) return "";
  let text = sa.phase ? " · secure: phase " + sa.phase + ", attempt " + sa.attempt : " · secure";
  const last = (sa.rounds || [])[sa.rounds ? sa.rounds.length - 1 : 0];
  if (last)
    text += " · round " + last.round + ": " + last.masked_in + " masked in, " + last.recovered +
      " recovered, " + (last.protocol_bytes / 1e6).toFixed(1) + " MB, " +
      Math.round(last.protocol_seconds) + " s";
  return text;
}

// --- tables and events -----------------------------------------------------

function labelBar(labels) {
  const bar = el("span", undefined, "mix");
  const total = (labels || []).reduce((a, b) => a + b, 0);
  if (!total) return bar;
  bar.title = labels.map((n, d) => d + ": " + n).join(", ");
  labels.forEach((n, d) => {
    if (!n) return;
    const seg = el("span");
    seg.style.flexGrow = n;
    seg.style.background = LABEL_COLORS[d % LABEL_COLORS.length];
    bar.append(seg);
  });
  return bar;
}

function row(cells) {
  const tr = el("tr");
  for (const [v, cls] of cells) {
    const td = el("td", undefined, cls);
    if (v instanceof Node) td.append(v);
    else td.textContent = dash(v);
    tr.append(td);
  }
  return tr;
}

// A client's population (clients.json): compute time x speed, bytes/s, task failure odds.
const unequal = (c) => (c.speed != null && c.speed !== 1) || c.bandwidth != null || c.dropout > 0;
const speedText = (v) => (v == null ? "-" : "\u00d7" + Number(v).toPrecision(3));
function bandwidthText(v) {
  if (v == null) return "\u221e";
  const units = [[1e9, " GB/s"], [1e6, " MB/s"], [1e3, " kB/s"]];
  for (const [size, unit] of units) if (v >= size) return (v / size).toPrecision(3) + unit;
  return Number(v).toPrecision(3) + " B/s";
}

function renderClients(clients) {
  const attackers = clients.some((c) => c.attacker);
  document.querySelectorAll(".attacker-col").forEach((e) => (e.hidden = !attackers));
  const population = clients.some(unequal);
  document.querySelectorAll(".population-col").forEach((e) => (e.hidden = !population));
  const rows = clients.map((c) => {
    const cells = [
      [c.id], [c.samples, "num"], [labelBar(c.labels)], [c.updates, "num"],
      [ago(c.last_seen)], [c.staleness, "num"],
      // A secure round reports no client's own accuracy: the row says so.
      [c.secagg ? "secure" : pct(c.accuracy), "num"],
    ];
    if (population) {
      cells.push([speedText(c.speed), "num population-col"],
                 [bandwidthText(c.bandwidth), "num population-col"],
                 [c.dropout == null ? "-" : pct(c.dropout) + " (" + dash(c.dropouts) + ")",
                  "num population-col"]);
    }
    if (attackers) cells.push([c.attacker ? "yes" : "", "attacker-col"]);
    const tr = row(cells);
    tr.dataset.client = c.id;
    if (c.attacker) tr.className = "attacker";
    return tr;
  });
  document.querySelector("#clients tbody").replaceChildren(...rows);
  $("clients-count").textContent = "(" + clients.length + ")";
}

function renderWorkers(workers) {
  const rows = workers.map((w) => {
    const tr = row([[w.id], [w.task || "idle"], [w.tasks_done, "num"], [w.retries, "num"],
                    [ago(w.last_seen)]]);
    tr.dataset.worker = w.id;
    return tr;
  });
  document.querySelector("#workers tbody").replaceChildren(...rows);
  $("workers-count").textContent = "(" + workers.length + ")";
}

function renderEvents(events) {
  const items = events.slice().reverse().map((ev) => {
    const li = el("li", undefined, "kind-" + ev.kind);
    li.append(el("time", clock(ev.time)), el("span", ev.kind, "kind"), el("span", ev.text));
    return li;
  });
  $("events").replaceChildren(...items);
}

function renderLegend() {
  const legend = $("legend");
  legend.append("label mix: ");
  LABEL_COLORS.forEach((c, d) => {
    const s = el("span", String(d), "swatch");
    s.style.background = c;
    legend.append(s);
  });
}

// --- chart -----------------------------------------------------------------

function makeChart() {
  if (typeof Chart === "undefined") {
    const note = $("chart-note");
    note.textContent = "chart library not installed (Debian's libjs-chart.js); the numbers still update";
    note.hidden = false;
    return null;
  }
  return new Chart($("chart"), {
    type: "line",
    data: { datasets: [
      { label: "test accuracy", data: [], yAxisID: "acc", borderColor: "#4e79a7",
        backgroundColor: "#4e79a7", pointRadius: 2, tension: 0 },
      { label: "test loss", data: [], yAxisID: "loss", borderColor: "#e15759",
        backgroundColor: "#e15759", borderDash: [5, 3], pointRadius: 2, tension: 0 },
      { label: "ε (privacy)", data: [], yAxisID: "eps", borderColor: "#59a14f", hidden: true,
        backgroundColor: "#59a14f", borderDash: [2, 2], pointRadius: 2, tension: 0 },
    ] },
    options: {
      animation: false, maintainAspectRatio: false, normalized: true,
      interaction: { mode: "nearest", axis: "x", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: "version" }, ticks: { precision: 0 } },
        acc: { position: "left", suggestedMax: 1, title: { display: true, text: "accuracy" },
               ticks: { callback: (v) => Math.round(v * 1000) / 10 + "%" } },
        loss: { position: "right", beginAtZero: true, title: { display: true, text: "loss" },
                grid: { drawOnChartArea: false } },
        eps: { position: "right", beginAtZero: true, display: false,
               title: { display: true, text: "ε" }, grid: { drawOnChartArea: false } },
      },
    },
  });
}

function renderHistory(history, st) {
  const scored = history.filter((h) => h.accuracy !== null && h.accuracy !== undefined);
  const last = scored[scored.length - 1];
  $("accuracy").textContent = last ? pct(last.accuracy) : "-";
  // Under DP each entry carries epsilon at delta; null is no bound (DP_NOISE=0).
  const dp = (h) => (h && "epsilon" in h ? (h.epsilon === null ? Infinity : h.epsilon) : null);
  const eps = (h) => (dp(h) === Infinity ? "∞" : Number(dp(h)).toFixed(2));
  $("accuracy-detail").textContent = last
    ? "version " + last.version + " · loss " + Number(last.loss).toFixed(3)
      + (dp(last) === null ? "" : " · ε = " + eps(last) + " at δ = " + Number(last.delta).toPrecision(2))
    : "not evaluated yet";
  const byRound = st.mode === "rounds";
  const key = byRound + ":" + scored.map((h) => h.version + "/" + h.accuracy + "/" + dp(h)).join(",");
  if (key === historyKey) return;
  historyKey = key;
  const x = (h) => (byRound ? (h.round === null || h.round === undefined ? 0 : h.round) : h.version);
  $("chart-title").textContent = "Test accuracy and loss per " + (byRound ? "round" : "version");
  $("chart").dataset.points = String(scored.length);
  if (!chart) return;
  chart.data.datasets[0].data = scored.map((h) => ({ x: x(h), y: h.accuracy }));
  chart.data.datasets[1].data = scored.map((h) => ({ x: x(h), y: h.loss }));
  const bounded = scored.filter((h) => dp(h) !== null && dp(h) !== Infinity);
  chart.data.datasets[2].data = bounded.map((h) => ({ x: x(h), y: dp(h) }));
  chart.data.datasets[2].hidden = !bounded.length;
  chart.options.scales.eps.display = bounded.length > 0;
  chart.options.scales.x.title.text = byRound ? "round" : "version";
  chart.update("none");
  if (scored.length && window.fedsimDashboard.chartShownMs === null)
    window.fedsimDashboard.chartShownMs = performance.now();
}

// --- polling ---------------------------------------------------------------

function setConnected(ok, err) {
  const conn = $("conn");
  conn.hidden = ok;
  document.body.classList.toggle("offline", !ok);
  if (!ok) conn.title = String(err);
}

// The history is fetched a page at a time: only the versions after `cursor`, so a poll's
// answer does not grow with the run's length. The cursor comes from the status read
// before the last page: versions it had not made yet, or was still scoring
// (evaluations_pending), may still come, whatever their order; the status is read first
// for that. A version below the highest held means another run: from the first page.
let history = new Map(); // version -> its entry
let cursor = null; // the next page's `after`; null: from the start
const HISTORY_PAGE = 1000;

async function tick() {
  try {
    let st, hist;
    const page = "v1/history?limit=" + HISTORY_PAGE + (cursor === null ? "" : "&after=" + cursor);
    try {
      st = await getJSON("v1/status");
      hist = await getJSON(page);
    } catch (err) {
      window.fedsimDashboard.errors++;
      setConnected(false, err);
      return;
    }
    const held = history.size ? Math.max(...history.keys()) : -1;
    if (st.version < held) {
      history = new Map(); // another run: its history from the start, next poll
      cursor = null;
    } else {
      for (const h of hist.history || []) history.set(h.version, h);
      const top = history.size ? Math.max(...history.keys()) : -1;
      const pending = st.evaluations_pending || [];
      const next = Math.min(top, st.version, ...pending.map((v) => v - 1));
      cursor = next >= 0 ? next : null;
    }
    setConnected(true);
    renderState(st);
    renderCards(st);
    renderClients(st.clients || []);
    renderWorkers(st.workers || []);
    renderEvents(st.events || []);
    renderHistory([...history.values()].sort((a, b) => a.version - b.version), st);
    window.fedsimDashboard.polls++;
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

renderLegend();
chart = makeChart();
tick();
