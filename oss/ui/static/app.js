// The DCP web view: programs with a live timeline of their processes, instances with
// their load and heartbeats, spend against budget, the consolidated log.
// The token is typed into a form, kept in sessionStorage (this tab only) and sent as
// an Authorization header; it never goes into a URL.  Live updates: the OSS's event
// stream (/v1/events, read with fetch because EventSource cannot send headers).
// Big lists render only what is visible (canvas, virtual rows); data comes in pages.
"use strict";

const KEY = "dcp-token";
const PAGE = 2000; // processes per request
const ROW = 20; // px: a virtual row
const LANE = 14; // px: a timeline lane
const LABEL = 130; // px: the timeline's instance labels
const COLORS = {
  running: "#4a8fe7", exited: "#43a35a", failed: "#e08a2c", lost: "#d03b3b", migrated: "#8a5bd6",
};

const S = {
  token: sessionStorage.getItem(KEY) || "",
  skew: 0, // server clock - local clock (s)
  tab: "programs",
  programs: [],
  selected: null,
  procs: [],
  layout: null,
  instances: [],
  history: new Map(), // instance -> its last load samples
  logLines: [],
  logCursor: 0,
  logProgram: null,
  stream: null,
};
const $ = (id) => document.getElementById(id);
const now = () => Date.now() / 1000 + S.skew;

class Refused extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + S.token } });
  if (r.status === 401 || r.status === 403) {
    let msg = r.statusText;
    try { msg = (await r.json()).message; } catch (e) { /* keep the status text */ }
    throw new Refused(msg);
  }
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function text(el, s) { el.textContent = s; return el; }
function div(cls, s) { const d = document.createElement("div"); d.className = cls; if (s !== undefined) d.textContent = s; return d; }
function ago(ts) {
  if (ts == null) return "-";
  const s = Math.max(0, now() - ts);
  return s < 60 ? s.toFixed(0) + "s" : s < 3600 ? (s / 60).toFixed(0) + "m" : (s / 3600).toFixed(1) + "h";
}
function money(m) { return m == null ? "-" : (m / 1e6).toFixed(6); }

// -- login --------------------------------------------------------------------------

function showLogin(error) {
  S.token = "";
  sessionStorage.removeItem(KEY);
  if (S.stream) S.stream.abort();
  // nothing of the last account's view survives into the next one's
  Object.assign(S, { programs: [], selected: null, procs: [], layout: null, instances: [],
    history: new Map(), logLines: [], logCursor: 0, logProgram: null, stream: null });
  $("programs").replaceChildren(); $("program-info").replaceChildren();
  text($("program-title"), "Select a program"); text($("tl-summary"), "");
  drawTimeline();
  $("app").hidden = true; $("tabs").hidden = true; $("signout").hidden = true;
  $("login").hidden = false;
  text($("login-error"), error || "");
  text($("live"), "offline").className = "off";
}

async function start() {
  $("login").hidden = true; $("app").hidden = false; $("tabs").hidden = false;
  $("signout").hidden = false;
  try {
    await loadPrograms();
  } catch (e) {
    if (e instanceof Refused) return showLogin("refused: " + e.message);
    throw e;
  }
  listen();
  refreshTab();
}

// -- live updates ---------------------------------------------------------------------

async function listen() {
  const ctl = new AbortController();
  S.stream = ctl;
  let backoff = 1000;
  while (!ctl.signal.aborted && S.token) {
    try {
      const r = await fetch("/v1/events?programs=500", { headers: { Authorization: "Bearer " + S.token }, signal: ctl.signal });
      if (r.status === 401 || r.status === 403) return showLogin("refused: the token was not accepted");
      if (!r.ok || !r.body) throw new Error("events: " + r.status);
      text($("live"), "live").className = "on";
      backoff = 1000;
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i); buf = buf.slice(i + 2);
          let ev = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) ev = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) onEvent(ev, JSON.parse(data));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    text($("live"), "reconnecting").className = "off";
    await new Promise((res) => setTimeout(res, backoff));
    backoff = Math.min(backoff * 2, 15000);
  }
}

const pending = new Set();
function soon(what, fn) { // coalesce refetches: at most one in flight per kind
  if (pending.has(what)) return;
  pending.add(what);
  setTimeout(() => fn().catch(() => {}).finally(() => pending.delete(what)), 50);
}

