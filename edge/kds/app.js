// Fynlo kitchen display: one station's tickets, live over /v1/live; tap to bump, recall.
//
// How it works. The device credential comes once from ?device= (kept in localStorage and
// taken out of the address bar) or from pairing with a code (one request per code: the form
// ignores submits while one is in flight; the name offered is the station's, "Bar screen").
// A call the edge refuses as device_not_paired (revoked) forgets the credential, closes the
// live connection, clears the tickets and shows the pairing form. The page opens /v1/live and
// subscribes to tickets:<station> with the last seq it has applied. On its first connection
// (and on a "reset") it reloads the tickets over REST, holding the live events that arrive
// meanwhile and applying them on top afterwards (an event carries the whole row, so applying
// one the snapshot already has is harmless). The edge sends a heartbeat every second: 3 s of
// silence, a closed socket, or a connection that is not ready within 4 s shows the
// "Connection lost" banner and reconnects with backoff, resuming from the last seq; "ready"
// clears the banner. Ages are counted on the edge's clock (now_ms of ready and heartbeats).
//
// Voids. A ticket names the items struck off it (voided_line_ids: a list over REST, JSON
// text in a live row) and whether it is void altogether (voided). A void ticket shows a
// "VOID" banner until the cook bumps it; a voided item is struck through and tagged "VOID".
// Marks only ever accumulate: the page keeps those it has shown for a ticket, so a list that
// lost a concurrent mark on another edge cannot bring a voided item back.
"use strict";

