// nettwin web view: plain JS, a canvas map and SVG charts, live over server-sent events. No dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
const ui = {
  grid: null, // {ids, boxes}
  index: null, // cell id -> position in grid.ids
  layer: "traffic",
  layerData: null, // {squares, values}
  valueOf: new Map(),
  rects: null, // Float32Array of screen boxes, 4 per cell
  selected: null,
  stamp: null,
  events: 0,
  lastRefresh: 0,
  refreshTimer: null,
};

async function getJSON(url) {
  const resp = await fetch(url, { cache: "no-store" });
  let body;
  try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function text(id, value) {
  const el = document.getElementById(id);
  if (el) el.textContent = value === null || value === undefined ? "–" : String(value);
}

function fmt(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en");
  return v.toFixed(digits).replace(/\.0+$/, "");
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function isoTime(ms) { return new Date(ms).toISOString().replace(".000Z", "Z").replace("T", " "); }

// ---- colours ---------------------------------------------------------------------------------------------

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function ramp(t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  const a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return `rgb(${Math.round(a[0] + f * (b[0] - a[0]))},${Math.round(a[1] + f * (b[1] - a[1]))},${Math.round(a[2] + f * (b[2] - a[2]))})`;
}
const CATEGORICAL = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const FLAGS = [["fine", "#90a4ae"], ["traffic flagged", "#ffb300"], ["update rejected", "#8e24aa"], ["quarantined", "#e53935"]];

function colourer() {
  const vals = ui.layerData ? ui.layerData.values.filter((v) => v !== null && v !== undefined) : [];
  if (ui.layer === "cluster") return (v) => CATEGORICAL[Math.abs(Math.round(v)) % CATEGORICAL.length];
  if (ui.layer === "flagged") return (v) => FLAGS[Math.max(0, Math.min(3, v | 0))][1];
  if (!vals.length) return () => "#b0bec5";
  const sorted = [...vals].sort((a, b) => a - b);
  const lo = sorted[0], hi = sorted[Math.floor(0.98 * (sorted.length - 1))] || sorted[sorted.length - 1];
  if (ui.layer === "traffic") {
    const l0 = Math.log1p(Math.max(0, lo)), l1 = Math.log1p(Math.max(0, hi));
    return (v) => ramp(l1 > l0 ? (Math.log1p(Math.max(0, v)) - l0) / (l1 - l0) : 0.5);
  }
  return (v) => ramp(hi > lo ? (v - lo) / (hi - lo) : 0.5);
}

function drawLegend() {
  const el = $("#legend");
  const label = ui.layerData ? esc(ui.layerData.label) : "";
  if (ui.layer === "cluster") {
    const ids = [...new Set(ui.layerData ? ui.layerData.values : [])].sort((a, b) => a - b);
    el.innerHTML = `${label}: ` + ids.map((c) => `<span><span class="swatch" style="background:${CATEGORICAL[Math.abs(c) % CATEGORICAL.length]}"></span>cluster ${esc(c)}</span>`).join("");
  } else if (ui.layer === "flagged") {
    el.innerHTML = `${label}: ` + FLAGS.map(([n, c]) => `<span><span class="swatch" style="background:${c}"></span>${n}</span>`).join("");
  } else {
    const vals = ui.layerData ? ui.layerData.values.filter((v) => v !== null) : [];
    const lo = vals.length ? Math.min(...vals) : 0, hi = vals.length ? Math.max(...vals) : 0;
    const stops = VIRIDIS.map((c, i) => `rgb(${c.join(",")}) ${(100 * i) / (VIRIDIS.length - 1)}%`).join(",");
    el.innerHTML = `${label}: ${fmt(lo)} <span class="ramp" style="background:linear-gradient(90deg,${stops})"></span> ${fmt(hi)}${ui.layer === "traffic" ? " (log scale)" : ""}`;
  }
}

// ---- the map ---------------------------------------------------------------------------------------------

function layoutMap() {
  const canvas = $("#map");
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = ui.grid;
  if (!g) return;
  const boxes = g.boxes, n = g.ids.length;
  // the extent to show: every cell, or (zoom to data) the cells with a value, padded
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  const useData = $("#fit-data").checked && ui.valueOf.size > 0;
  for (let i = 0; i < n; i++) {
    if (useData && !ui.valueOf.has(g.ids[i])) continue;
    x0 = Math.min(x0, boxes[4 * i]); y0 = Math.min(y0, boxes[4 * i + 1]);
    x1 = Math.max(x1, boxes[4 * i + 2]); y1 = Math.max(y1, boxes[4 * i + 3]);
  }
  if (!Number.isFinite(x0)) { x0 = 0; y0 = 0; x1 = 1; y1 = 1; }
  const padX = (x1 - x0) * 0.08 + 1, padY = (y1 - y0) * 0.08 + 1;
  x0 -= padX; x1 += padX; y0 -= padY; y1 += padY;
  const scale = Math.min(w / (x1 - x0), h / (y1 - y0));
  const ox = (w - scale * (x1 - x0)) / 2, oy = (h - scale * (y1 - y0)) / 2;
  const rects = new Float32Array(4 * n);
  for (let i = 0; i < n; i++) {
    rects[4 * i] = ox + (boxes[4 * i] - x0) * scale;
    rects[4 * i + 1] = oy + (boxes[4 * i + 1] - y0) * scale;
    rects[4 * i + 2] = ox + (boxes[4 * i + 2] - x0) * scale;
    rects[4 * i + 3] = oy + (boxes[4 * i + 3] - y0) * scale;
  }
  ui.rects = rects;
}

function drawMap() {
  const canvas = $("#map");
  const ctx = canvas.getContext("2d");
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!ui.grid || !ui.rects) return;
  const colour = colourer();
  const ids = ui.grid.ids, r = ui.rects, n = ids.length;
  ctx.fillStyle = "#dfe5ea"; // cells without data: one batched path
  ctx.beginPath();
  for (let i = 0; i < n; i++) if (!ui.valueOf.has(ids[i])) ctx.rect(r[4 * i], r[4 * i + 1], r[4 * i + 2] - r[4 * i], r[4 * i + 3] - r[4 * i + 1]);
  ctx.fill();
  for (let i = 0; i < n; i++) {
    const v = ui.valueOf.get(ids[i]);
    if (v === undefined || v === null) continue;
    ctx.fillStyle = colour(v);
    ctx.fillRect(r[4 * i], r[4 * i + 1], r[4 * i + 2] - r[4 * i], r[4 * i + 3] - r[4 * i + 1]);
  }
  if (ui.selected !== null && ui.index.has(ui.selected)) {
    const i = ui.index.get(ui.selected);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
    ctx.strokeRect(r[4 * i] - 1, r[4 * i + 1] - 1, r[4 * i + 2] - r[4 * i] + 2, r[4 * i + 3] - r[4 * i + 1] + 2);
  }
  const shown = ui.layerData ? ui.layerData.squares.length : 0;
  $("#map-info").textContent = `${ids.length.toLocaleString("en")} cells, ${shown.toLocaleString("en")} with data`;
}

function cellAt(x, y) {
  const r = ui.rects;
  if (!r) return null;
  for (let i = 0, n = ui.grid.ids.length; i < n; i++) {
    if (x >= r[4 * i] && x < r[4 * i + 2] && y >= r[4 * i + 1] && y < r[4 * i + 3]) return ui.grid.ids[i];
  }
  return null;
}

// where a cell is drawn (CSS pixels in the canvas), for tests and tools: [x, y] of its centre or null
window.nettwinCellCenter = (id) => {
  if (!ui.rects || !ui.index.has(id)) return null;
  const i = ui.index.get(id), r = ui.rects;
  return [(r[4 * i] + r[4 * i + 2]) / 2, (r[4 * i + 1] + r[4 * i + 3]) / 2];
};
window.nettwinLayer = () => ui.layerData;

function setLayerData(data) {
  ui.layerData = data;
  ui.valueOf = new Map();
  for (let i = 0; i < data.squares.length; i++) ui.valueOf.set(data.squares[i], data.values[i]);
}

async function loadLayer() {
  const data = await getJSON(`/api/layer?name=${encodeURIComponent(ui.layer)}`);
  setLayerData(data);
  layoutMap();
  drawMap();
  drawLegend();
}

function bindMap() {
  const canvas = $("#map"), tip = $("#tooltip");
  canvas.addEventListener("mousemove", (ev) => {
    const rect = canvas.getBoundingClientRect();
    const x = ev.clientX - rect.left, y = ev.clientY - rect.top;
    const id = cellAt(x, y);
    if (id === null) { tip.hidden = true; return; }
    const v = ui.valueOf.get(id);
    const shown = ui.layer === "flagged" && v !== undefined ? FLAGS[v][0] : fmt(v, 2);
    tip.textContent = `square ${id}: ${v === undefined ? "no data" : shown}`;
    tip.style.left = `${x + 12}px`; tip.style.top = `${y + 12}px`; tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (ev) => {
    const rect = canvas.getBoundingClientRect();
    const id = cellAt(ev.clientX - rect.left, ev.clientY - rect.top);
    if (id !== null) selectEntity(id);
  });
  $("#layer").addEventListener("change", (ev) => { ui.layer = ev.target.value; loadLayer().catch(showError); });
  $("#fit-data").addEventListener("change", () => { layoutMap(); drawMap(); });
  window.addEventListener("resize", () => { layoutMap(); drawMap(); });
}

// ---- SVG charts --------------------------------------------------------------------------------------------

function lineChart(el, series, opts = {}) {
  const W = el.clientWidth || 520, H = opts.height || 180, L = 44, R = 8, T = 8, B = 22;
  const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!pts.length) { el.innerHTML = `<p class="muted">${esc(opts.empty || "no data yet")}</p>`; return; }
  let xmin = Math.min(...pts.map((p) => p[0])), xmax = Math.max(...pts.map((p) => p[0]));
  let ymin = Math.min(...pts.map((p) => p[1])), ymax = Math.max(...pts.map((p) => p[1]));
  if (opts.zero) ymin = Math.min(0, ymin);
  if (xmax === xmin) xmax = xmin + 1;
  if (ymax === ymin) ymax = ymin + 1;
  const sx = (x) => L + ((x - xmin) / (xmax - xmin)) * (W - L - R);
  const sy = (y) => T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B);
  let svg = `<svg width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img">`;
  svg += `<line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"/><line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"/>`;
  svg += `<text x="${L - 4}" y="${T + 8}" text-anchor="end">${fmt(ymax, 2)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">${fmt(ymin, 2)}</text>`;
  svg += `<text x="${L}" y="${H - 6}">${esc(isoTime(xmin))}</text><text x="${W - R}" y="${H - 6}" text-anchor="end">${esc(isoTime(xmax))}</text>`;
  for (const s of series) {
    const p = s.points.filter((q) => q[1] !== null && q[1] !== undefined);
    if (!p.length) continue;
    let d = "";
    p.forEach((q, i) => {
      const x = sx(q[0]).toFixed(1), y = sy(q[1]).toFixed(1);
      if (i === 0) d += `M${x},${y}`;
      else if (s.step) d += `H${x}V${y}`;
      else d += `L${x},${y}`;
    });
    svg += `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="${s.width || 1.5}"${s.dash ? ' stroke-dasharray="4 3"' : ""}/>`;
  }
  svg += "</svg>";
  const legend = series.map((s) => `<span class="legend-line"><span class="swatch" style="background:${s.color}"></span>${esc(s.name)}</span>`).join("");
  el.innerHTML = svg + `<div>${legend}</div>`;
}