function onEvent(ev, d) {
  if (d.now) S.skew = d.now - Date.now() / 1000;
  if (ev === "programs") {
    soon("programs", loadPrograms);
    if (S.tab === "spend") soon("spend", loadSpend);
  }
  const sel = S.selected;
  if ((ev === "processes" || ev === "programs") && sel && d.changed.includes(sel)) {
    soon("timeline", () => loadTimeline(sel));
    if (S.tab === "log") soon("log", loadLog);
  }
  if (ev === "instances" && S.tab === "instances") soon("instances", loadInstances);
}

// -- programs and their timeline ----------------------------------------------------------

async function loadPrograms() {
  S.programs = await api("/v1/programs?limit=500");
  const box = $("programs");
  box.replaceChildren(...S.programs.map((p) => {
    const it = div("item" + (p.id === S.selected ? " sel" : ""));
    it.dataset.id = p.id;
    it.append(text(document.createElement("span"), p.state));
    it.firstChild.className = "state " + p.state;
    it.append(p.id + "  " + p.argv.join(" "));
    it.onclick = () => select(p.id);
    return it;
  }));
  text($("programs-count"), "(" + S.programs.length + ")");
  if (!S.selected && S.programs.length) select(S.programs[0].id);
  else if (S.selected) showProgram();
}

function select(id) {
  S.selected = id;
  for (const it of $("programs").children) it.classList.toggle("sel", it.dataset.id === id);
  showProgram();
  loadTimeline(id);
  if (S.tab === "log") loadLog();
}

function showProgram() {
  const p = S.programs.find((x) => x.id === S.selected);
  if (!p) return;
  text($("program-title"), p.id + " — " + p.argv.join(" "));
  const dl = document.createElement("dl");
  dl.className = "info";
  const rows = [
    ["state", p.state + (p.status_reason ? " (" + p.status_reason + ")" : "")],
    ["placements", p.placements.map((x) => x.instance + ":" + x.processes).join(", ") || "-"],
    ["processes", p.processes + " (" + p.lost_processes + " lost)"],
    ["spent", money(p.spent_micros)],
    ["exit", p.signal != null ? "signal " + p.signal : p.exit_status != null ? String(p.exit_status) : "-"],
  ];
  for (const [k, v] of rows) { dl.append(text(document.createElement("dt"), k), text(document.createElement("dd"), v)); }
  $("program-info").replaceChildren(dl);
}

async function loadTimeline(id) {
  const all = [];
  for (let off = 0; ; off += PAGE) {
    const page = await api(`/v1/programs/${encodeURIComponent(id)}/processes?offset=${off}&limit=${PAGE}`);
    all.push(...page.processes);
    if (all.length >= page.total || page.processes.length === 0) break;
  }
  if (id !== S.selected) return;
  S.procs = all;
  S.layout = layout(all);
  drawTimeline();
}

function stateOf(p) {
  if (p.state === "exited" && (p.signal || p.exit_status)) return "failed";
  return p.state;
}

// Lanes: instances in name order; in each, processes packed into sub-lanes by time.
function layout(procs) {
  const byInst = new Map();
  for (const p of procs) {
    if (!byInst.has(p.instance)) byInst.set(p.instance, []);
    byInst.get(p.instance).push(p);
  }
  const names = [...byInst.keys()].sort();
  const lanes = []; // {instance, first}
  const where = new Map(); // "inst:pid" -> bars (several if pids were reused)
  const bars = [];
  let t0 = Infinity, t1 = -Infinity;
  for (const name of names) {
    const list = byInst.get(name).sort((a, b) => a.started - b.started);
    const ends = [];
    for (const p of list) {
      const end = p.ended == null ? null : p.ended;
      let lane = ends.findIndex((e) => e != null && e <= p.started);
      if (lane < 0) { lane = ends.length; ends.push(0); }
      ends[lane] = end;
      const bar = { p, row: lanes.length + lane, state: stateOf(p) };
      bars.push(bar);
      const k = p.instance + ":" + p.pid;
      if (!where.has(k)) where.set(k, []);
      where.get(k).push(bar);
      t0 = Math.min(t0, p.started);
      t1 = Math.max(t1, p.ended == null ? p.started : p.ended);
    }
    const n = Math.max(1, ends.length);
    for (let i = 0; i < n; i++) lanes.push({ instance: name, first: i === 0 });
  }
  return { lanes, bars, where, t0, t1, names };
}

