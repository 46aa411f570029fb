// culvert's web console. Plain DOM code, no framework and no inline script (the page's
// Content-Security-Policy allows scripts from this origin only). Everything shown that came
// from the relay is set as text, never as HTML.
"use strict";

const state = { csrf: null, me: null, view: null, timer: null, term: null };
const $ = (id) => document.getElementById(id);

// The terminal (xterm.js) writes its colours and cell sizes into <style> elements; the page's
// policy lets only style elements with this page's nonce apply, so every one made here gets it.
const STYLE_NONCE = document.querySelector("meta[name='culvert-style-nonce']").content;
{
  const create = Document.prototype.createElement;
  Document.prototype.createElement = function (tag, options) {
    const e = create.call(this, tag, options);
    if (String(tag).toLowerCase() === "style") e.nonce = STYLE_NONCE;
    return e;
  };
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "onclick") e.addEventListener("click", v);
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || String(text).toLowerCase()) }, text);
}

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString();
}

function flash(message, info) {
  const f = $("flash");
  f.textContent = message;
  f.className = info ? "info" : "";
  f.hidden = !message;
}

// A call to the relay: JSON both ways, the CSRF token on every change. A 401 means the session
// ended: back to the login form, with the relay's reason.
async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  if (resp.status !== 204) {
    try { data = await resp.json(); } catch (_) { data = null; }
  }
  if (resp.status === 401 && path !== "/session") {
    showLogin((data && data.message) || "The session has ended: log in again.");
    throw new Error("not logged in");
  }
  if (!resp.ok) {
    const message = (data && data.message) || ("the relay answered " + resp.status);
    const err = new Error(message);
    err.status = resp.status;
    throw err;
  }
  return data;
}

function showOnly(id) {
  for (const s of ["login", "tunnels", "devices", "terminal", "requests", "audit"]) $(s).hidden = s !== id;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === id);
  }
}

function showLogin(message) {
  state.csrf = null;
  state.me = null;
  clearInterval(state.timer);
  $("nav").hidden = true;
  $("who").hidden = true;
  flash("");
  const e = $("login-error");
  e.textContent = message || "";
  e.hidden = !message;
  showOnly("login");
  $("login-name").focus();
}

function loggedIn(me) {
  state.csrf = me.csrfToken;
  state.me = me;
  $("who-name").textContent = me.name;
  $("who-role").textContent = me.role;
  document.querySelector("a[data-view='audit']").hidden = me.role !== "admin";
  $("nav").hidden = false;
  $("who").hidden = false;
  $("login-error").hidden = true;
  route();
}

