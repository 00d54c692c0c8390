// civicmesh dashboard: a small single-page app with no dependencies. Everything it
// loads comes from this server; charts and the map are drawn as SVG here.

const main = document.getElementById("main");
const liveRegion = document.getElementById("live-region");
const SVG = "http://www.w3.org/2000/svg";
let me = null;
let liveSource = null;
let liveCount = 0;
let METRICS = {}; // metric id -> {label, unit, digits}, from /dashboard/api/me

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: options.body ? { "content-type": "application/json" } : {},
    ...options,
  });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (response.status === 401) throw new Unauthorized(typeof body?.detail === "string" ? body.detail : "Sign in first");
  if (!response.ok) {
    const detail = body?.detail;
    const message = typeof detail === "string" ? detail : detail?.message || response.statusText;
    const error = new Error(message);
    error.detail = detail;
    error.status = response.status;
    throw error;
  }
  return body;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? value.toLocaleString("en-GB", { maximumFractionDigits: digits }) : String(value);
}

// A metric as people read it: "Relative humidity 81 %", "PM2.5 12.3 µg/m³".
function metricName(metric) {
  return METRICS[metric]?.label || metric;
}

function metricValue(metric, value) {
  const info = METRICS[metric];
  if (!info) return `${metric} ${fmt(value, 2)}`;
  return `${info.label} ${fmt(value, info.digits)} ${info.unit}`;
}

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" }) : "never";
}

function show(...nodes) {
  main.replaceChildren(...nodes);
  main.focus({ preventScroll: true });
}

const TITLES = { overview: "City overview", devices: "Device health", ask: "Ask", admin: "Admin", "": "Sign in" };