function table(el, columns, rows, empty) {
  if (!rows.length) { el.innerHTML = `<tr><td class="muted">${esc(empty || "none")}</td></tr>`; return; }
  el.innerHTML = `<tr>${columns.map((c) => `<th>${esc(c[0])}</th>`).join("")}</tr>` +
    rows.map((r) => `<tr>${columns.map((c) => `<td>${c[1](r)}</td>`).join("")}</tr>`).join("");
}

// ---- entity panel ---------------------------------------------------------------------------------------

async function selectEntity(square) {
  ui.selected = square;
  drawMap();
  text("entity-square", `square ${square}`);
  try {
    const e = await getJSON(`/api/entity?square=${square}`);
    if (ui.selected !== square) return;
    renderEntity(e);
  } catch (err) {
    $("#entity-body").innerHTML = `<p class="muted">${esc(err.message)}</p>`;
  }
}

function renderEntity(e) {
  const now = e.membership.length ? e.membership[e.membership.length - 1].cluster : "–";
  const body = $("#entity-body");
  body.className = "";
  body.innerHTML = `
    <div class="errs"><span>cluster <b>${esc(now)}</b></span><span>BS twin version <b data-testid="entity-bs-version">${esc(e.bs_version ?? "–")}</b></span><span>traffic now <b>${fmt(e.traffic, 1)}</b></span></div>
    <h3>actual vs forecast (${e.series.length} hours)</h3><div id="chart-entity"></div>
    <div class="errs"><span>MAE forecast <b data-testid="entity-mae">${fmt(e.mae, 2)}</b></span><span>MAE persistence <b data-testid="entity-persistence-mae">${fmt(e.persistence_mae, 2)}</b></span><span class="muted">over ${e.scored} hours with outcomes</span></div>
    <h3>cluster history</h3><table id="entity-membership"></table>
    <h3>update decisions</h3><table id="entity-decisions" data-testid="entity-decisions"></table>`;
  lineChart($("#chart-entity"), [
    { name: "actual", color: "#17212b", points: e.series.map((r) => [r[0], r[1]]) },
    { name: "forecast", color: "#1e88e5", points: e.series.map((r) => [r[0], r[2]]) },
    { name: "persistence", color: "#fb8c00", dash: true, width: 1, points: e.series.map((r) => [r[0], r[3]]) },
  ], { height: 170, empty: "no forecasts for this square yet" });
  table($("#entity-membership"), [["time", (r) => esc(isoTime(r.time))], ["epoch", (r) => esc(r.epoch)], ["cluster", (r) => esc(r.cluster)]], e.membership, "not clustered");
  table($("#entity-decisions"), [
    ["time", (r) => esc(isoTime(r.time))],
    ["decision", (r) => `<span class="badge ${esc(r.decision)}">${esc(r.decision)}</span>`],
    ["reason", (r) => esc(r.reason)],
    ["score", (r) => fmt(r.score, 2)],
    ["seq", (r) => esc(r.seq)],
  ], e.decisions, "no updates from this BS yet");
}

