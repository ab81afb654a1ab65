// loop-lab live dashboard: reads /events (server-sent events) and draws it with plain SVG.
// No libraries and no network access beyond this server, so it works offline.
"use strict";

const HISTORY_S = 60; // what the charts show
const KEEP_S = 75; // what we remember (a little more, so the left edge never runs dry)
const GAP_TICKS = 2.5; // an update this many ticks late counts as a gap in the stream
const ANNOUNCE_EVERY_MS = 15000; // key figures for screen readers, no more often than this
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const state = {
  points: [], // {t, lag, inflight, open, down}: one per update, t in server seconds
  latest: null, // the last update
  arrivedAt: 0, // performance.now() when it arrived
  tick: 0.25,
  conn: "connecting",
  reconnected: false, // the next update follows a lost connection
  stalledSince: null,
  source: null,
  retryMs: 1000,
  lastAnnounce: 0,
};

// ---------- formatting ----------

function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "–";
  if (ms < 10) return ms.toFixed(1);
  return Math.round(ms).toLocaleString("en-US");
}

function fmtSeconds(s) {
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function announce(text) {
  $("announce").textContent = text;
  state.lastAnnounce = performance.now();
}

// ---------- connection ----------

function setConn(conn, text) {
  state.conn = conn;
  const el = $("conn");
  el.dataset.state = conn;
  if (el.textContent !== text) el.textContent = text;
}

function connect() {
  if (state.source) state.source.close();
  setConn(state.latest ? "reconnecting" : "connecting",
          state.latest ? "reconnecting…" : "connecting…");
  const source = new EventSource("/events");
  state.source = source;
  source.onopen = () => {
    state.retryMs = 1000;
    setConn("live", "live");
  };
  source.onmessage = (event) => {
    let update;
    try {
      update = JSON.parse(event.data);
    } catch (err) {
      return; // a torn message after a restart: the next one is whole
    }
    onUpdate(update);
  };
  source.onerror = () => {
    if (state.conn !== "reconnecting") announce("Lost the connection to the server; retrying.");
    state.reconnected = true;
    if (source.readyState === EventSource.CLOSED) {
      // the browser gave up (refused, or an HTTP error): retry ourselves, backing off to 5 s
      setConn("reconnecting", `no connection, retrying in ${(state.retryMs / 1000).toFixed(0)} s`);
      setTimeout(connect, state.retryMs);
      state.retryMs = Math.min(state.retryMs * 1.5, 5000);
    } else {
      setConn("reconnecting", "no connection, retrying…"); // EventSource retries by itself
    }
  };
}

// ---------- updates ----------

function onUpdate(u) {
  const now = performance.now();
  // another server instance (its pid alone can repeat: in a container it is always 1)
  if (state.latest && u.server_id !== state.latest.server_id) {
    announce(`The server restarted: now pid ${u.pid} on ${u.loop}.`);
    state.points = [];
  }
  const last = state.points[state.points.length - 1];
  if (last && u.t < last.t) state.points = []; // another host's clock: start over
  if (state.stalledSince !== null) {
    const paused = (now - state.stalledSince) / 1000 + GAP_TICKS * state.tick;
    announce(`Updates resumed after ${paused.toFixed(1)} s; loop lag peaked at ${fmtMs(u.lag_recent_ms)} ms.`);
    state.stalledSince = null;
  }
  state.tick = u.tick_s || state.tick;
  state.latest = u;
  state.arrivedAt = now;
  state.points.push({
    t: u.t,
    lag: u.lag_recent_ms,
    inflight: u.in_flight,
    open: u.connections.open,
    down: state.reconnected,
    causes: u.utilization ? u.utilization.by_cause_1s : null,
  });
  state.reconnected = false;
  while (state.points.length && state.points[0].t < u.t - KEEP_S) state.points.shift();
  if (state.conn !== "live") setConn("live", "live");
  renderFigures(u);
  renderRoutes(u);
  renderCharts();
  if (now - state.lastAnnounce > ANNOUNCE_EVERY_MS) {
    announce(`Loop lag ${fmtMs(u.lag_recent_ms)} ms, ${u.in_flight} requests in flight, ` +
             `${u.connections.open} connections open.`);
  }
}

function renderFigures(u) {
  setText("loop-name", u.loop);
  setText("pid", String(u.pid));
  setText("uptime", fmtSeconds(u.uptime_s));
  setText("dashboards", `${u.dashboards} dashboard${u.dashboards === 1 ? "" : "s"} watching`);
  const lagNow = $("lag-now");
  lagNow.dataset.value = String(u.lag_recent_ms);
  setText("lag-now", fmtMs(u.lag_recent_ms));
  lagNow.closest(".fig").classList.toggle("hot", u.lag_recent_ms >= 100);
  setText("lag-recent-window", String(u.lag_recent_window_s));
  setText("lag-window-s", String(u.lag_window_s));
  setText("lag-window", `${fmtMs(u.lag_ms.p50)} / ${fmtMs(u.lag_ms.p99)} / ${fmtMs(u.lag_ms.max)} ms`);
  setText("in-flight", String(u.in_flight));
  setText("open-conns", String(u.connections.open));
  setText("conn-peak", String(u.connections.peak));
  setText("rps", u.rps.toFixed(1));
  renderBusy(u.utilization);
  const longest = u.longest_step;
  setText("longest-step", longest ? `${longest.route} · ${fmtMs(longest.max_step_ms)} ms` : "none yet");
  const maxDelay = Math.min(10, u.max_delay_s);
  const delay = $("delay");
  if (delay.max !== String(maxDelay)) delay.max = String(maxDelay);
}

const CAUSES = ["cpu", "syscall", "gil", "gc", "unknown"];

function renderBusy(util) {
  if (!util) {
    setText("busy-now", "–");
    setText("busy-10s", "not sampled here");
    setText("busy-cause", "");
    return;
  }
  setText("busy-now", (100 * util.last_1s).toFixed(0));
  setText("busy-10s", `${(100 * util.last_10s).toFixed(0)} %`);
  const by = util.by_cause_1s;
  const top = CAUSES.reduce((a, b) => (by[b] > by[a] ? b : a), CAUSES[0]);
  setText("busy-cause", by[top] > 0.005 ? `mostly ${top}` : "");
}

// ---------- tasks ----------

const TASK_ROWS = 6;
const TASKS_EVERY_MS = 2000;

async function pollTasks() {
  if (document.hidden) return;
  let body;
  try {
    const response = await fetch("/tasks", { cache: "no-store" });
    if (!response.ok) return;
    body = await response.json();
  } catch (err) {
    return; // the server is away: the stream's status says so
  }
  renderTasks(body);
}

function renderTasks(body) {
  setText("tasks-total", `${body.total.toLocaleString("en-US")} live`);
  const tbody = $("tasks-table").tBodies[0];
  const fresh = document.createDocumentFragment();
  for (const group of body.groups.slice(0, TASK_ROWS)) {
    const tr = document.createElement("tr");
    if (group.project) tr.className = "project";
    const count = document.createElement("td");
    count.className = "num";
    count.textContent = group.count.toLocaleString("en-US");
    const where = document.createElement("td");
    where.className = "where";
    const code = document.createElement("code");
    code.textContent = group.where;
    const line = document.createElement("span");
    line.className = "line";
    line.textContent = group.line;
    where.append(code, line);
    const oldest = document.createElement("td");
    oldest.className = "num";
    oldest.textContent = group.oldest_s.toFixed(1);
    const by = document.createElement("td");
    by.textContent = group.created_by;
    tr.append(count, where, oldest, by);
    fresh.appendChild(tr);
  }
  tbody.replaceChildren(fresh);
}

function renderRoutes(u) {
  const rows = Object.entries(u.routes).sort((a, b) => b[1].max_step_ms - a[1].max_step_ms);
  const top = rows.length ? Math.max(rows[0][1].max_step_ms, 1e-3) : 1;
  const tbody = $("routes-table").tBodies[0];
  const fresh = document.createDocumentFragment();
  rows.forEach(([route, rec], i) => {
    const tr = document.createElement("tr");
    if (i === 0 && rec.max_step_ms > 0) tr.className = "worst";
    const cells = [route, rec.count.toLocaleString("en-US"), fmtMs(rec.max_step_ms)];
    cells.forEach((text, j) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (j > 0) td.className = "num";
      tr.appendChild(td);
    });
    const bar = document.createElement("td");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0.5, (100 * rec.max_step_ms) / top)}%`;
    bar.appendChild(fill);
    tr.appendChild(bar);
    fresh.appendChild(tr);
  });
  tbody.replaceChildren(fresh);
}

// ---------- charts ----------

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (parent) parent.appendChild(el);
  return el;
}

// a round top for the y axis; counts get four whole-number gridlines
function niceMax(value, floor, whole) {
  const v = Math.max(value, floor);
  if (whole) return 4 * niceMax(Math.ceil(v / 4), 1, false);
  const mag = 10 ** Math.floor(Math.log10(v));
  // tops whose quarters are round too: 4 -> 1, 8 -> 2, 10 -> 2.5, 20 -> 5
  for (const step of [1, 2, 4, 8, 10]) if (step * mag >= v) return step * mag;
  return 10 * mag;
}

// the right edge keeps moving with the page's own clock, so a stall scrolls by as a growing gap
function serverNow() {
  if (!state.latest) return 0;
  return state.latest.t + (performance.now() - state.arrivedAt) / 1000;
}

const GEOM = { h: 190, left: 46, right: 8, top: 20, bottom: 22 };

function hatch(defs, id, cls) {
  const p = svgEl("pattern", { id, class: cls, width: 6, height: 6, patternUnits: "userSpaceOnUse",
                               patternTransform: "rotate(45)" }, defs);
  svgEl("line", { x1: 0, y1: 0, x2: 0, y2: 6 }, p);
}

function drawChart(svg, series, opts) {
  const { h, left, right, top, bottom } = GEOM;
  // draw in the svg's own pixels, so labels keep their size on any screen
  const w = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 720);
  if (svg.getAttribute("viewBox") !== `0 0 ${w} ${h}`) svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const end = serverNow();
  const start = end - HISTORY_S;
  const pts = state.points.filter((p) => p.t >= start - 5); // one beyond the edge: lines enter
  let peak = 0;
  for (const p of pts) for (const s of series) peak = Math.max(peak, p[s.key]);
  const ymax = niceMax(peak, opts.floor, opts.whole);
  const x = (t) => left + ((t - start) / HISTORY_S) * (w - left - right);
  const y = (v) => top + (1 - v / ymax) * (h - top - bottom);

  const desc = svg.querySelector("desc");
  svg.replaceChildren(desc);
  const defs = svgEl("defs", {}, svg);
  hatch(defs, "hatch-gap", "hatch-gap");
  hatch(defs, "hatch-down", "hatch-down");
  const clip = svgEl("clipPath", { id: `${svg.id}-clip` }, defs);
  svgEl("rect", { x: left, y: 0, width: w - left - right, height: h }, clip);

  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    svgEl("line", { class: "grid", x1: left, x2: w - right, y1: y(v), y2: y(v) }, svg);
    svgEl("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, svg)
      .textContent = opts.fmt(v);
  }
  for (const ago of [60, 45, 30, 15, 0]) {
    svgEl("text", { class: "axis", x: x(end - ago), y: h - 6,
                    "text-anchor": ago === 60 ? "start" : ago === 0 ? "end" : "middle" }, svg)
      .textContent = ago === 0 ? "now" : `−${ago} s`;
  }

  const plot = svgEl("g", { "clip-path": `url(#${svg.id}-clip)` }, svg);
  // gaps: between two updates too far apart, and after the last one if none came since
  const gapS = GAP_TICKS * state.tick;
  const gaps = [];
  for (let i = 1; i < pts.length; i++) {
    if (pts[i].t - pts[i - 1].t > gapS) gaps.push([pts[i - 1].t, pts[i].t, pts[i].down]);
  }
  const last = pts[pts.length - 1];
  if (last && end - last.t > gapS) gaps.push([last.t, end, state.conn === "reconnecting"]);
  let labelRight = -Infinity; // labels sit above the plot; skip one that would overlap the last
  for (const [a, b, down] of gaps) {
    if (b < start) continue;
    svgEl("rect", { class: down ? "gap gap-down" : "gap", x: x(a), y: top, width: Math.max(1, x(b) - x(a)),
                    height: h - top - bottom }, plot);
    const mid = Math.min(Math.max((x(a) + x(b)) / 2, left + 20), w - right - 20);
    if (mid - 20 > labelRight) {
      svgEl("text", { class: "gap-label", x: mid, y: top - 6, "text-anchor": "middle" }, svg)
        .textContent = down ? "offline" : `${(b - a).toFixed(1)} s`;
      labelRight = mid + 20;
    }
  }
  if (opts.stalls && state.latest) drawStalls(svg, plot, x, start, w);
  // lines break at gaps: nothing is known about the loop while no update arrived
  for (const s of series) {
    let d = "";
    let area = "";
    let runStart = null;
    const marks = []; // the first update after a gap: it reports what happened during the gap
    for (let i = 0; i < pts.length; i++) {
      const p = pts[i];
      const broken = i === 0 || p.t - pts[i - 1].t > gapS;
      if (broken && i > 0) marks.push(p);
      d += `${broken ? "M" : "L"}${x(p.t).toFixed(1)},${y(p[s.key]).toFixed(1)}`;
      if (s.area) {
        if (broken) {
          if (runStart !== null) area += `L${x(pts[i - 1].t).toFixed(1)},${y(0)}Z`;
          area += `M${x(p.t).toFixed(1)},${y(0)}`;
          runStart = p.t;
        }
        area += `L${x(p.t).toFixed(1)},${y(p[s.key]).toFixed(1)}`;
      }
    }
    if (s.area && pts.length) area += `L${x(last.t).toFixed(1)},${y(0)}Z`;
    if (area) svgEl("path", { class: `area-${s.key}`, d: area }, plot);
    if (d) svgEl("path", { class: `series series-${s.key}`, d }, plot);
    for (const p of marks) {
      svgEl("circle", { class: `mark mark-${s.key}`, cx: x(p.t), cy: y(p[s.key]), r: 3.5 }, plot);
    }
  }
  desc.textContent = opts.describe(pts, gaps);
  svg.dataset.points = String(pts.length); // what is drawn, for tests and curious readers
  svg.dataset.gaps = String(gaps.length);
}

// the watchdog's stalls, placed by the server's own clock: started_s counts from its start
function drawStalls(svg, plot, x, start, w) {
  const { h, top, bottom, right } = GEOM;
  const u = state.latest;
  const serverStart = u.t - u.uptime_s;
  let labelRight = -Infinity;
  for (const stall of u.stalls_recent || []) {
    const a = serverStart + stall.started_s;
    const b = a + stall.duration_ms / 1000;
    if (b < start) continue;
    svgEl("rect", { class: "stall", x: x(a), y: top, width: Math.max(2, x(b) - x(a)),
                    height: h - top - bottom }, plot);
    const text = `${stall.cause}${stall.detail ? ` (${stall.detail})` : ""}` +
                 (stall.where ? ` · ${stall.where}` : "");
    const at = Math.min(Math.max(x(a) + 4, GEOM.left + 2), w - right - 6 * text.length);
    if (at > labelRight) {
      const label = svgEl("text", { class: "stall-label", x: at, y: top + 14 }, svg);
      label.textContent = text;
      label.dataset.cause = stall.cause;
      labelRight = at + 6.2 * text.length;
    }
  }
}

// stacked shares of each second the loop was busy, by cause; broken at gaps like the lines
function drawCauses(svg) {
  const h = 90;
  const { left, right } = GEOM;
  const top = 6;
  const bottom = 16;
  const w = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 720);
  if (svg.getAttribute("viewBox") !== `0 0 ${w} ${h}`) svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const end = serverNow();
  const start = end - HISTORY_S;
  const pts = state.points.filter((p) => p.t >= start - 5 && p.causes);
  const x = (t) => left + ((t - start) / HISTORY_S) * (w - left - right);
  const y = (v) => top + (1 - v) * (h - top - bottom);
  const desc = svg.querySelector("desc");
  svg.replaceChildren(desc);
  for (const v of [0, 0.5, 1]) {
    svgEl("line", { class: "grid", x1: left, x2: w - right, y1: y(v), y2: y(v) }, svg);
    svgEl("text", { class: "axis", x: left - 6, y: y(v) + 4, "text-anchor": "end" }, svg)
      .textContent = `${Math.round(100 * v)}%`;
  }
  const gapS = GAP_TICKS * state.tick;
  const runs = [];
  for (let i = 0; i < pts.length; i++) {
    if (i === 0 || pts[i].t - pts[i - 1].t > gapS) runs.push([]);
    runs[runs.length - 1].push(pts[i]);
  }
  for (const run of runs) {
    let below = run.map(() => 0);
    for (const cause of CAUSES) {
      const above = run.map((p, i) => below[i] + Math.min(1, p.causes[cause] || 0));
      let d = "";
      run.forEach((p, i) => { d += `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(Math.min(1, above[i])).toFixed(1)}`; });
      for (let i = run.length - 1; i >= 0; i--) d += `L${x(run[i].t).toFixed(1)},${y(Math.min(1, below[i])).toFixed(1)}`;
      if (run.length > 1) svgEl("path", { class: `cause-${cause}`, d: `${d}Z` }, svg);
      below = above;
    }
  }
  const last = pts[pts.length - 1];
  if (!last) {
    desc.textContent = "No data yet.";
  } else {
    const parts = CAUSES.filter((c) => last.causes[c] > 0.005)
      .map((c) => `${c} ${(100 * last.causes[c]).toFixed(0)}%`);
    desc.textContent = `Loop busy in the last second: ${parts.length ? parts.join(", ") : "idle"}.`;
  }
  svg.dataset.points = String(pts.length);
}