function setNav(page, title) {
  document.title = `${title || TITLES[page] || "civicmesh"} — civicmesh`;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

// ---------------------------------------------------------------------- map

function rings(geometry) {
  if (!geometry) return [];
  if (geometry.type === "Polygon") return [geometry.coordinates];
  if (geometry.type === "MultiPolygon") return geometry.coordinates;
  return [];
}

function drawMap(collection, devices) {
  const points = [];
  for (const f of collection.features) for (const poly of rings(f.geometry)) for (const p of poly[0]) points.push(p);
  for (const d of devices) if (d.lon !== null && d.lat !== null) points.push([d.lon, d.lat]);
  if (!points.length) return el("p", { class: "note", text: "No zone shapes or device positions to draw." });
  const lons = points.map((p) => p[0]), lats = points.map((p) => p[1]);
  const [w0, e0, s0, n0] = [Math.min(...lons), Math.max(...lons), Math.min(...lats), Math.max(...lats)];
  const k = Math.cos(((s0 + n0) / 2) * Math.PI / 180);
  const width = 800, pad = 20;
  const spanX = Math.max((e0 - w0) * k, 1e-6), spanY = Math.max(n0 - s0, 1e-6);
  const scale = (width - 2 * pad) / spanX;
  const height = Math.round(spanY * scale + 2 * pad);
  const x = (lon) => pad + (lon - w0) * k * scale;
  const y = (lat) => pad + (n0 - lat) * scale;
  const map = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Map of zones coloured by air quality index" });
  const labels = [];
  for (const f of collection.features) {
    const p = f.properties;
    const d = rings(f.geometry).map((poly) => poly.map((ring) => "M" + ring.map((c) => `${x(c[0]).toFixed(1)},${y(c[1]).toFixed(1)}`).join("L") + "Z").join("")).join("");
    if (!d) continue;
    const title = `${p.label}: ${p.aqi === null ? "no data" : `AQI ${p.aqi} (${p.category})`}`;
    const shape = svg("path", { d, class: "zone", fill: p.color, tabindex: "0", role: "link", "aria-label": title, "data-zone": p.zone },
      svg("title", {}, document.createTextNode(title)));
    const open = () => { location.hash = `#/zone/${encodeURIComponent(p.zone)}`; };
    shape.addEventListener("click", open);
    shape.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    map.append(shape);
    const ring = rings(f.geometry)[0]?.[0] || [];
    if (ring.length) {
      const cx = ring.reduce((a, c) => a + x(c[0]), 0) / ring.length, cy = ring.reduce((a, c) => a + y(c[1]), 0) / ring.length;
      labels.push({ zone: p.zone, text: `${p.label} · AQI ${p.aqi ?? "–"}`, cx, cy });
    }
  }
  const dots = [];
  for (const dev of devices) {
    if (dev.lon === null || dev.lat === null) continue;
    dots.push({ x: x(dev.lon), y: y(dev.lat) });
    map.append(svg("circle", { cx: x(dev.lon).toFixed(1), cy: y(dev.lat).toFixed(1), r: 6, class: "device", fill: dev.online ? "#0a6b2d" : "#a4000f", "data-device": dev.device_id },
      svg("title", {}, document.createTextNode(`${dev.device_id} (${dev.zone}): ${dev.online ? "online" : "offline"}`))));
  }
  // The map is drawn 800 units wide and shown at the panel's width: labels are sized so
  // that they read at about 13 px on screen, on a phone as on a desktop.
  const shown = main.clientWidth >= 700 ? main.clientWidth / 2 - 60 : main.clientWidth - 70;
  const grow = Math.min(2.5, Math.max(1, width / Math.max(200, shown)));
  for (const box of placeLabels(labels, dots, width, height, grow)) {
    const text = svg("text", { x: box.x.toFixed(1), y: (box.y + box.h - 4 * grow).toFixed(1), class: "label", "data-label-zone": box.zone }, document.createTextNode(box.text));
    text.style.fontSize = `${(13 * grow).toFixed(1)}px`;
    map.append(text);
  }
  map.append(scaleBar(width, height, scale / k, grow));
  return map;
}

// Zone labels never overlap each other or a device dot: each label tries positions
// around its zone's centre (nearest first) and takes the first free one inside the map.
const LABEL_H = 18, CHAR_W = 7.6;
function placeLabels(labels, dots, width, height, grow = 1) {
  const placed = [];
  const hits = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
  const obstacles = dots.map((d) => ({ x: d.x - 8, y: d.y - 8, w: 16, h: 16 }));
  const lh = LABEL_H * grow;
  const offsets = [[0, 0]];
  for (const r of [1, 2, 3, 4.5, 6.5, 9]) for (const [dx, dy] of [[0, -1], [0, 1], [1, 0], [-1, 0], [1, -1], [-1, -1], [1, 1], [-1, 1]]) offsets.push([dx * r * lh * 1.5, dy * r * lh]);
  for (const l of labels) {
    const w = (l.text.length * CHAR_W + 8) * grow;
    let chosen = null;
    for (const [dx, dy] of offsets) {
      const box = { x: l.cx + dx - w / 2, y: l.cy + dy - lh / 2, w, h: lh };
      if (box.x < 2 || box.y < 2 || box.x + w > width - 2 || box.y + lh > height - 30 * grow) continue;
      if (placed.some((b) => hits(b, box)) || obstacles.some((b) => hits(b, box))) continue;
      chosen = box;
      break;
    }
    if (!chosen) continue; // no free spot: the zone list below the map still names it
    placed.push({ ...chosen, text: l.text, zone: l.zone });
  }
  return placed;
}

// A scale bar of a round length and a north arrow: the only place context drawn
// without map tiles.
function scaleBar(width, height, pxPerDegLat, grow = 1) {
  const pxPerM = pxPerDegLat / 111_320;
  const target = width / 5 / pxPerM;
  const nice = [1, 2, 5].flatMap((m) => [1, 10, 100, 1000, 10000, 100000].map((p) => m * p)).sort((a, b) => a - b);
  const metres = nice.filter((v) => v <= target).pop() || nice[0];
  const len = metres * pxPerM;
  const x0 = 12, y0 = height - 12;
  const text = metres >= 1000 ? `${metres / 1000} km` : `${metres} m`;
  const g = grow;
  const group = svg("g", { class: "scale", "data-metres": String(metres) },
    svg("path", { d: `M${x0},${y0 - 6 * g}V${y0}H${(x0 + len).toFixed(1)}V${y0 - 6 * g}` }),
    svg("text", { x: (x0 + len + 6 * g).toFixed(1), y: y0, class: "scale-label" }, document.createTextNode(text)),
    svg("path", { d: `M${width - 20 * g},${y0 - 4 * g}l${6 * g},${-18 * g}l${6 * g},${18 * g}l${-6 * g},${-5 * g}z`, class: "north" }),
    svg("text", { x: width - 14 * g, y: y0 - 26 * g, class: "scale-label", "text-anchor": "middle" }, document.createTextNode("N")));
  for (const t of group.querySelectorAll("text")) t.style.fontSize = `${(12 * g).toFixed(1)}px`;
  return group;
}

const AQI_LEGEND = [["Good", "#00E400"], ["Moderate", "#FFFF00"], ["Unhealthy for Sensitive Groups", "#FF7E00"], ["Unhealthy", "#FF0000"], ["Very Unhealthy", "#8F3F97"], ["Hazardous", "#7E0023"], ["No data", "#9e9e9e"]];

// -------------------------------------------------------------------- charts

// Ticks on round values: steps of 1, 2 or 5 × 10^n, about `target` of them.
function niceStep(span, target) {
  const raw = Math.max(span, 1e-9) / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw * 0.999);
}