(() => {
  const HEARTBEAT_TIMEOUT_MS = 3000;
  const CONNECT_TIMEOUT_MS = 4000;
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 4000;
  const CLOSE_REVOKED = 4401; // the live connection's device was revoked (docs/live.md)
  const RECALL_SHOWN = 12;
  const WARN_AFTER_MS = 5 * 60 * 1000;
  const LATE_AFTER_MS = 10 * 60 * 1000;
  const TOKEN_KEY = "fynlo.kds.device";

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  if (params.get("device")) {
    localStorage.setItem(TOKEN_KEY, params.get("device"));
    params.delete("device");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : ""));
  }
  const station = params.get("station") || "kitchen";

  const state = {
    token: localStorage.getItem(TOKEN_KEY),
    open: new Map(), // ticket id -> ticket, on the screen
    bumped: new Map(), // ticket id -> ticket, in the recall list
    lastSeq: null, // every event up to here is applied (null: reload from REST)
    held: null, // events held while a REST reload runs
    heldSeq: 0,
    generation: 0, // bumped to abandon a reload in flight
    offsetMs: 0, // the edge's clock minus this one
    socket: null,
    ready: false,
    heardAt: 0,
    openedAt: 0,
    backoffMs: BACKOFF_MIN_MS,
    retry: null,
    reloads: 0,
  };

  // -- talking to the edge ------------------------------------------------------------------

  function idempotencyKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    return "kds-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function api(method, path, body) {
    const headers = { "X-Fynlo-Device": state.token || "" };
    if (method !== "GET") headers["Idempotency-Key"] = idempotencyKey();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const answer = resp.headers.get("Content-Type")?.includes("json") ? await resp.json() : null;
    if (resp.status === 401 && answer?.error?.code === "device_not_paired") unpaired();
    return { ok: resp.ok, status: resp.status, answer };
  }

  async function loadTickets(which) {
    const query = new URLSearchParams({ station, state: which, limit: String(RECALL_SHOWN) });
    const { ok, status, answer } = await api("GET", `/v1/kitchen/tickets?${query}`);
    if (!ok) throw new Error(`tickets: ${status}`);
    return answer.tickets;
  }

  // -- the live connection ------------------------------------------------------------------

  function connect() {
    state.retry = null;
    if (!state.token) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}/v1/live?device=${encodeURIComponent(state.token)}`;
    const ws = new WebSocket(url);
    state.socket = ws;
    state.ready = false;
    state.openedAt = state.heardAt = Date.now();
    ws.onopen = () => {
      const topics = [`tickets:${station}`];
      ws.send(JSON.stringify({ type: "subscribe", topics, since: state.lastSeq }));
    };
    ws.onmessage = (m) => {
      if (ws !== state.socket) return;
      state.heardAt = Date.now();
      receive(JSON.parse(m.data));
    };
    ws.onclose = (event) => {
      if (ws !== state.socket) return;
      if (event.code === CLOSE_REVOKED) unpaired(); // this screen was unpaired by a manager
      else lost();
    };
  }

  function receive(msg) {
    switch (msg.type) {
      case "ready":
        state.ready = true;
        state.backoffMs = BACKOFF_MIN_MS;
        state.offsetMs = msg.now_ms - Date.now();
        setStatus("live");
        if (state.lastSeq === null) reload(msg.seq);
        break;
      case "reset":
        reload(msg.seq);
        break;
      case "event":
        if (state.held !== null) {
          state.held.push(msg);
        } else {
          apply(msg.data);
          state.lastSeq = msg.seq;
          render();
        }
        break;
      case "heartbeat":
        state.offsetMs = msg.now_ms - Date.now();
        if (state.held !== null) state.heldSeq = Math.max(state.heldSeq, msg.seq);
        else state.lastSeq = Math.max(state.lastSeq ?? 0, msg.seq);
        break;
      case "error":
        console.warn("live:", msg.code, msg.message);
        break;
    }
  }

  function lost() {
    const ws = state.socket;
    state.socket = null;
    state.ready = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close();
    }
    if (state.held !== null) {
      // a reload was cut short: start again from REST on the next connection
      state.held = null;
      state.lastSeq = null;
      state.generation += 1;
    }
    if (!state.token) return;
    setStatus("lost");
    if (state.retry === null) {
      const delay = state.backoffMs * (0.75 + Math.random() / 2);
      state.backoffMs = Math.min(state.backoffMs * 2, BACKOFF_MAX_MS);
      state.retry = setTimeout(connect, delay);
    }
    api("GET", "/v1/device").catch(() => {}); // a revoked screen goes back to pairing
  }

  function watchdog() {
    if (!state.socket) return;
    const now = Date.now();
    const silent = state.ready
      ? now - state.heardAt > HEARTBEAT_TIMEOUT_MS
      : now - state.openedAt > CONNECT_TIMEOUT_MS;
    if (silent) lost();
  }

  async function reload(seq) {
    const generation = ++state.generation;
    state.held = [];
    state.heldSeq = seq;
    state.reloads += 1;
    document.body.dataset.reloads = String(state.reloads);
    let open, bumped;
    try {
      [open, bumped] = await Promise.all([loadTickets("open"), loadTickets("bumped")]);
    } catch (err) {
      if (generation === state.generation) lost();
      return;
    }
    if (generation !== state.generation) return;
    state.open = new Map(open.map((t) => [t.id, ticketOf(t, shown(t.id))]));
    state.bumped = new Map(bumped.map((t) => [t.id, ticketOf(t, shown(t.id))]));
    let through = state.heldSeq;
    for (const msg of state.held) {
      apply(msg.data);
      through = Math.max(through, msg.seq);
    }
    state.held = null;
    state.lastSeq = through;
    render();
  }

  // -- tickets --------------------------------------------------------------------------------

  function listOf(value) {
    if (typeof value === "string") {
      try {
        value = JSON.parse(value);
      } catch {
        value = [];
      }
    }
    return Array.isArray(value) ? value : [];
  }

  function shown(id) {
    return state.open.get(id) ?? state.bumped.get(id);
  }

  // A ticket as drawn: its items, the line ids struck off (with those already shown), and
  // whether it is void (marked so, or every item struck off).
  function ticketOf(raw, before) {
    const items = listOf(raw.items);
    const struck = new Set(before?.struck ?? []);
    for (const id of listOf(raw.voided_line_ids)) if (typeof id === "string") struck.add(id);
    const lineOf = (item) => (item && typeof item === "object" ? item.line_id : undefined);
    const every = items.length > 0 && items.every((item) => struck.has(lineOf(item)));
    const voided = Boolean(before?.voided || raw.voided || every);
    return { ...raw, items, struck, voided };
  }

  function apply(data) {
    if (!data || data.table !== "tickets") return;
    const before = shown(data.id);
    state.open.delete(data.id);
    state.bumped.delete(data.id);
    const row = data.row;
    if (!row || (row.station && row.station !== station)) return;
    const ticket = ticketOf({ id: data.id, ...row }, before);
    (ticket.bumped ? state.bumped : state.open).set(ticket.id, ticket);
  }

  async function act(id, action) {
    const card = document.querySelector(`[data-id="${CSS.escape(id)}"]`);
    card?.classList.add("pending");
    const token = state.token;
    try {
      const path = `/v1/kitchen/tickets/${encodeURIComponent(id)}/${action}`;
      const { ok, answer } = await api("POST", path);
      if (state.token !== token) return; // unpaired meanwhile: the screen shows nothing
      if (!ok) {
        toast(answer?.error?.message || `Could not ${action} the ticket`);
        return;
      }
      apply({ table: "tickets", id, row: answer });
      render();
    } catch (err) {
      toast(`Could not ${action}: the edge is not answering`);
    } finally {
      card?.classList.remove("pending");
    }
  }

  // -- drawing --------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function itemNode(item, ticket) {
    const li = el("li");
    if (typeof item === "string") {
      li.append(el("span", "name", item));
      return li;
    }
    if (ticket.voided || ticket.struck.has(item.line_id)) {
      li.classList.add("voided");
      li.append(el("span", "void-tag", "VOID"));
    }
    const qty = item.qty ?? item.quantity ?? 1;
    li.append(el("span", "qty", `${qty}×`), el("span", "name", item.name ?? item.item_name ?? "?"));
    const mods = (item.modifiers ?? []).map((m) => (typeof m === "string" ? m : m?.name ?? ""));
    if (mods.length) {
      const ul = el("ul", "mods");
      for (const mod of mods) ul.append(el("li", "", mod));
      li.append(ul);
    }
    const note = item.note ?? item.notes;
    if (note) li.append(el("p", "note", note));
    return li;
  }

  function card(ticket) {
    const node = el("article", "ticket");
    node.dataset.id = ticket.id;
    const header = el("header");
    const check = ticket.check_number != null ? `#${ticket.check_number}` : "";
    const course = ticket.course != null ? ` · course ${ticket.course}` : "";
    const age = el("time", "age");
    age.dataset.fired = String(ticket.fired_at_ms ?? Date.now() + state.offsetMs);
    header.append(el("span", "table", ticket.table_name ?? ""), el("span", "check", check + course), age);
    const items = el("ul", "items");
    for (const item of ticket.items) items.append(itemNode(item, ticket));
    const bump = el("button", "bump", "Bump");
    bump.type = "button";
    if (ticket.voided) {
      node.classList.add("voided");
      const banner = el("p", "void-banner", "VOID");
      banner.setAttribute("role", "alert");
      node.append(banner);
    }
    node.append(header, items, bump);
    return node;
  }

  function recallNode(ticket) {
    const li = el("li", "recalled");
    li.dataset.id = ticket.id;
    const names = ticket.items.map((i) => (typeof i === "string" ? i : i.name)).join(", ");
    const label = `${ticket.table_name ?? ""} #${ticket.check_number ?? ""} ${names}`;
    const what = ticket.voided ? `VOID ${label}` : label;
    const button = el("button", "recall-button", "Recall");
    button.type = "button";
    li.append(el("span", "what", what), button);
    return li;
  }

  function render() {
    const open = [...state.open.values()].sort(
      (a, b) => (a.fired_at_ms ?? 0) - (b.fired_at_ms ?? 0) || a.id.localeCompare(b.id),
    );
    $("tickets").replaceChildren(...open.map(card));
    const bumped = [...state.bumped.values()]
      .sort((a, b) => (b.bumped_at_ms ?? 0) - (a.bumped_at_ms ?? 0))
      .slice(0, RECALL_SHOWN);
    $("recall-list").replaceChildren(...bumped.map(recallNode));
    $("count").textContent = `${open.length} open`;
    tick();
  }

  function clockText(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const minutes = Math.floor(total / 60);
    return `${minutes}:${String(total % 60).padStart(2, "0")}`;
  }

  function tick() {
    const now = Date.now() + state.offsetMs;
    for (const age of document.querySelectorAll(".ticket .age")) {
      const elapsed = now - Number(age.dataset.fired);
      age.textContent = clockText(elapsed);
      const ticket = age.closest(".ticket");
      ticket.classList.toggle("warn", elapsed >= WARN_AFTER_MS && elapsed < LATE_AFTER_MS);
      ticket.classList.toggle("late", elapsed >= LATE_AFTER_MS);
    }
    $("clock").textContent = new Date(now).toLocaleTimeString();
  }

  function setStatus(status) {
    document.body.dataset.status = status;
    $("banner").hidden = status !== "lost";
  }

  let toastTimer = null;
  function toast(text) {
    const node = $("toast");
    node.textContent = text;
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (node.hidden = true), 4000);
  }

  // -- pairing --------------------------------------------------------------------------------

  function unpaired() {
    localStorage.removeItem(TOKEN_KEY);
    state.token = null;
    clearTimeout(state.retry);
    state.retry = null;
    const ws = state.socket;
    state.socket = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close();
    }
    // what the screen showed is not its to show any more: a new pairing reloads from REST
    state.open.clear();
    state.bumped.clear();
    state.held = null;
    state.lastSeq = null;
    state.generation += 1;
    render();
    setStatus("unpaired");
    $("pairing").hidden = false;
  }

  // A code is single use and a wrong one counts against this address, so a double-click or
  // a second Enter must not send it again: submits are ignored while one is in flight.
  let pairing = false;
  async function pair(event) {
    event.preventDefault();
    if (pairing) return;
    pairing = true;
    const button = $("pair-form").querySelector("button[type=submit]");
    button.disabled = true;
    $("pair-error").textContent = "";
    const body = { code: $("pair-code").value.trim(), name: $("pair-name").value.trim(), kind: "kds" };
    try {
      const resp = await fetch("/v1/devices/pair", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      const answer = await resp.json();
      if (!resp.ok) {
        $("pair-error").textContent = answer?.error?.message || `Pairing failed (${resp.status})`;
        return;
      }
      localStorage.setItem(TOKEN_KEY, answer.device_token);
      state.token = answer.device_token;
      $("pair-code").value = ""; // used up: if the screen is unpaired later, it needs a new one
      $("pairing").hidden = true;
      start();
    } catch (err) {
      $("pair-error").textContent = "The edge is not answering; try again.";
    } finally {
      pairing = false;
      button.disabled = false;
    }
  }

  // -- start ----------------------------------------------------------------------------------

  function start() {
    state.lastSeq = null;
    setStatus("connecting");
    connect();
  }

  $("station").textContent = station;
  $("pair-name").value = `${station.charAt(0).toUpperCase()}${station.slice(1)} screen`;
  $("pair-form").addEventListener("submit", pair);
  $("tickets").addEventListener("click", (event) => {
    const ticket = event.target.closest(".ticket");
    if (ticket && !ticket.classList.contains("pending")) act(ticket.dataset.id, "bump");
  });
  $("recall-list").addEventListener("click", (event) => {
    const item = event.target.closest(".recalled");
    if (item) act(item.dataset.id, "recall");
  });
  setInterval(tick, 1000);
  setInterval(watchdog, 500);
  if (state.token) start();
  else unpaired();
})();
