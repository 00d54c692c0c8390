// civicmesh dashboard: a small single-page app with no dependencies. Everything it
// loads comes from this server; charts and the map are drawn as SVG here.

const main = document.getElementById("main");
const liveRegion = document.getElementById("live-region");
const SVG = "http://www.w3.org/2000/svg";
let me = null;
let liveSource = null;
let liveCount = 0;

// ------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
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
  if (response.status === 401) throw new Unauthorized("sign in");
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
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

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" }) : "never";
}

function show(...nodes) {
  main.replaceChildren(...nodes);
  main.focus({ preventScroll: true });
}

function setNav(page) {
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
      map.append(svg("text", { x: cx.toFixed(1), y: cy.toFixed(1), class: "label", "text-anchor": "middle" }, document.createTextNode(`${p.label} ${p.aqi ?? "–"}`)));
    }
  }
  for (const dev of devices) {
    if (dev.lon === null || dev.lat === null) continue;
    map.append(svg("circle", { cx: x(dev.lon).toFixed(1), cy: y(dev.lat).toFixed(1), r: 6, class: "device", fill: dev.online ? "#0a6b2d" : "#a4000f", "data-device": dev.device_id },
      svg("title", {}, document.createTextNode(`${dev.device_id} (${dev.zone}): ${dev.online ? "online" : "offline"}`))));
  }
  return map;
}

const AQI_LEGEND = [["Good", "#00E400"], ["Moderate", "#FFFF00"], ["Unhealthy for Sensitive Groups", "#FF7E00"], ["Unhealthy", "#FF0000"], ["Very Unhealthy", "#8F3F97"], ["Hazardous", "#7E0023"], ["No data", "#9e9e9e"]];

// -------------------------------------------------------------------- charts

function drawChart(chart) {
  const pts = chart.points;
  const width = 480, height = 230, left = 46, right = 10, top = 12, bottom = 28;
  const box = el("figure", { class: "chart panel", "data-metric": chart.metric, "data-points": String(pts.length) });
  box.append(el("figcaption", {}, el("h3", { text: `${chart.label} (${chart.unit})` })));
  if (!pts.length) {
    box.append(el("p", { class: "note", text: "No data in this range." }));
    return box;
  }
  const times = pts.map((p) => Date.parse(p.t));
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const guides = chart.guides || [];
  const lows = pts.map((p) => p.min ?? p.mean), highs = pts.map((p) => p.max ?? p.mean);
  const yMax = Math.max(...highs, ...guides.filter((g) => g.value < 3 * Math.max(...highs)).map((g) => g.value)) * 1.08 || 1;
  const yMin = Math.min(0, ...lows);
  const X = (t) => left + (t1 === t0 ? 0.5 : (t - t0) / (t1 - t0)) * (width - left - right);
  const Y = (v) => top + (1 - (v - yMin) / (yMax - yMin)) * (height - top - bottom);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `${chart.label}: ${pts.length} points from ${localTime(pts[0].t)} to ${localTime(pts[pts.length - 1].t)}` });
  plot.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" }));
  plot.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const v = yMin + (yMax - yMin) * i / 4;
    plot.append(svg("text", { x: left - 6, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, document.createTextNode(fmt(v, v < 10 ? 1 : 0))));
  }
  for (let i = 0; i <= 3; i++) {
    const t = t0 + (t1 - t0) * i / 3;
    const label = new Date(t).toLocaleString("en-GB", (t1 - t0) > 2 * 864e5 ? { day: "numeric", month: "short" } : { hour: "2-digit", minute: "2-digit" });
    const anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
    plot.append(svg("text", { x: X(t), y: height - 10, class: "tick", "text-anchor": anchor }, document.createTextNode(label)));
  }
  const upper = pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(highs[i]).toFixed(1)}`);
  const lower = pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(lows[i]).toFixed(1)}`).reverse();
  const band = upper.concat(lower);
  plot.append(svg("polygon", { points: band.join(" "), class: "band" }));
  plot.append(svg("polyline", { points: pts.map((p, i) => `${X(times[i]).toFixed(1)},${Y(p.mean).toFixed(1)}`).join(" "), class: "line" }));
  for (const g of guides) {
    if (g.value > yMax) continue;
    plot.append(svg("line", { x1: left, x2: width - right, y1: Y(g.value), y2: Y(g.value), class: "guide" }));
    plot.append(svg("text", { x: width - right - 4, y: Y(g.value) - 4, class: "guide-label", "text-anchor": "end" }, document.createTextNode(`${g.label} ${g.value}`)));
  }
  box.append(plot);
  return box;
}

// --------------------------------------------------------------------- pages

function renderLogin(message) {
  setNav("");
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
  const data = await api("/dashboard/api/overview");
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
    el("h2", { text: "City overview" }), stats,
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
  const body = rows.map((d) => el("tr", { "data-device": d.device_id },
    el("th", { scope: "row" }, d.device_id),
    el("td", { text: d.zone }),
    el("td", {}, el("span", { class: `badge ${d.online ? "on" : "off"}`, text: d.online ? "online" : "offline" })),
    el("td", { text: localTime(d.last_seen) }),
    el("td", {}, d.flagged_24h ? el("span", { class: "badge warn", text: `${d.flagged_24h} flagged` }) : "none"),
    el("td", {}, d.signature_or_chain_failures_24h ? el("span", { class: "badge off", text: String(d.signature_or_chain_failures_24h) }) : "0",
      Object.keys(d.quarantined_24h).length ? el("div", { class: "note", text: Object.entries(d.quarantined_24h).map(([r, n]) => `${r}: ${n}`).join(", ") }) : null),
    el("td", { text: d.health ? `${d.health.outbox_batches} batches, ${d.health.outbox_readings} readings (${localTime(d.health.reported)})` : "not reported" }),
    el("td", { text: d.model_version || "–" }),
    el("td", { text: `${d.last_seq ?? "–"} / ${d.batches}` })));
  show(el("h2", { text: "Device health" }),
    el("p", { class: "note", text: "Flags and quarantine counts cover the last 24 hours. Outbox backlog is what each agent last reported (unsigned)." }),
    el("div", { class: "table-wrap" }, el("table", { id: "devices" },
      el("thead", {}, el("tr", {}, ["Device", "Zone", "Status", "Last seen", "Anomaly flags", "Signature / chain failures", "Outbox backlog", "Model", "Last seq / batches"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, body))));
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
    if (!groups.has(key)) groups.set(key, { metric: `${v.metric}`, label: `${v.metric} — ${v.series}`, unit: "mean", points: [], guides: [] });
    groups.get(key).points.push({ t: v.time, mean: v.mean });
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
      list.prepend(el("li", { "data-device": r.device_id }, `${localTime(r.time)} · ${r.zone} · ${r.metric} ${fmt(r.value, 2)} (${r.device_id})`));
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
      document.getElementById("who").replaceChildren(
        el("span", { text: `${me.user} (${me.role})` }),
        el("button", { type: "button", class: "secondary", onclick: async () => { await api("/dashboard/auth/logout", { method: "POST" }); me = null; liveSource?.close(); liveSource = null; renderLogin(); } }, "Sign out"));
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