function niceTicks(lo, hi, target = 5) {
  if (hi <= lo) hi = lo + 1;
  const step = niceStep(hi - lo, target);
  const first = Math.floor(lo / step + 1e-9) * step, last = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let v = first; v <= last + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  return { ticks, step };
}

const HOUR = 3_600_000, DAY = 24 * HOUR;
// Time ticks at round local hours or midnights; every label that starts a new day names it.
function timeTicks(t0, t1, target = 5) {
  const steps = [HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY];
  const step = steps.find((s) => (t1 - t0) / s <= target) || steps[steps.length - 1];
  const ticks = [];
  const d = new Date(t0);
  if (step < DAY) {
    const hours = step / HOUR;
    d.setMinutes(0, 0, 0);
    while (d.getTime() < t0 || d.getHours() % hours) d.setHours(d.getHours() + 1);
    for (; d.getTime() <= t1; d.setHours(d.getHours() + hours)) ticks.push(d.getTime());
  } else {
    d.setHours(0, 0, 0, 0);
    if (d.getTime() < t0) d.setDate(d.getDate() + 1);
    for (; d.getTime() <= t1; d.setDate(d.getDate() + step / DAY)) ticks.push(d.getTime());
  }
  let lastDay = null;
  return ticks.map((t) => {
    const date = new Date(t);
    const day = date.toLocaleDateString("en-GB", { day: "numeric", month: "short" });
    const time = date.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
    const label = step >= DAY ? [day, ""] : [time, day !== lastDay ? day : ""];
    lastDay = day;
    return { t, label };
  });
}

const RESOLUTION_WORDS = { raw: "readings", "1m": "minute means", "1h": "hourly means", "1d": "daily means (UTC days)" };

function drawChart(chart) {
  const pts = chart.points;
  const width = 480, height = 244, left = 50, right = 12, top = 12, bottom = 42;
  const digits = chart.digits ?? 1;
  const box = el("figure", { class: "chart panel", "data-metric": chart.metric, "data-points": String(pts.length) });
  box.append(el("figcaption", {}, el("h3", { text: `${chart.label} (${chart.unit})` })));
  if (!pts.length) {
    box.append(el("p", { class: "note", text: "No data in this range." }));
    return box;
  }
  const times = pts.map((p) => Date.parse(p.t));
  const avg = (chart.average?.points || []).map((p) => ({ t: Date.parse(p.t), v: p.mean }));
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const guides = chart.guides || [];
  const lows = pts.map((p) => p.min ?? p.mean), highs = pts.map((p) => p.max ?? p.mean);
  // Every guideline is always inside the plot, so each zone's chart shows it.
  const { ticks: yTicks, step: yStep } = niceTicks(Math.min(0, ...lows), Math.max(...highs, ...avg.map((a) => a.v), ...guides.map((g) => g.value)));
  const yMin = yTicks[0], yMax = yTicks[yTicks.length - 1];
  const X = (t) => left + (t1 === t0 ? 0.5 : (t - t0) / (t1 - t0)) * (width - left - right);
  const Y = (v) => top + (1 - (v - yMin) / (yMax - yMin)) * (height - top - bottom);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${chart.label} in ${chart.unit}: ${pts.length} points from ${localTime(pts[0].t)} to ${localTime(pts[pts.length - 1].t)}` });
  const yDigits = Math.max(0, -Math.floor(Math.log10(yStep) + 1e-9));
  for (const v of yTicks) {
    plot.append(svg("line", { x1: left, x2: width - right, y1: Y(v), y2: Y(v), class: "grid" }));
    plot.append(svg("text", { x: left - 6, y: Y(v) + 4, class: "tick y-tick", "text-anchor": "end" }, document.createTextNode(fmt(v, yDigits))));
  }
  plot.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }));
  plot.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }));
  for (const { t, label } of timeTicks(t0, t1)) {
    const tx = X(t);
    const anchor = tx < left + 20 ? "start" : tx > width - right - 20 ? "end" : "middle";
    plot.append(svg("line", { x1: tx, x2: tx, y1: height - bottom, y2: height - bottom + 4, class: "axis" }));
    plot.append(svg("text", { x: tx, y: height - bottom + 16, class: "tick x-tick", "text-anchor": anchor, "data-t": new Date(t).toISOString() },
      svg("tspan", { x: tx }, document.createTextNode(label[0])),
      label[1] ? svg("tspan", { x: tx, dy: 14, class: "tick-date" }, document.createTextNode(label[1])) : null));
  }
  const upper = pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(highs[i]).toFixed(1)}`);
  const lower = pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(lows[i]).toFixed(1)}`).reverse();
  plot.append(svg("polygon", { points: upper.concat(lower).join(" "), class: "band" }));
  plot.append(svg("polyline", { points: pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(p.mean).toFixed(1)}`).join(" "), class: "line" }));
  const shown = avg.filter((a) => a.t >= t0 && a.t <= t1);
  if (shown.length) plot.append(svg("polyline", { points: shown.map((a) => `${X(a.t).toFixed(1)},${Y(a.v).toFixed(1)}`).join(" "), class: "avg-line", "data-hours": String(chart.average.hours) }));
  for (const g of guides) {
    plot.append(svg("line", { x1: left, x2: width - right, y1: Y(g.value), y2: Y(g.value), class: "guide", "data-over": g.over }));
    plot.append(svg("text", { x: width - right - 4, y: Y(g.value) - 4, class: "guide-label", "text-anchor": "end" }, document.createTextNode(`${g.label}: ${fmt(g.value, 1)}`)));
  }
  box.append(plot);
  const key = el("p", { class: "chart-key" },
    el("span", {}, el("i", { class: "key-line" }), RESOLUTION_WORDS[chart.resolution] || "mean"),
    chart.min !== false && pts.some((p) => p.min !== undefined && p.min !== null) ? el("span", {}, el("i", { class: "key-band" }), "lowest–highest") : null,
    shown.length ? el("span", {}, el("i", { class: "key-avg" }), `${chart.average.label} (trailing)`) : null,
    guides.map((g) => el("span", {}, el("i", { class: "key-guide" }), g.over === "average" ? `${g.label}, read against the ${chart.average.label}` : `${g.label}, read against the daily means`)));
  box.append(key);
  return box;
}