// ---- twins and pipeline ------------------------------------------------------------------------------------

async function loadTwins() {
  const t = await getJSON("/api/twins");
  const first = t.global.length ? t.global[0][1] : 0;
  lineChart($("#chart-sync"), [
    { name: "global syncs (merges)", color: "#e53935", step: true, points: t.global.map((p) => [p[0], p[1] - first]) },
    { name: "offers (cluster changes offered)", color: "#1e88e5", step: true, points: t.offers },
  ], { zero: true, empty: "no twins yet: run `nettwin vtwin` / `nettwin demo`" });
  const versions = [{ name: "global", color: "#17212b", width: 2.5, step: true, points: t.global }];
  lineChart($("#chart-clusters"), versions.concat(Object.entries(t.clusters).map(([id, pts], i) => (
    { name: `cluster ${id}`, color: CATEGORICAL[Number(id) % CATEGORICAL.length] || CATEGORICAL[i % 10], step: true, points: pts }))), { zero: true });
  table($("#epochs"), [
    ["epoch", (r) => esc(r.epoch)], ["time", (r) => esc(isoTime(r.time))],
    ["cluster sizes", (r) => esc(Object.entries(r.sizes).map(([c, n]) => `${c}: ${n}`).join(", "))],
  ], t.epochs, "no membership yet");
  const models = Object.entries(t.kafka.twins).sort();
  table($("#models"), [
    ["key", (r) => esc(r[0])], ["version", (r) => esc(r[1].version)], ["as of hour", (r) => esc(r[1].as_of ?? "")],
    ["members", (r) => esc(r[1].members || "")], ["epoch", (r) => esc(r[1].epoch ?? "")],
  ], models, t.kafka.ok ? "twin.models is empty" : (t.kafka.error || "Kafka unreachable"));
}