function describeLag(pts, gaps) {
  if (!pts.length) return "No data yet.";
  const worst = Math.max(...pts.map((p) => p.lag));
  return `Loop lag over the last minute: now ${fmtMs(pts[pts.length - 1].lag)} ms, worst ${fmtMs(worst)} ms; ` +
         `${gaps.length} gap${gaps.length === 1 ? "" : "s"} in the updates.`;
}

function describeLoad(pts) {
  if (!pts.length) return "No data yet.";
  const p = pts[pts.length - 1];
  const peak = Math.max(...pts.map((q) => q.inflight));
  return `Requests in flight now ${p.inflight} (peak ${peak} this minute); open connections now ${p.open}.`;
}

function renderCharts() {
  drawChart($("lag-chart"), [{ key: "lag", area: true }],
            { floor: 10, fmt: (v) => fmtMs(v), describe: describeLag, stalls: true });
  drawCauses($("cause-chart"));
  drawChart($("load-chart"), [{ key: "open" }, { key: "inflight" }],
            { floor: 4, whole: true, fmt: (v) => String(v), describe: describeLoad });
}

// runs on the page's clock, not the server's: notices a silent stream and keeps the charts moving
function watchStream() {
  if (!state.latest) return;
  const silentMs = performance.now() - state.arrivedAt;
  if (state.conn === "live" && silentMs > GAP_TICKS * state.tick * 1000) {
    state.stalledSince = performance.now() - silentMs + GAP_TICKS * state.tick * 1000;
    setConn("stalled", "paused");
    announce("Updates paused: the server's event loop is not running.");
  }
  if (state.conn === "stalled") {
    setConn("stalled", `paused: no update for ${(silentMs / 1000).toFixed(1)} s (loop blocked?)`);
  }
  renderCharts();
}