// --------------------------------------------------------------------- pages

function renderLogin(message) {
  setNav("");
  document.getElementById("nav-admin").hidden = true;
  const error = el("p", { class: "error", role: "alert", text: message || "" });
  const form = el("form", { "aria-label": "Sign in" },
    el("label", {}, "User name", el("input", { name: "username", autocomplete: "username", required: true })),
    el("label", {}, "Password", el("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    el("button", { type: "submit", text: "Sign in" }), error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    try {
      await api("/dashboard/auth/login", { method: "POST", body: JSON.stringify(data) });
      me = null;
      await route();
    } catch (e) {
      error.textContent = e.message;
    }
  });
  show(el("section", { class: "login panel" }, el("h2", { text: "Sign in" }), form));
  form.querySelector("input").focus();
}

async function renderOverview() {
  setNav("overview");
  const canSeeAlerts = me.role === "operator" || me.role === "admin";
  const [data, alerts] = await Promise.all([
    api("/dashboard/api/overview"),
    canSeeAlerts ? api("/dashboard/api/alerts").catch((e) => ({ error: e.message })) : null,
  ]);
  const h = data.headline;
  const stats = el("div", { class: "headline" },
    el("div", { class: "stat" }, el("div", { class: "v", text: `${h.devices_online} / ${h.devices_total}` }), el("div", { class: "k", text: "devices online" })),
    el("div", { class: "stat" }, el("div", { class: "v", text: fmt(h.readings_24h, 0) }), el("div", { class: "k", text: "readings in 24 h" })),
    el("div", { class: "stat" }, el("div", { class: "v", text: h.worst_zone ? `${h.worst_aqi}` : "–" }), el("div", { class: "k", text: h.worst_zone ? `highest AQI: ${h.worst_zone} (${h.worst_category})` : "no AQI yet" })));
  const legend = el("div", { class: "legend", "aria-label": "AQI colours" }, AQI_LEGEND.map(([name, color]) => el("span", {}, el("i", { class: "swatch", style: `background:${color}` }), name)));
  const summary = data.summary
    ? el("section", { class: "panel", "aria-labelledby": "sum-h" }, el("h3", { id: "sum-h", text: `Latest city summary (${data.summary.kind})` }),
        el("p", { class: "report", id: "city-summary", text: data.summary.text }),
        el("p", { class: "note", text: `Written by ${data.summary.narrative.source === "llm" ? `the language model (${data.summary.narrative.model})` : "fixed templates"}; ${data.summary.ledger.batches} verified batches.` }))
    : el("section", { class: "panel" }, el("h3", { text: "Latest city summary" }), el("p", { class: "note", text: "No city report yet." }));
  const zoneList = el("ul", {}, data.zones.features.map((f) => el("li", {}, el("a", { href: `#/zone/${encodeURIComponent(f.properties.zone)}`, text: `${f.properties.label}` }), ` — AQI ${f.properties.aqi ?? "–"} (${f.properties.category})`)));
  const live = el("ol", { class: "live", id: "live-list", "aria-label": "Newest readings" });
  show(
    el("h2", { text: "City overview" }), alerts ? alertPanel(alerts) : null, stats,
    el("div", { class: "grid" },
      el("section", { class: "panel map", "aria-labelledby": "map-h" }, el("h3", { id: "map-h", text: "Zones by current US AQI" }), drawMap(data.zones, data.devices), legend, zoneList),
      el("div", {}, summary, el("section", { class: "panel", "aria-labelledby": "live-h" }, el("h3", { id: "live-h", text: "Live readings" }), el("p", { class: "note", id: "live-count", text: "Waiting for new readings…" }), live))));
}