function drawTimeline() {
  const L = S.layout;
  const scroll = $("timeline-scroll"), cv = $("timeline");
  const w = scroll.clientWidth, h = scroll.clientHeight;
  const dpr = window.devicePixelRatio || 1;
  cv.width = w * dpr; cv.height = h * dpr; cv.style.width = w + "px"; cv.style.height = h + "px";
  const g = cv.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const drawn = [];
  if (!L || !L.bars.length) {
    $("timeline-space").style.height = "0px";
    text($("tl-summary"), S.selected ? "no processes recorded yet" : "");
    cv.dataset.bars = "0";
    window.dcpTimeline = { bars: drawn, instances: [] };
    return;
  }
  const total = L.lanes.length * LANE + 24;
  $("timeline-space").style.height = total + "px";
  const top = scroll.scrollTop;
  const t1 = Math.max(L.t1, L.bars.some((b) => b.p.ended == null) ? now() : L.t1);
  const span = Math.max(t1 - L.t0, 0.001);
  const x = (t) => LABEL + ((t - L.t0) / span) * (w - LABEL - 10);
  const y = (row) => 20 + row * LANE - top;
  const first = Math.max(0, Math.floor((top - 20) / LANE)), last = Math.min(L.lanes.length, first + Math.ceil(h / LANE) + 1);
  for (let r = first; r < last; r++) {
    const lane = L.lanes[r];
    if (lane.first) {
      g.fillStyle = "#eef0f3"; g.fillRect(0, y(r) - 1, w, 1);
      g.fillStyle = "#1d232b"; g.font = "11px DejaVu Sans, sans-serif";
      g.fillText(lane.instance.slice(0, 18), 4, y(r) + 10);
    }
  }
  const visible = (row) => row >= first - 1 && row <= last;
  for (const b of L.bars) {
    if (!visible(b.row)) continue;
    const p = b.p, x0 = x(p.started), x1 = Math.max(x0 + 2, x(p.ended == null ? t1 : p.ended));
    g.fillStyle = COLORS[b.state] || "#999";
    g.fillRect(x0, y(b.row) + 2, x1 - x0, LANE - 4);
    if (p.ended != null && b.state !== "lost") { // an exit: a tick at the end
      g.fillStyle = "#1d232b"; g.fillRect(x1 - 1, y(b.row) + 1, 2, LANE - 2);
    }
    if (b.state === "lost") { // a loss: an X at the end
      g.strokeStyle = "#d03b3b"; g.lineWidth = 2; g.beginPath();
      g.moveTo(x1 - 4, y(b.row)); g.lineTo(x1 + 4, y(b.row) + LANE);
      g.moveTo(x1 + 4, y(b.row)); g.lineTo(x1 - 4, y(b.row) + LANE); g.stroke();
    }
    drawn.push({ instance: p.instance, pid: p.pid, state: b.state, parent: p.parent, moved_to: p.moved_to });
  }
  // arrows: placements (parent -> child on another instance) and migrations
  g.lineWidth = 1.2;
  const arrows = { placement: 0, migration: 0 };
  for (const b of L.bars) {
    const p = b.p;
    let from = null, to = null, color = "#1d232b", kind = "placement";
    if (p.parent) {
      const pb = (L.where.get(p.parent) || [])[0];
      if (pb && pb.p.instance !== p.instance) { from = [x(p.started), pb.row]; to = [x(p.started), b.row]; }
    }
    if (p.state === "migrated" && p.moved_to) {
      const tb = (L.where.get(p.moved_to + ":" + p.pid) || []).find((c) => c.p.started >= p.started);
      if (tb) {
        from = [x(p.ended || p.started), b.row]; to = [x(tb.p.started), tb.row];
        color = "#8a5bd6"; kind = "migration";
      }
    }
    if (!from || (!visible(from[1]) && !visible(to[1]))) continue;
    arrow(g, from[0], y(from[1]) + LANE / 2, to[0], y(to[1]) + LANE / 2, color);
    arrows[kind] += 1;
  }
  // the time axis, over whatever scrolled under it
  g.fillStyle = "#fff"; g.fillRect(0, 0, w, 18);
  g.fillStyle = "#67707c"; g.font = "10px DejaVu Sans, sans-serif";
  for (let i = 0; i <= 4; i++) {
    const t = L.t0 + (span * i) / 4;
    g.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
    g.fillText("+" + (t - L.t0).toFixed(1) + "s", x(t), 12);
  }
  g.textAlign = "left";
  const count = (s) => L.bars.filter((b) => b.state === s).length;
  text($("tl-summary"),
    `${L.bars.length} processes on ${L.names.length} instances: ${count("running")} running, ` +
    `${count("exited") + count("failed")} exited, ${count("lost")} lost, ${count("migrated")} migrated`);
  cv.dataset.bars = String(L.bars.length);
  window.dcpTimeline = { bars: drawn, instances: L.names, total: L.bars.length, arrows };
}