async function route() {
  if (!state.me) return;
  const view = (location.hash.replace(/^#\//, "") || "tunnels");
  state.view = ["tunnels", "devices", "terminal", "requests", "audit"].includes(view) ? view : "tunnels";
  showOnly(state.view);
  clearInterval(state.timer);
  flash("");
  await refresh();
  // The audit trail is read when asked (its form), not polled; the terminal is live.
  if (state.view === "audit" || state.view === "terminal") return;
  // What the relay knows changes by itself (a gateway connects, a tunnel expires).
  state.timer = setInterval(() => refresh().catch(() => {}), 3000);
}

async function refresh() {
  try {
    if (state.view === "tunnels") await loadTunnels();
    else if (state.view === "devices") await loadDevices();
    else if (state.view === "requests") await loadRequests();
    else if (state.view === "audit") await loadAudit();
    else if (state.view === "terminal") await loadThings();
  } catch (e) {
    if (e.message !== "not logged in") flash(e.message);
  }
}

// ---- tunnels ----

async function loadTunnels() {
  const closed = $("show-closed").checked;
  const [t, d] = await Promise.all([
    call("GET", "/api/v1/tunnels?maxResults=100" + (closed ? "" : "&status=OPEN")),
    call("GET", "/api/v1/devices").catch(() => ({ devices: [] })),
  ]);
  const things = $("things");
  things.replaceChildren(...d.devices.map((x) => el("option", { value: x.thingName })));
  const body = $("tunnel-table").tBodies[0];
  body.replaceChildren(...t.tunnels.map(tunnelRow));
  $("tunnels-empty").hidden = t.tunnels.length > 0;
}

function side(s) {
  const connected = s.status === "CONNECTED";
  return badge(connected ? "connected" : "disconnected", connected ? "connected" : "");
}

function tunnelRow(t) {
  const open = t.status === "OPEN";
  const actions = el("td", { class: "actions" });
  if (open && state.me.role !== "viewer") {
    actions.append(
      el("button", { class: "secondary", type: "button", title: "New source token (the old one stops working)",
        onclick: () => rotate(t.tunnelId, t.services) }, "New source token"),
      el("button", { class: "danger", type: "button", onclick: () => closeTunnel(t.tunnelId, false) }, "Close"),
    );
  }
  if (state.me.role !== "viewer") {
    actions.append(el("button", { class: "danger", type: "button", title: "Close and delete its record",
      onclick: () => closeTunnel(t.tunnelId, true) }, "Delete"));
  }
  let status = badge(t.status, t.status.toLowerCase());
  if (t.onSite) status = el("span", {}, status, " ", badge("on site: " + t.onSite.state, "pending"));
  return el("tr", { "data-tunnel": t.tunnelId },
    el("td", { class: "mono", title: t.tunnelId }, t.tunnelId.slice(0, 8)),
    el("td", { class: "nowrap" }, t.thingName),
    el("td", {}, t.services.join(", ")),
    el("td", {}, status),
    el("td", { class: "source" }, side(t.sourceConnectionState)),
    el("td", { class: "destination" }, side(t.destinationConnectionState)),
    el("td", {}, open ? when(t.expiresAt) : when(t.closedAt)),
    el("td", {}, t.openedBy || "(bootstrap key)"),
    el("td", {}, t.reason || ""),
    actions);
}

function showTokens(id, source, destination, services) {
  $("tokens-id").textContent = id;
  $("tokens-source").value = source || "";
  $("tokens-destination").value = destination || "";
  const map = services.map((s, i) => s + "=" + (5555 + i)).join(",");
  $("tokens-command").textContent = "culvert connect -s " + map + " -t " + (source || "SOURCE_TOKEN");
  $("tokens").hidden = false;
}

async function openTunnel(ev) {
  ev.preventDefault();
  const services = $("open-services").value.split(/[\s,]+/).filter(Boolean);
  const body = {
    thingName: $("open-thing").value.trim(),
    services,
    lifetimeMinutes: Number($("open-lifetime").value) || 60,
  };
  const reason = $("open-reason").value.trim();
  if (reason) body.reason = reason;
  $("open-submit").disabled = true;
  try {
    const t = await call("POST", "/api/v1/tunnels", body);
    showTokens(t.tunnelId, t.sourceAccessToken, t.destinationAccessToken, t.services);
    flash("");
    await loadTunnels();
  } catch (e) {
    if (e.message !== "not logged in") flash("Could not open the tunnel: " + e.message);
  } finally {
    $("open-submit").disabled = false;
  }
}

async function rotate(id, services) {
  try {
    const t = await call("POST", "/api/v1/tunnels/" + encodeURIComponent(id) + "/rotate", { clientMode: "source" });
    showTokens(id, t.sourceAccessToken, null, services);
  } catch (e) {
    if (e.message !== "not logged in") flash("Could not rotate: " + e.message);
  }
}

async function closeTunnel(id, del) {
  const what = del ? "Close and delete tunnel " : "Close tunnel ";
  if (!confirm(what + id + "? Its connections end.")) return;
  try {
    await call("POST", "/api/v1/tunnels/" + encodeURIComponent(id) + "/close", del ? { delete: true } : {});
    flash(del ? "Tunnel deleted." : "Tunnel closed.", true);
    await loadTunnels();
  } catch (e) {
    if (e.message !== "not logged in") flash("Could not close: " + e.message);
  }
}

// ---- devices ----

async function loadDevices() {
  const d = await call("GET", "/api/v1/devices");
  $("device-table").tBodies[0].replaceChildren(...d.devices.map(deviceRow));
  $("devices-empty").hidden = d.devices.length > 0;
}

function deviceRow(d) {
  const tags = Object.entries(d.tags || {}).map(([k, v]) => k + "=" + v).join(", ");
  const health = el("td", {});
  if (d.health) {
    for (const s of d.health.services) {
      health.append(el("span", { class: "health", title: s.detail || "" },
        s.name + " (" + s.kind + " " + s.target + ") ", badge(s.state)));
    }
    health.append(el("span", { class: "hint" }, "reported " + when(d.health.reportedAt)));
  } else {
    health.append(el("span", { class: "hint" }, "no report from the gateway"));
  }
  return el("tr", { "data-thing": d.thingName },
    el("td", {}, d.thingName),
    el("td", {}, d.online ? badge("online", "up") : badge("offline", "down")),
    el("td", {}, when(d.lastSeen)),
    el("td", {}, tags),
    health);
}

// ---- access requests ----

async function loadRequests() {
  const r = await call("GET", "/api/v1/requests");
  $("request-table").tBodies[0].replaceChildren(...r.requests.map(requestRow));
  $("requests-empty").hidden = r.requests.length > 0;
}

function requestRow(r) {
  const actions = el("td", { class: "actions" });
  if (r.state === "pending" && state.me.role === "admin") {
    actions.append(
      el("button", { type: "button", onclick: () => decide(r.requestId, true) }, "Approve"),
      el("button", { class: "danger", type: "button", onclick: () => decide(r.requestId, false) }, "Refuse"));
  }
  return el("tr", {},
    el("td", {}, r.operator),
    el("td", {}, r.thingName),
    el("td", {}, (r.services || []).join(", ") || "all"),
    el("td", {}, r.durationMinutes + " min"),
    el("td", {}, r.reason || ""),
    el("td", {}, badge(r.state)),
    actions);
}

async function decide(id, approve) {
  try {
    const path = "/api/v1/requests/" + encodeURIComponent(id) + (approve ? "/approve" : "/refuse");
    await call("POST", path, {});
    await loadRequests();
  } catch (e) {
    if (e.message !== "not logged in") flash(e.message);
  }
}

// ---- terminal ----

async function loadThings() {
  const d = await call("GET", "/api/v1/devices").catch(() => ({ devices: [] }));
  $("things").replaceChildren(...d.devices.map((x) => el("option", { value: x.thingName })));
}

function termStatus(text) {
  $("term-status").textContent = text;
}

// Open a tunnel for the service, then the terminal's WebSocket; the relay attaches to the
// tunnel as its source and carries the keystrokes and the output.
async function openTerminal(ev) {
  ev.preventDefault();
  if (state.term) return;
  const service = $("term-service").value.trim();
  const kind = $("term-kind").value;
  const body = {
    thingName: $("term-thing").value.trim(),
    services: [service],
    lifetimeMinutes: 720,
    description: "web console terminal (" + kind + ")",
  };
  const reason = $("term-reason").value.trim();
  if (reason) body.reason = reason;
  $("term-open").disabled = true;
  let t;
  try {
    t = await call("POST", "/api/v1/tunnels", body);
  } catch (e) {
    $("term-open").disabled = false;
    if (e.message !== "not logged in") termStatus("Could not open the tunnel: " + e.message);
    return;
  }
  const screen = $("term-screen");
  screen.replaceChildren();
  const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();
  const q = new URLSearchParams({ tunnel: t.tunnelId, service, kind });
  const ws = new WebSocket("wss://" + location.host + "/terminal?" + q.toString());
  ws.binaryType = "arraybuffer";
  const session = { ws, term, tunnel: t.tunnelId, ended: false };
  state.term = session;
  $("term-close").disabled = false;
  termStatus("Tunnel " + t.tunnelId.slice(0, 8) + " open; waiting for the device's gateway…");
  const encoder = new TextEncoder();
  const first = { token: t.sourceAccessToken, csrf: state.csrf, cols: term.cols, rows: term.rows };
  if (kind === "ssh") {
    first.user = $("term-user").value.trim();
    const key = $("term-key").value;
    if (key.trim()) {
      first.key = key;
      if ($("term-passphrase").value) first.passphrase = $("term-passphrase").value;
    } else {
      first.password = $("term-password").value;
    }
  }
  // The credential is sent once and not kept in the page.
  $("term-password").value = "";
  $("term-key").value = "";
  $("term-passphrase").value = "";
  $("term-hostkey").hidden = true;
  ws.addEventListener("open", () => ws.send(JSON.stringify(first)));
  term.onResize(({ cols, rows }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ resize: [cols, rows] }));
  });
  term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d)); });
  term.onBinary((d) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const b = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 255;
    ws.send(b);
  });
  ws.addEventListener("message", (m) => {
    if (typeof m.data !== "string") {
      term.write(new Uint8Array(m.data));
      return;
    }
    let v = {};
    try { v = JSON.parse(m.data); } catch (_) { return; }
    if (v.status === "waiting") termStatus("Waiting for the device's gateway to join the tunnel…");
    else if (v.status === "connected") { termStatus("Connected to " + body.thingName + " " + service + "."); term.focus(); }
    else if (v.error) termStatus("Error: " + v.error);
    else if (v.hostKey) {
      const h = $("term-hostkey");
      h.textContent = "Host key " + v.hostKey + (v.pinned === "now" ? " (seen for the first time: pinned for this device)" : " (as pinned)");
      h.hidden = false;
    }
    else if (v.closed) termStatus("Ended: " + v.closed + ".");
  });
  let opened = false;
  ws.addEventListener("open", () => { opened = true; });
  ws.addEventListener("close", () => endTerminal(session, opened ? null : "Error: the relay refused the terminal's connection."));
  window.addEventListener("resize", () => fit.fit());
}