async function renderZone(zone, params) {
  setNav("overview");
  const range = params.get("range") || "24h";
  const query = new URLSearchParams({ range });
  if (range === "custom") { query.set("start", params.get("start")); query.set("end", params.get("end")); }
  const data = await api(`/dashboard/api/zones/${encodeURIComponent(zone)}?${query}`);
  setNav("overview", `${data.label}, ${range === "custom" ? "custom range" : range}`);
  const buttons = ["24h", "7d", "30d"].map((r) => el("button", { type: "button", class: "secondary", "aria-pressed": String(r === range), onclick: () => { location.hash = `#/zone/${encodeURIComponent(zone)}?range=${r}`; } }, r === "24h" ? "24 hours" : r === "7d" ? "7 days" : "30 days"));
  const start = el("input", { type: "datetime-local", name: "start", "aria-label": "From" });
  const end = el("input", { type: "datetime-local", name: "end", "aria-label": "To" });
  const custom = el("form", { class: "controls", "aria-label": "Custom range" }, el("label", {}, "From", start), el("label", {}, "To", end), el("button", { type: "submit", text: "Show" }));
  custom.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!start.value || !end.value) return;
    const s = new Date(start.value).toISOString(), t = new Date(end.value).toISOString();
    location.hash = `#/zone/${encodeURIComponent(zone)}?range=custom&start=${encodeURIComponent(s)}&end=${encodeURIComponent(t)}`;
  });
  const reportPanel = (kind) => {
    const r = data.reports[kind];
    const panel = el("section", { class: "panel", "aria-label": `${kind} report` }, el("h3", { text: kind === "daily" ? "Daily report" : "Weekly report" }));
    if (!r) { panel.append(el("p", { class: "note", text: "Not written yet." })); }
    else {
      panel.append(el("p", { class: "report", text: r.text }),
        el("p", { class: "note", text: `${r.narrative.source === "llm" ? "Language model" : "Fixed templates"} · ${r.ledger.batches} verified batches · ledger digest ${r.ledger.digest.slice(0, 12)}…` }),
        el("details", {}, el("summary", { text: `Facts (${r.facts.length})` }), factTable(r.facts)));
    }
    if (data.can_write_reports) {
      panel.append(el("button", { type: "button", class: "secondary", onclick: async (e) => {
        e.target.disabled = true; e.target.textContent = "Writing…";
        try { await api("/dashboard/api/reports", { method: "POST", body: JSON.stringify({ kind, zone }) }); await route(); }
        catch (err) { e.target.textContent = err.message; }
      } }, "Write it now"));
    }
    return panel;
  };
  show(
    el("p", {}, el("a", { href: "#/overview", text: "← Overview" })),
    el("h2", { text: `${data.label}` }),
    el("div", { class: "controls", role: "group", "aria-label": "Time range" }, buttons), custom,
    el("p", { class: "note", text: `${localTime(data.start)} – ${localTime(data.end)}, read from the ${data.resolution} rollup` }),
    el("div", { class: "charts" }, data.charts.map(drawChart)),
    el("div", { class: "grid" }, reportPanel("daily"), reportPanel("weekly")));
}