function arrow(g, x0, y0, x1, y1, color) {
  g.strokeStyle = color; g.fillStyle = color;
  g.beginPath(); g.moveTo(x0, y0); g.lineTo(x1, y1); g.stroke();
  const a = Math.atan2(y1 - y0, x1 - x0);
  g.beginPath(); g.moveTo(x1, y1);
  g.lineTo(x1 - 7 * Math.cos(a - 0.4), y1 - 7 * Math.sin(a - 0.4));
  g.lineTo(x1 - 7 * Math.cos(a + 0.4), y1 - 7 * Math.sin(a + 0.4));
  g.closePath(); g.fill();
}

// -- virtual rows (instances, log) ------------------------------------------------------

function virtualRows(scrollId, spaceId, rowsId, n, render) {
  const scroll = $(scrollId);
  $(spaceId).style.height = n * ROW + "px";
  const first = Math.floor(scroll.scrollTop / ROW);
  const count = Math.ceil(scroll.clientHeight / ROW) + 2;
  const box = $(rowsId);
  box.style.top = first * ROW + "px";
  const out = [];
  for (let i = first; i < Math.min(n, first + count); i++) out.push(render(i));
  box.replaceChildren(...out);
}

function pad(s, n) { s = String(s == null ? "-" : s); return s.length >= n ? s.slice(0, n - 1) + " " : s + " ".repeat(n - s.length); }

const HISTORY = 60; // load samples kept per instance (one per refresh, about a second)

async function loadInstances() {
  S.instances = await api("/v1/instances");
  for (const it of S.instances) {
    const h = S.history.get(it.name) || [];
    if (it.load && h.at(-1)?.seen !== it.seen) h.push({ seen: it.seen, cpu: it.load.cpu_percent });
    if (h.length > HISTORY) h.shift();
    S.history.set(it.name, h);
  }
  text($("instances-count"), "(" + S.instances.length + ")");
  text($("instances-head"), pad("NAME", 20) + pad("STATE", 10) + pad("POOL", 10) + pad("SLOTS", 8) + pad("CPU%", 7) + pad("RUNQ", 7) + pad("MEM_MB", 9) + pad("HEARTBEAT", 11) + "CPU, LAST MINUTE");
  drawInstances();
}

function drawInstances() {
  const list = S.instances;
  virtualRows("instances-scroll", "instances-space", "instances-rows", list.length, (i) => {
    const it = list[i], ld = it.load;
    const beat = it.seen || it.last_heartbeat;
    const stale = it.state === "ready" && beat != null && now() - beat > 10;
    const row = div("row" + (it.state === "failed" || stale ? " failed" : ""),
      pad(it.name, 20) + pad(it.state, 10) + pad(it.pool, 10) + pad(it.used_slots + "/" + it.slots, 8) +
      pad(ld ? ld.cpu_percent.toFixed(0) : "-", 7) + pad(ld ? ld.runqueue.toFixed(1) : "-", 7) +
      pad(ld ? ld.memory_used_mb : "-", 9) + pad(ago(beat), 11));
    row.append(sparkline(S.history.get(it.name) || []));
    return row;
  });
}

function sparkline(h) { // CPU% of the last samples (0-100% of cpus * 100)
  const cv = document.createElement("canvas");
  cv.width = 120; cv.height = 14; cv.className = "spark";
  const g = cv.getContext("2d");
  const top = Math.max(100, ...h.map((x) => x.cpu));
  g.fillStyle = "#4a8fe7";
  h.forEach((x, i) => {
    const v = Math.round((x.cpu / top) * 13);
    g.fillRect(i * 2, 14 - v, 2, v);
  });
  cv.dataset.samples = String(h.length);
  return cv;
}

// -- spend ----------------------------------------------------------------------------

