"use strict";
// Polls /api/status (docs/STATUS.md) and redraws; no framework, no build step.
const POLL_MS = 1500;

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// "1 agent", "2 agents".
function count(n, one, many) {
  return n + " " + (n === 1 ? one : many);
}

// 59 s, 4 min 10 s, 3 h 5 min, 2 d 4 h: what an operator reads at a glance.
function duration(secs) {
  const units = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];
  for (let i = 0; i < units.length - 1; i++) {
    const [name, size] = units[i];
    if (secs >= size) {
      const [next, nextSize] = units[i + 1];
      const rest = Math.floor((secs % size) / nextSize);
      return Math.floor(secs / size) + " " + name + (rest ? " " + rest + " " + next : "");
    }
  }
  return secs + " s";
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function renderTotals(t, role) {
  const dl = document.getElementById("totals");
  dl.replaceChildren();
  const items = [
    [role === "agent" ? "sessions" : "agents", t.agents], ["live connections", t.live_connections],
    ["connections opened", t.connections_opened], ["connections failed", t.connections_failed],
    ["bytes in", bytes(t.bytes_in)], ["bytes out", bytes(t.bytes_out)],
  ];
  for (const [k, v] of items) {
    dl.append(el("div", {}, el("dt", {}, k), el("dd", { id: "total-" + k.replace(/ /g, "-") }, v)));
  }
}

// On a gateway, its agents; on an agent, its own sessions to the gateways.
function renderGroups(groups, role) {
  document.getElementById("groups-title").textContent = role === "agent" ? "Sessions by group" : "Agents by group";
  const root = document.getElementById("groups");
  root.replaceChildren();
  if (!groups.length) {
    root.append(el("p", { class: "bad" }, role === "agent" ? "no authenticated session" : "no agent connected"));
    return;
  }
  for (const g of groups) {
    const table = el("table", { class: "agents" },
      el("tr", {}, ...["client id", "remote", "encoding", "deflate", "RTT", "live connections", "opened", "in", "out", "connected"].map(h => el("th", {}, h))));
    for (const a of g.agents) {
      table.append(el("tr", { class: "agent", "data-client-id": a.client_id },
        el("td", { class: "client-id" }, a.client_id),
        el("td", {}, a.remote || "-"),
        el("td", {}, a.encoding),
        el("td", {}, a.deflate ? "on" : "off"),
        el("td", {}, a.rtt_ms == null ? "-" : a.rtt_ms.toFixed(2) + " ms"),
        el("td", { class: "live-connections" }, a.live_connections),
        el("td", {}, a.connections_opened),
        el("td", {}, bytes(a.bytes_in)),
        el("td", {}, bytes(a.bytes_out)),
        el("td", {}, duration(a.connected_secs))));
    }
    root.append(el("h3", {}, "group " + g.group + " (" + count(g.agents.length, "session", "sessions") + ")"), table);
  }
}

// Agent only: every gateway session, whatever its state.
function renderGateways(gateways) {
  const section = document.getElementById("gateways-section");
  section.hidden = !gateways;
  if (!gateways) return;
  const table = document.getElementById("gateways");
  table.replaceChildren(el("tr", {}, ...["gateway", "address", "client id", "state", "for", "reconnects", "last error"].map(h => el("th", {}, h))));
  for (const g of gateways) {
    table.append(el("tr", { class: "gateway-session", "data-state": g.state },
      el("td", {}, g.gateway),
      el("td", {}, g.address || "-"),
      el("td", {}, g.client_id),
      el("td", { class: g.state === "connected" ? "ok" : "bad" }, g.state),
      el("td", {}, duration(g.state_secs)),
      el("td", {}, g.reconnects),
      el("td", {}, g.last_error || "-")));
  }
}

// Present only when the gateway runs a policy; the most used first, per manager.
function renderQuotas(quotas) {
  const section = document.getElementById("quotas-section");
  section.hidden = !quotas;
  if (!quotas) return;
  const table = document.getElementById("quotas");
  table.replaceChildren(el("tr", {}, ...["manager", "user", "used", "quota", "share", "resets"].map(h => el("th", {}, h))));
  for (const q of quotas) {
    const share = q.quota ? Math.min(100, 100 * q.used / q.quota) : 100;
    table.append(el("tr", { class: "quota", "data-user": q.user, "data-manager": q.manager },
      el("td", {}, q.manager),
      el("td", {}, q.user),
      el("td", { class: "used" }, bytes(q.used)),
      el("td", { class: "limit" }, bytes(q.quota)),
      el("td", { class: share >= 100 ? "bad" : "ok" }, share.toFixed(0) + " %"),
      el("td", {}, new Date(q.next_reset_unix * 1000).toLocaleString())));
  }
}

function renderChart(traffic) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const s = traffic.samples;
  if (s.length < 2) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", "8"); t.setAttribute("y", "20"); t.setAttribute("fill", "#5b6475");
    t.textContent = "collecting samples (one every " + traffic.interval_secs + " s)…";
    svg.append(t);
    return;
  }
  const W = 600, H = 120;
  const max = Math.max(1, ...s.map(x => Math.max(x.bytes_in, x.bytes_out)));
  const line = (key, color) => {
    const pts = s.map((x, i) => (i * W / (s.length - 1)).toFixed(1) + "," + (H - 4 - x[key] * (H - 8) / max).toFixed(1));
    const p = document.createElementNS(ns, "polyline");
    p.setAttribute("points", pts.join(" "));
    p.setAttribute("fill", "none");
    p.setAttribute("stroke", color);
    p.setAttribute("stroke-width", "2");
    svg.append(p);
  };
  line("bytes_in", "#2f6fde");
  line("bytes_out", "#e0792b");
  const last = s[s.length - 1];
  document.getElementById("rate").textContent =
    " last " + traffic.interval_secs + " s: in " + bytes(last.bytes_in) + ", out " + bytes(last.bytes_out) + " · peak " + bytes(max);
}

async function poll() {
  try {
    const r = await fetch("api/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    const st = await r.json();
    document.getElementById("role").textContent = st.role + " " + st.version;
    const summary = document.getElementById("summary");
    summary.textContent = st.readiness + " · up " + duration(st.uptime_secs) + " · " +
      count(st.totals.live_connections, "live connection", "live connections");
    summary.className = st.ready ? "ok" : "bad";
    renderTotals(st.totals, st.role);
    renderGroups(st.groups, st.role);
    renderGateways(st.gateways);
    renderQuotas(st.quotas);
    renderChart(st.traffic);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    const summary = document.getElementById("summary");
    summary.textContent = "cannot read /api/status: " + e.message;
    summary.className = "bad";
  }
}

poll();
setInterval(poll, POLL_MS);