function factTable(facts) {
  return el("div", { class: "table-wrap" }, el("table", { class: "facts" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Fact" }), el("th", { scope: "col", text: "Value" }), el("th", { scope: "col", text: "Window" }))),
    el("tbody", {}, facts.map((f) => el("tr", {}, el("td", { text: f.label }), el("td", { text: f.text }), el("td", { text: `${localTime(f.start)} – ${localTime(f.end)}` }))))));
}

async function renderDevices() {
  setNav("devices");
  const rows = await api("/dashboard/api/devices");
  const heads = ["Device", "Zone", "Status", "Last seen", "Fault flags (24 h)", "Quarantined batches (24 h)", "Outbox backlog", "Model", "Last seq / batches"];
  const cell = (i, attrs, ...children) => el("td", { ...attrs, "data-label": heads[i] }, ...children);
  const body = rows.map((d) => el("tr", { "data-device": d.device_id },
    el("th", { scope: "row", class: "device-id" }, d.device_id),
    cell(1, { text: d.zone }),
    cell(2, {}, el("span", { class: `badge ${d.online ? "on" : "off"}`, text: d.online ? "online" : "offline" })),
    cell(3, { text: localTime(d.last_seen) }),
    cell(4, { class: "flags" }, d.flagged_24h ? el("span", { class: "badge warn", text: `${fmt(d.flagged_24h, 0)} flagged` }) : "none"),
    cell(5, { class: "quarantine" }, d.quarantined_total_24h ? el("span", { class: "badge off", text: `${fmt(d.quarantined_total_24h, 0)} quarantined` }) : "none",
      Object.keys(d.quarantined_24h).length ? el("div", { class: "note", text: Object.entries(d.quarantined_24h).map(([r, n]) => `${r}: ${n}`).join(", ") }) : null),
    cell(6, { text: d.health ? `${d.health.outbox_batches} batches, ${d.health.outbox_readings} readings (${localTime(d.health.reported)})` : "not reported" }),
    cell(7, { text: d.model_version || "–" }),
    cell(8, { text: `${d.last_seq ?? "–"} / ${d.batches}` })));
  const flagged = rows.filter((d) => d.flagged_24h).length, quarantined = rows.filter((d) => d.quarantined_total_24h).length;
  show(el("h2", { text: "Device health" }),
    el("p", { id: "device-summary" }, `${flagged} of ${rows.length} devices with fault-flagged readings, ${quarantined} with quarantined batches in the last 24 hours.`),
    el("p", { class: "note", text: "Fault flags: readings an edge or ingest check marked stuck, spike, drift, out of range or implausible. Quarantined: batches refused at ingest (bad signature, broken chain, …), with their reasons. Outbox backlog is what each agent last reported (unsigned)." }),
    el("div", { class: "table-wrap" }, el("table", { id: "devices", class: "cards" },
      el("thead", {}, el("tr", {}, heads.map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, body))));
}

function alertPanel(data) {
  const panel = el("section", { class: "panel alerts", id: "alerts", "aria-labelledby": "alerts-h" });
  if (data.error) {
    panel.append(el("h3", { id: "alerts-h", text: "Alerts" }), el("p", { class: "note", text: `Alerts could not be read: ${data.error}` }));
    return panel;
  }
  const open = data.open || [];
  if (open.length) panel.classList.add("firing");
  panel.append(el("h3", { id: "alerts-h", text: open.length ? `${open.length} open alert${open.length === 1 ? "" : "s"}` : "No open alerts" }));
  if (!data.configured) panel.append(el("p", { class: "note", text: "No alert rules are configured (alerts.rules; see docs/alerts.md)." }));
  if (open.length) {
    panel.append(el("ul", {}, open.map((a) => el("li", { "data-alert": String(a.id), "data-rule": a.rule_id },
      el("span", { class: `badge sev-${a.severity}`, text: a.severity }), " ",
      el("strong", { text: a.summary || a.rule_id }), ` (${a.rule_id}, ${a.subject}) since ${localTime(a.since || a.opened)}`,
      a.link ? [" · ", el("a", { href: a.link, text: "open" })] : null))));
  }
  const resolved = (data.recent || []).length;
  if (resolved) panel.append(el("p", { class: "note", text: `${resolved} resolved in the last 24 hours.` }));
  return panel;
}

async function renderAsk(params) {
  setNav("ask");
  const input = el("textarea", { name: "question", rows: "2", maxlength: "500", required: true, "aria-describedby": "ask-hint" });
  input.value = params.get("q") || "";
  const out = el("div", { id: "answer", "aria-live": "polite" });
  const form = el("form", { class: "panel", "aria-label": "Ask a question" },
    el("label", {}, "Your question", input),
    el("p", { class: "note", id: "ask-hint", text: "For example: How was NO2 in the harbour last week? Compare PM2.5 in two zones yesterday." }),
    el("button", { type: "submit", text: "Ask" }));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    out.replaceChildren(el("p", { class: "note", text: "Working…" }));
    try {
      const a = await api("/dashboard/api/ask", { method: "POST", body: JSON.stringify({ question: input.value }) });
      const charts = chartsFromSpec(a.chart);
      out.replaceChildren(
        el("section", { class: "panel" }, el("h3", { text: "Answer" }), el("p", { class: "report", id: "answer-text", text: a.text }),
          el("p", { class: "note", text: a.narrative.source === "llm" ? `Planned by ${a.narrative.model}; every number filled in and checked by code.` : `Fixed templates: ${a.narrative.fallback_reason}` })),
        el("section", { class: "panel" }, el("h3", { text: "Facts used" }), factTable(a.facts)),
        el("section", { class: "panel" }, el("h3", { text: "Data" }), el("div", { class: "table-wrap" }, el("table", {},
          el("thead", {}, el("tr", {}, a.table.columns.map((c) => el("th", { scope: "col", text: c })))),
          el("tbody", {}, a.table.rows.map((r) => el("tr", {}, r.map((v) => el("td", { text: fmt(v, 2) })))))))),
        el("div", { class: "charts" }, charts));
    } catch (err) {
      const hint = err.detail?.suggestions?.length ? ` Did you mean: ${err.detail.suggestions.join(", ")}?` : "";
      out.replaceChildren(el("p", { class: "error", role: "alert", text: err.message + hint }));
    }
  });
  show(el("h2", { text: "Ask" }), form, out);
  input.focus();
}

