// Breakwater's status page: polls /status.json every second and redraws. No dependencies,
// no inline code (the page is served with a strict Content-Security-Policy), and every value
// goes into the page as text, never as markup.
"use strict";

const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

// A sparkline of the last minute; null points (no requests that second) are gaps.
function sparkline(values, cls, max) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 60 40");
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(max || 0, ...values.filter((v) => v !== null), 1e-9);
  let points = [];
  const flush = () => {
    if (points.length) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", cls);
      line.setAttribute("points", points.join(" "));
      svg.append(line);
    }
    points = [];
  };
  const offset = 60 - values.length;
  values.forEach((v, i) => {
    if (v === null) return flush();
    points.push(`${offset + i},${(38 - (v / top) * 36).toFixed(2)}`);
  });
  flush();
  return svg;
}

function fmt(v, unit, digits) {
  if (v === null || v === undefined) return "–";
  return `${Number(v).toFixed(digits)}${unit}`;
}

function pct(v) {
  return v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`;
}

function stat(label, value, name) {
  return el("div", { class: "stat", "data-stat": name },
    el("div", { class: "v" }, value), el("div", { class: "k" }, label));
}

function chart(label, ...lines) {
  const div = el("div", { class: "chart" }, el("div", { class: "k" }, label));
  const max = Math.max(0, ...lines.flatMap(([vals]) => vals.filter((v) => v !== null)));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 60 40");
  svg.setAttribute("preserveAspectRatio", "none");
  for (const [vals, cls] of lines) {
    for (const child of [...sparkline(vals, cls, max).childNodes]) svg.append(child);
  }
  div.append(svg);
  return div;
}

function breakerText(u) {
  if (u.state === "open" && u.half_open_in_ms !== null) {
    return `open · half-open in ${Math.ceil(u.half_open_in_ms / 1000)}s`;
  }
  return u.state.replace("_", "-");
}

function service(s) {
  const anyOpen = s.upstreams.some((u) => u.state !== "closed" || !u.healthy);
  const card = el("section", { class: anyOpen ? "service degraded" : "service", "data-service": s.name });
  card.append(el("h2", {}, s.name));
  const routes = el("div", { class: "routes" });
  for (const r of s.routes) routes.append(el("span", { class: "route" }, `${r.host || ""}${r.path_prefix}`));
  card.append(routes);

  const table = el("table", {},
    el("tr", {}, el("th", {}, "upstream"), el("th", {}, "health"), el("th", {}, "breaker"), el("th", {}, "in flight")));
  for (const u of s.upstreams) {
    table.append(el("tr", { "data-upstream": u.name, "data-state": u.state, "data-healthy": u.healthy },
      el("td", { class: "addr" }, u.name),
      el("td", { class: u.healthy ? "health-up" : "health-down" }, u.healthy ? "● up" : "● down"),
      el("td", {}, el("span", { class: `badge state-${u.state}` }, breakerText(u))),
      el("td", {}, u.in_flight)));
  }
  card.append(table);

  const m = s.last_minute || {};
  const stats = el("div", { class: "stats" },
    stat("req/s", fmt(m.rps, "", 1), "rps"),
    stat("errors (5xx)", pct(m.error_rate), "error_rate"),
    stat("p50", fmt(m.p50_ms, " ms", 1), "p50"),
    stat("p99", fmt(m.p99_ms, " ms", 1), "p99"));
  if (s.cache) stats.append(stat("cache hits", pct(m.cache_hit_ratio), "cache"));
  if (s.rate_limit) stats.append(stat("rate limited", m.rate_limited ?? "–", "rate_limited"));
  card.append(stats);

  const err = s.series.error_rate.map((v) => (v === null ? null : v * 100));
  card.append(el("div", { class: "charts" },
    chart("requests / s", [s.series.rps, "line-rps"]),
    chart("errors %", [err, "line-err"]),
    chart("p50 / p99 ms", [s.series.p50_ms, "line-p50"], [s.series.p99_ms, "line-p99"])));
  return card;
}

function render(status) {
  const up = status.uptime_s;
  const uptime = up >= 3600 ? `${Math.floor(up / 3600)}h ${Math.floor((up % 3600) / 60)}m` : `${Math.floor(up / 60)}m ${up % 60}s`;
  const state = status.draining ? "draining" : status.ready ? "ready" : "not ready";
  const parts = [`v${status.version}`, `pid ${status.pid}`, state, `started ${status.started_at}`, `up ${uptime}`,
    `reloads ${status.reloads.success} ok / ${status.reloads.error} failed`];
  if (status.redis) parts.push(`redis ${status.redis}`);
  document.getElementById("process").textContent = parts.join(" · ");
  const main = document.getElementById("services");
  main.replaceChildren(...status.services.map(service));
  document.body.setAttribute("data-loaded", "true");
}

async function poll() {
  const conn = document.getElementById("connection");
  try {
    const resp = await fetch("/status.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    conn.textContent = "";
    conn.classList.remove("stale");
  } catch (e) {
    conn.textContent = `cannot reach the gateway (${e.message}); retrying`;
    conn.classList.add("stale");
  }
  setTimeout(poll, POLL_MS);
}

poll();