// End the terminal: its WebSocket and the tunnel it opened.
async function endTerminal(session, why) {
  if (!session || session.ended) return;
  session.ended = true;
  try { session.ws.close(); } catch (_) { /* closed already */ }
  if (why) termStatus(why);
  else if (!$("term-status").textContent.startsWith("Error") && !$("term-status").textContent.startsWith("Ended")) {
    termStatus("The terminal ended.");
  }
  if (state.term === session) state.term = null;
  $("term-open").disabled = false;
  $("term-close").disabled = true;
  try {
    await call("POST", "/api/v1/tunnels/" + encodeURIComponent(session.tunnel) + "/close", {});
  } catch (_) { /* closed or expired already */ }
}

// ---- audit trail ----

const AUDIT_SHOWN = ["ts", "event", "operator", "thing", "tunnel", "seq", "prev", "hash"];

async function loadAudit() {
  const q = new URLSearchParams({ limit: "200" });
  for (const f of ["event", "operator", "thing", "tunnel"]) {
    const v = $("audit-" + f).value.trim();
    if (v) q.set(f, v);
  }
  const r = await call("GET", "/api/v1/audit?" + q.toString());
  $("audit-table").tBodies[0].replaceChildren(...r.records.map(auditRow));
  $("audit-empty").hidden = r.records.length > 0;
  $("audit-truncated").hidden = !r.truncated;
}