async function loadSpend() {
  const r = await api("/v1/spend?limit=30");
  const rows = [r.account, ...r.users, ...r.programs];
  const cv = $("spend"), w = $("tab-spend").clientWidth - 4, h = rows.length * 22 + 30;
  const dpr = window.devicePixelRatio || 1;
  cv.width = w * dpr; cv.height = h * dpr; cv.style.width = w + "px"; cv.style.height = h + "px";
  const g = cv.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...rows.map((x) => Math.max(x.spent_micros, x.budget_micros || 0, x.hard_budget_micros || 0)));
  const X = (v) => 260 + (v / max) * (w - 380);
  rows.forEach((s, i) => {
    const y = 20 + i * 22;
    g.fillStyle = "#1d232b"; g.font = "11px DejaVu Sans, sans-serif";
    g.fillText((s.level + " " + (s.name || s.id)).slice(0, 40), 4, y + 12);
    const over = s.budget_micros != null && s.spent_micros > s.budget_micros;
    g.fillStyle = over ? "#d03b3b" : "#4a8fe7";
    g.fillRect(260, y + 3, Math.max(1, X(s.spent_micros) - 260), 12);
    for (const [b, c] of [[s.budget_micros, "#e08a2c"], [s.hard_budget_micros, "#d03b3b"]]) {
      if (b != null) { g.fillStyle = c; g.fillRect(X(b) - 1, y, 3, 18); }
    }
    g.fillStyle = "#333b45";
    g.fillText(money(s.spent_micros) + (s.budget_micros != null ? " / " + money(s.budget_micros) : ""), X(Math.max(s.spent_micros, s.budget_micros || 0, s.hard_budget_micros || 0)) + 6, y + 12);
  });
  text($("spend-summary"), `account ${r.account.name}: spent ${money(r.account.spent_micros)}` +
    (r.account.budget_micros != null ? ` of budget ${money(r.account.budget_micros)}` : " (no budget)") +
    ` — orange: budget, red: hard budget`);
}

// -- log ------------------------------------------------------------------------------

async function loadLog() {
  const id = S.selected;
  if (!id) return;
  if (S.logProgram !== id) { S.logProgram = id; S.logLines = []; S.logCursor = 0; }
  text($("log-program"), id);
  for (;;) {
    const page = await api(`/v1/programs/${encodeURIComponent(id)}/logs?cursor=${S.logCursor}&limit=5000`);
    if (id !== S.logProgram) return;
    S.logLines.push(...page.lines);
    if (!page.lines.length) break;
    S.logCursor = page.cursor;
  }
  drawLog();
}

function logFiltered() {
  const inst = $("f-instance").value.trim(), stream = $("f-stream").value, t = $("f-text").value;
  return S.logLines.filter((l) => (!inst || l.instance === inst) && (!stream || l.stream === stream) && (!t || l.text.includes(t)));
}

function drawLog() {
  const lines = logFiltered();
  virtualRows("log-scroll", "log-space", "log-rows", lines.length, (i) => {
    const l = lines[i];
    const d = new Date(l.ts * 1000);
    const hms = d.toTimeString().slice(0, 8) + "." + String(d.getMilliseconds()).padStart(3, "0");
    return div("row " + l.stream, hms + " " + pad(l.instance, 14) + pad(l.pid, 8) + pad(l.stream, 7) + l.text);
  });
}

// -- tabs and wiring ------------------------------------------------------------------

function refreshTab() {
  for (const b of $("tabs").children) b.classList.toggle("on", b.dataset.tab === S.tab);
  for (const t of ["programs", "instances", "spend", "log"]) $("tab-" + t).hidden = t !== S.tab;
  const load = { programs: async () => drawTimeline(), instances: loadInstances, spend: loadSpend, log: loadLog }[S.tab];
  load().catch((e) => { if (e instanceof Refused) showLogin("refused: " + e.message); });
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    S.token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(KEY, S.token);
    start();
  });
  $("signout").onclick = () => showLogin("");
  for (const b of $("tabs").children) b.onclick = () => { S.tab = b.dataset.tab; refreshTab(); };
  $("timeline-scroll").addEventListener("scroll", () => requestAnimationFrame(drawTimeline));
  $("instances-scroll").addEventListener("scroll", () => requestAnimationFrame(drawInstances));
  $("log-scroll").addEventListener("scroll", () => requestAnimationFrame(drawLog));
  for (const id of ["f-instance", "f-stream", "f-text"]) $(id).addEventListener("input", drawLog);
  window.addEventListener("resize", () => requestAnimationFrame(drawTimeline));
  // running bars grow with the clock
  setInterval(() => {
    if (S.tab === "programs" && S.layout && S.layout.bars.some((b) => b.p.ended == null)) drawTimeline();
    if (S.tab === "instances") drawInstances();
  }, 1000);
  if (S.token) start(); else showLogin("");
});