function chartsFromSpec(spec) {
  const values = spec?.data?.values || [];
  const groups = new Map();
  for (const v of values) {
    if (v.time === undefined) continue;
    const key = `${v.metric}|${v.series}`;
    if (!groups.has(key)) groups.set(key, { metric: `${v.metric}`, label: `${metricName(v.metric)} — ${v.series}`, unit: METRICS[v.metric]?.unit || "", digits: METRICS[v.metric]?.digits, points: [], guides: [] });
    groups.get(key).points.push({ t: v.time, mean: v.mean });
  }
  for (const g of groups.values()) {
    // the answer's chart is of hourly means, or daily ones past a week
    const gap = g.points.length > 1 ? Date.parse(g.points[1].t) - Date.parse(g.points[0].t) : 0;
    g.resolution = gap >= DAY ? "1d" : "1h";
  }
  return [...groups.values()].map(drawChart);
}

async function renderAdmin() {
  setNav("admin");
  if (me.role !== "admin") { show(el("h2", { text: "Admin" }), el("p", { class: "error", text: "This page needs the admin role." })); return; }
  const zones = await api("/dashboard/api/admin/zones");
  const result = el("p", { role: "status", id: "admin-result" });
  const reg = el("form", { class: "panel", id: "register-form", "aria-label": "Register a device" },
    el("h3", { text: "Register a device" }),
    el("label", {}, "Public key (base64 Ed25519)", el("input", { name: "public_key", required: true })),
    el("label", {}, "Zone", el("input", { name: "zone", required: true, pattern: "[a-z0-9][a-z0-9-]*" })),
    el("label", {}, "Latitude", el("input", { name: "lat", type: "number", step: "any" })),
    el("label", {}, "Longitude", el("input", { name: "lon", type: "number", step: "any" })),
    el("label", {}, "Kind", el("select", { name: "kind" }, ["multi", "air", "traffic"].map((k) => el("option", { value: k, text: k })))),
    el("label", {}, "Owner (who runs the node)", el("input", { name: "owner", maxlength: "120" })),
    el("button", { type: "submit", text: "Register" }));
  reg.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = Object.fromEntries(new FormData(reg));
    const body = { public_key: d.public_key.trim(), zone: d.zone.trim(), kind: d.kind, owner: d.owner.trim(), lat: d.lat ? Number(d.lat) : null, lon: d.lon ? Number(d.lon) : null };
    try { const r = await api("/dashboard/api/admin/devices", { method: "POST", body: JSON.stringify(body) }); result.textContent = `Registered ${r.device_id} in ${r.zone}.`; }
    catch (err) { result.textContent = `Not registered: ${err.message}`; }
  });
  const move = el("form", { class: "panel", id: "move-form", "aria-label": "Move a device to another zone" },
    el("h3", { text: "Move a device" }),
    el("label", {}, "Device id", el("input", { name: "device_id", required: true })),
    el("label", {}, "New zone", el("input", { name: "zone", required: true, pattern: "[a-z0-9][a-z0-9-]*" })),
    el("button", { type: "submit", text: "Move" }));
  move.addEventListener("submit", async (e) => {
    e.preventDefault();
    const d = Object.fromEntries(new FormData(move));
    try { const r = await api(`/dashboard/api/admin/devices/${encodeURIComponent(d.device_id.trim())}`, { method: "PATCH", body: JSON.stringify({ zone: d.zone.trim() }) }); result.textContent = `Moved ${r.device_id} to ${r.zone}.`; }
    catch (err) { result.textContent = `Not moved: ${err.message}`; }
  });
  const zoneForms = zones.map((z) => {
    const form = el("form", { class: "panel", "aria-label": `Edit zone ${z.zone}` },
      el("h3", { text: `Zone ${z.zone}` }),
      el("label", {}, "Label", el("input", { name: "label", value: z.label, required: true })),
      el("label", {}, "Shape (GeoJSON geometry)", el("textarea", { name: "geometry", rows: "4" })),
      el("button", { type: "submit", text: "Save zone" }));
    form.querySelector("textarea").value = JSON.stringify(z.geometry);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const d = Object.fromEntries(new FormData(form));
      try { await api(`/dashboard/api/admin/zones/${encodeURIComponent(z.zone)}`, { method: "PUT", body: JSON.stringify({ label: d.label, geometry: JSON.parse(d.geometry) }) }); result.textContent = `Saved zone ${z.zone}.`; }
      catch (err) { result.textContent = `Not saved: ${err.message}`; }
    });
    return form;
  });
  show(el("h2", { text: "Admin" }), result, el("div", { class: "grid" }, reg, move, zoneForms));
}