async function loadPipeline() {
  const p = await getJSON("/api/pipeline");
  const colours = ["#1e88e5", "#43a047", "#fb8c00"];
  lineChart($("#chart-rate"), Object.entries(p.rate).map(([w, pts], i) => ({ name: `window ${w} s`, color: colours[i % 3], points: pts })),
    { zero: true, empty: "no records in the last 15 minutes" });
  table($("#deadletters"), [["stage", (r) => esc(r.stage)], ["reason", (r) => esc(r.reason)], ["count", (r) => esc(r.count)]],
    p.deadletters, p.kafka.ok ? "no dead letters" : (p.kafka.error || "Kafka unreachable"));
  const sources = p.runs.map((r) => ({ kind: "replay run", name: r.run, a: `${r.sent.toLocaleString("en")} sent`, b: `${r.received.toLocaleString("en")} received`, state: r.sent === r.received ? "complete" : "incomplete" }))
    .concat(p.sensors.map((s) => ({ kind: "sensor source", name: s.source, a: `${s.points} points`, b: `${s.flagged} flagged`, state: "screened" })))
    .concat(p.attached.map((s) => ({ kind: "attached source", name: s.source, a: s.newest_ms ? `newest record ${isoTime(s.newest_ms)}` : "", b: s.entity ? `entity ${s.entity}` : "", state: "connection: nettwin attach /metrics" })));
  table($("#sources"), [["kind", (r) => esc(r.kind)], ["name", (r) => esc(r.name)], ["", (r) => esc(r.a)], ["", (r) => esc(r.b)], ["state", (r) => esc(r.state)]], sources, "no source has reported yet");
}