function auditRow(r) {
  const rest = {};
  for (const [k, v] of Object.entries(r)) if (!AUDIT_SHOWN.includes(k)) rest[k] = v;
  return el("tr", { "data-event": r.event },
    el("td", { class: "nowrap" }, when(r.ts)),
    el("td", {}, badge(r.event, r.event.includes("refused") || r.event === "denied" ? "refused" : "")),
    el("td", {}, r.operator || ""),
    el("td", {}, r.thing || ""),
    el("td", { class: "mono", title: r.tunnel || "" }, (r.tunnel || "").slice(0, 8)),
    el("td", { class: "mono details" }, JSON.stringify(rest)));
}

// ---- start ----

async function login(ev) {
  ev.preventDefault();
  $("login-submit").disabled = true;
  try {
    const me = await call("POST", "/session", {
      name: $("login-name").value.trim(),
      password: $("login-password").value,
    });
    $("login-password").value = "";
    loggedIn(me);
  } catch (e) {
    const err = $("login-error");
    err.textContent = e.message;
    err.hidden = false;
  } finally {
    $("login-submit").disabled = false;
  }
}

async function logout() {
  try { await call("POST", "/session/logout"); } catch (_) { /* ended already */ }
  showLogin("Logged out.");
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("open-form").addEventListener("submit", openTunnel);
  $("tokens-done").addEventListener("click", () => {
    $("tokens").hidden = true;
    $("tokens-source").value = "";
    $("tokens-destination").value = "";
  });
  $("show-closed").addEventListener("change", () => refresh());
  $("audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
  $("term-form").addEventListener("submit", openTerminal);
  const sshFields = () => { $("term-ssh").hidden = $("term-kind").value !== "ssh"; };
  $("term-kind").addEventListener("change", sshFields);
  sshFields();
  $("term-close").addEventListener("click", () => endTerminal(state.term, "Closed; the tunnel is closed too."));
  $("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", route);
  try {
    loggedIn(await call("GET", "/session"));
  } catch (_) {
    showLogin("");
  }
});