// ---------------------------------------------------------------------- live

function startLive() {
  if (liveSource) return;
  liveSource = new EventSource("/dashboard/api/live");
  liveSource.addEventListener("reading", (event) => {
    const r = JSON.parse(event.data);
    liveCount += 1;
    const list = document.getElementById("live-list");
    if (list) {
      list.prepend(el("li", { "data-device": r.device_id }, `${localTime(r.time)} · ${r.zone} · ${r.label ? `${r.label} ${fmt(r.value, r.digits)} ${r.unit}` : metricValue(r.metric, r.value)} (${r.device_id})`));
      while (list.children.length > 15) list.lastChild.remove();
      const count = document.getElementById("live-count");
      if (count) count.textContent = `${liveCount} new readings since this page opened`;
    }
    if (liveCount % 50 === 1) liveRegion.textContent = `${liveCount} new readings`;
  });
}

// --------------------------------------------------------------------- router

async function route() {
  const [path, query] = (location.hash.slice(1) || "/overview").split("?");
  const params = new URLSearchParams(query || "");
  try {
    if (!me) {
      me = await api("/dashboard/api/me");
      METRICS = me.metrics || {};
      document.getElementById("who").replaceChildren(
        el("span", { text: `${me.user} (${me.role})` }),
        el("button", { type: "button", class: "secondary", onclick: async () => { await api("/dashboard/auth/logout", { method: "POST" }); me = null; liveSource?.close(); liveSource = null; history.replaceState(null, "", "#/overview"); renderLogin(); } }, "Sign out"));
      document.getElementById("nav-admin").hidden = me.role !== "admin";
      startLive();
    }
    const parts = path.split("/").filter(Boolean);
    if (parts[0] === "zone" && parts[1]) await renderZone(decodeURIComponent(parts[1]), params);
    else if (parts[0] === "devices") await renderDevices();
    else if (parts[0] === "ask") await renderAsk(params);
    else if (parts[0] === "admin") await renderAdmin();
    else await renderOverview();
  } catch (e) {
    if (e instanceof Unauthorized) { me = null; document.getElementById("who").replaceChildren(); renderLogin(); }
    else show(el("h2", { text: "Something went wrong" }), el("p", { class: "error", role: "alert", text: e.message }));
  }
}

window.addEventListener("hashchange", route);
route();