// ---- the live state -------------------------------------------------------------------------------------

function renderState(s) {
  const okInflux = s.influx && s.influx.ok, okKafka = s.kafka && s.kafka.ok;
  $("#health-influx").className = `dot ${okInflux ? "ok" : "bad"}`;
  $("#health-kafka").className = `dot ${okKafka ? "ok" : "bad"}`;
  text("database", s.database);
  const problems = [];
  if (!okInflux) problems.push(`InfluxDB unreachable: ${s.influx ? s.influx.error : "?"} (retrying)`);
  if (!okKafka) problems.push(`Kafka unreachable: ${s.kafka ? s.kafka.error : "?"} (retrying)`);
  const banner = $("#banner");
  banner.hidden = !problems.length;
  banner.textContent = problems.join(" · ");
  if (s.twins) {
    text("global-version", s.twins.global_version);
    text("global-syncs", s.twins.global_syncs);
    text("sync-offers", s.twins.sync_offers);
    text("membership-epochs", s.twins.membership_epochs);
    text("updates-accepted", s.twins.updates.accepted || 0);
    text("updates-quarantined", s.twins.updates.quarantined || 0);
    text("updates-rejected", s.twins.updates.rejected || 0);
  }
  if (s.forecasts) text("forecasts-scored", s.forecasts.scored.toLocaleString("en"));
  if (s.pipeline) {
    const rates = Object.values(s.pipeline.records_per_s);
    text("records-per-s", rates.length ? fmt(Math.max(...rates), 1) : 0);
    text("lag-p50", fmt(s.pipeline.lag_15m.p50, 0));
    text("lag-p99", fmt(s.pipeline.lag_15m.p99, 0));
    text("lag-all-p50", fmt(s.pipeline.lag_all.p50, 0));
    text("lag-all-p99", fmt(s.pipeline.lag_all.p99, 0));
  }
  if (s.kafka) text("deadletter-total", s.kafka.deadletter_total);
}

function refreshViews() {
  // at most one refresh of the heavier reads per 2 s, however fast states arrive
  const wait = Math.max(0, 2000 - (Date.now() - ui.lastRefresh));
  if (ui.refreshTimer) return;
  ui.refreshTimer = setTimeout(() => {
    ui.refreshTimer = null;
    ui.lastRefresh = Date.now();
    loadLayer().catch(showError);
    loadTwins().catch(showError);
    loadPipeline().catch(showError);
    if (ui.selected !== null) selectEntity(ui.selected);
  }, wait);
}

function showError(err) {
  const banner = $("#banner");
  banner.hidden = false;
  banner.textContent = `${err.message} (retrying)`;
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => { $("#health-live").className = "dot ok"; });
  source.addEventListener("error", () => { $("#health-live").className = "dot bad"; });
  source.addEventListener("state", (ev) => {
    const s = JSON.parse(ev.data);
    ui.events += 1;
    text("live-events", ui.events);
    renderState(s);
    if (s.stamp && s.stamp !== ui.stamp) {
      const first = ui.stamp === null;
      ui.stamp = s.stamp;
      if (!first) refreshViews();
    }
  });
}

async function start() {
  bindMap();
  const [grid, layer] = await Promise.all([getJSON("/api/grid"), getJSON(`/api/layer?name=${ui.layer}`).catch((e) => { showError(e); return { squares: [], values: [], label: "" }; })]);
  ui.grid = grid;
  ui.index = new Map(grid.ids.map((id, i) => [id, i]));
  setLayerData(layer);
  layoutMap();
  drawMap();
  drawLegend();
  requestAnimationFrame(() => {
    const ms = Math.round(performance.now());
    window.nettwinFirstPaintMs = ms;
    text("first-paint-ms", ms);
  });
  connect();
  loadTwins().catch(showError);
  loadPipeline().catch(showError);
}

start().catch(showError);