// ---------- bursts ----------

function readBurst() {
  const delay = $("delay");
  const concurrency = $("concurrency");
  for (const input of [delay, concurrency]) {
    if (!input.checkValidity()) {
      $("burst-error").textContent = `${input.labels[0].textContent}: ${input.validationMessage}`;
      input.focus();
      return null;
    }
  }
  $("burst-error").textContent = "";
  return { delay: Number(delay.value), n: Number(concurrency.value), pool: $("pool").value };
}

// `query` (a button's data-query) fixes the form's other parameter: /db?driver=sync, ...
async function fire(mode, query) {
  const burst = readBurst();
  if (!burst) return;
  const params = new URLSearchParams({ delay: String(burst.delay) });
  if (mode === "offload") params.set("pool", burst.pool);
  for (const [key, value] of new URLSearchParams(query || "")) params.set(key, value);
  const url = `/${mode}?${params}`;
  const label = mode === "offload" ? `/offload (${burst.pool})`
              : query ? `/${mode} (${query.split("=")[1]})` : `/${mode}`;
  const item = document.createElement("li");
  const name = document.createElement("span");
  name.className = "mode";
  name.textContent = `${label} ×${burst.n} @ ${burst.delay} s`;
  const outcome = document.createElement("span");
  outcome.textContent = ": running…";
  item.append(name, outcome);
  const log = $("burst-log");
  log.prepend(item);
  while (log.children.length > 6) log.lastElementChild.remove();

  const buttons = document.querySelectorAll("#burst-form button");
  buttons.forEach((b) => { b.disabled = true; });
  $("burst-form").setAttribute("aria-busy", "true");
  const started = performance.now();
  const one = async () => {
    try {
      const response = await fetch(url, { cache: "no-store" });
      const body = await response.json().catch(() => null);
      const at = (performance.now() - started) / 1000;
      return response.ok ? { ok: true, at } : { ok: false, at, why: (body && body.error) || `HTTP ${response.status}` };
    } catch (err) {
      return { ok: false, at: (performance.now() - started) / 1000, why: String(err) };
    }
  };
  const results = await Promise.all(Array.from({ length: burst.n }, one));
  buttons.forEach((b) => { b.disabled = false; });
  $("burst-form").removeAttribute("aria-busy");
  const times = results.map((r) => r.at).sort((a, b) => a - b);
  const failed = results.filter((r) => !r.ok);
  outcome.textContent = `: all back in ${times[times.length - 1].toFixed(2)} s ` +
                        `(each at ${times.map((t) => t.toFixed(2)).join(", ")} s)`;
  if (failed.length) {
    const fail = document.createElement("span");
    fail.className = "fail";
    fail.textContent = `; ${failed.length} failed: ${failed[0].why}`;
    item.append(fail);
  }
}

// ---------- start ----------

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#burst-form button")) {
    button.addEventListener("click", () => fire(button.dataset.mode, button.dataset.query));
  }
  $("burst-form").addEventListener("submit", (event) => event.preventDefault());
  connect();
  setInterval(watchStream, 250);
  pollTasks();
  setInterval(pollTasks, TASKS_EVERY_MS);
});
