// Realtime gateway browser client: one dependency-free ES module (served by the gateway at /client.js).
//
//   import { GatewayClient } from "/client.js";
//   const client = new GatewayClient({ url: location.origin, token: () => fetchMyToken() });
//   const sub = client.subscribe("topic:alerts", { onMessage: (m) => console.log(m.seq, m.body) });
//   await client.publish("topic:alerts", { text: "hello" });
//
// What it does for you (PROTOCOL.md, version 1):
// - one WebSocket for every subscription; SSE (one stream per channel) and then long-poll when a transport
//   cannot be opened (a proxy refusing upgrades), back to the first one after the last;
// - each subscription tracks its cursor, including the start position of a stream that received nothing,
//   and resumes from it after any reconnect, on whichever server answers: nothing lost, nothing twice
//   (messages at or below the last delivered `seq` are dropped);
// - reconnects with exponential backoff and jitter; a token function is called again on close 4001 and
//   before the token's `exp` (sent as `refresh` on a WebSocket);
// - publishes carry a `request_id`, so a retry after a lost ack is stored once.

const TRANSPORTS = ["websocket", "sse", "longpoll"];

export class GatewayError extends Error {
  constructor(envelope, status) {
    super(envelope?.message ?? `HTTP ${status}`);
    this.code = envelope?.code ?? "HTTP_" + status;
    this.status = status;
    this.details = envelope?.details ?? {};
    this.requestId = envelope?.requestId;
  }
}

/** The `exp` claim of a JWT, in milliseconds since 1970 (undefined when it cannot be read). */
function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(payload + "===".slice((payload.length + 3) % 4))).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

function randomId() {
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** One channel's subscription: its handlers, its cursor and the last `seq` it delivered. */
export class Subscription {
  constructor(client, channel, options) {
    this.client = client;
    this.channel = channel;
    this.onMessage = options.onMessage ?? (() => {});
    /** The list when the subscription starts (`type: "presence"`), then join / leave events (WebSocket). */
    this.onPresence = options.onPresence ?? null;
    /** Another member typing in this thread (WebSocket). */
    this.onTyping = options.onTyping ?? (() => {});
    /** The position after which the next message is expected (null: not known yet). */
    this.cursor = options.since ?? null;
    this.lastSeq = 0;
    this.history = options.history ?? 0;
    this.active = true;
    this.stream = null; // the SSE EventSource or the long-poll's AbortController
  }

  /** A message from any transport: delivered once, in `seq` order. */
  _deliver(message) {
    if (message.seq <= this.lastSeq) return; // already delivered (a resume overlapped)
    this.lastSeq = message.seq;
    this.cursor = message.cursor;
    try {
      this.onMessage(message);
    } catch (error) {
      this.client._emit("error", { error, channel: this.channel });
    }
  }

  /** Where a stream starts: after the cursor, else the last `history` messages, else live only. */
  _start() {
    if (this.cursor) return { since: this.cursor };
    if (this.history > 0) return { history: this.history };
    return {};
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._unsubscribe(this);
  }
}

export class GatewayClient {
  /**
   * @param {object} options
   *   url: the gateway's base URL (default: this page's origin), or `urls`: several, tried in turn;
   *   token: a JWT, or a function returning one (or a promise of one), called again when it expires;
   *   transports: the order to try (default ["websocket", "sse", "longpoll"]);
   *   backoff: { min: 250, max: 10000 } milliseconds; pollTimeout: long-poll wait in seconds (25).
   */
  constructor(options = {}) {
    this.urls = (options.urls ?? [options.url ?? globalThis.location?.origin]).map((u) => u.replace(/\/$/, ""));
    this.tokenSource = options.token;
    this.transports = options.transports ?? TRANSPORTS;
    this.backoff = { min: 250, max: 10000, ...(options.backoff ?? {}) };
    this.pollTimeout = options.pollTimeout ?? 25;
    this.subscriptions = new Map();
    this.listeners = new Map();
    this.transportIndex = 0;
    this.urlIndex = 0;
    this.attempt = 0;
    this.token = null;
    this.transport = null; // the transport in use once connected
    this.connected = false;
    this.closed = false;
    this.ws = null;
    this.pending = new Map(); // WebSocket command id -> { resolve, reject }
    this.nextId = 1;
    this.refreshTimer = null;
    this.threads = new Threads(this);
    this._connect();
  }

  // ---- events: connected, disconnected, resubscribed, error, message ----

  on(event, handler) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(handler);
    return () => this.listeners.get(event)?.delete(handler);
  }

  _emit(event, detail) {
    for (const handler of this.listeners.get(event) ?? []) {
      try { handler(detail); } catch (error) { console.error(error); }
    }
  }

  get url() { return this.urls[this.urlIndex % this.urls.length]; }

  // ---- tokens ----

  async _freshToken() {
    const source = this.tokenSource;
    this.token = typeof source === "function" ? await source() : source;
    this._scheduleRefresh();
    return this.token;
  }

  /** Before `exp`: a new token from the function, sent as `refresh` (WebSocket) or used from the next request. */
  _scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    const exp = tokenExpiry(this.token ?? "");
    if (!exp || typeof this.tokenSource !== "function") return;
    const left = exp - Date.now();
    const margin = Math.min(30000, Math.max(1000, left * 0.25));
    this.refreshTimer = setTimeout(() => this._refresh(), Math.max(0, left - margin));
  }

  async _refresh() {
    if (this.closed) return;
    try {
      const token = await this._freshToken();
      if (this.transport === "websocket" && this.ws?.readyState === WebSocket.OPEN) {
        await this._command({ type: "refresh", token });
      } else if (this.transport === "sse") {
        // EventSource cannot change its URL: reopen each stream from its cursor with the new token.
        for (const sub of this.subscriptions.values()) this._openEventSource(sub).catch(() => this._lost({ channel: sub.channel }));
      }
    } catch (error) {
      this._emit("error", { error });
      this.refreshTimer = setTimeout(() => this._refresh(), 1000);
    }
  }

  // ---- connecting, falling back, reconnecting ----

  async _connect() {
    if (this.closed) return;
    const kind = this.transports[this.transportIndex % this.transports.length];
    let opened = false;
    try {
      await this._freshToken();
      if (kind === "websocket") await this._openWebSocket();
      else if (kind === "sse") await this._openEventStreams();
      else await this._startLongPolls();
      opened = true;
    } catch (error) {
      this._emit("error", { error, transport: kind });
    }
    if (opened) {
      this.attempt = 0;
      this.transport = kind;
      this.connected = true;
      this._emit("connected", { transport: kind, url: this.url });
      if (this.subscriptions.size > 0) this._emit("resubscribed", { transport: kind, channels: [...this.subscriptions.keys()] });
      return;
    }
    // Could not open this transport here: the next transport (then the next URL), after a backoff.
    this.transportIndex += 1;
    if (this.transportIndex % this.transports.length === 0) this.urlIndex += 1;
    this._retryLater();
  }

  _retryLater() {
    if (this.closed) return;
    const step = Math.min(this.backoff.max, this.backoff.min * 2 ** Math.min(this.attempt, 10));
    this.attempt += 1;
    setTimeout(() => this._connect(), step / 2 + Math.random() * step / 2);
  }

  /** The transport in use dropped: the same one again first, from every cursor. */
  _lost(reason) {
    if (this.closed || !this.connected) return;
    this.connected = false;
    this._teardown();
    this._emit("disconnected", { transport: this.transport, reason });
    this._retryLater();
  }

  _teardown() {
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = this.ws.onerror = null;
      try { this.ws.close(); } catch {}
      this.ws = null;
    }
    for (const { reject } of this.pending.values()) reject(new GatewayError({ code: "DISCONNECTED", message: "connection lost" }, 0));
    this.pending.clear();
    for (const sub of this.subscriptions.values()) this._stopStream(sub);
  }

  close() {
    this.closed = true;
    clearTimeout(this.refreshTimer);
    this._teardown();
    this.connected = false;
  }

  // ---- WebSocket ----

  _openWebSocket() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url.replace(/^http/, "ws") + "/v1/ws?access_token=" + encodeURIComponent(this.token));
      let open = false;
      ws.onopen = () => {
        open = true;
        this.ws = ws;
        for (const sub of this.subscriptions.values()) this._wsSubscribe(sub);
        resolve();
      };
      ws.onmessage = (event) => this._wsReceived(JSON.parse(event.data));
      ws.onclose = (event) => {
        if (!open) return reject(new Error(`WebSocket refused (${event.code})`));
        if (event.code === 4001 || event.code === 4003) this.token = null; // expired or revoked: fetch a new one
        this._lost({ code: event.code, reason: event.reason });
      };
    });
  }

  _wsReceived(frame) {
    if (frame.type === "message") {
      this.subscriptions.get(frame.channel)?._deliver(frame.message);
      return;
    }
    if (frame.type === "join" || frame.type === "leave") {
      this.subscriptions.get(frame.channel)?.onPresence?.(frame);
      return;
    }
    if (frame.type === "typing") {
      this.subscriptions.get(frame.channel)?.onTyping(frame.user);
      return;
    }
    if (frame.type === "subscribed") {
      const sub = this.subscriptions.get(frame.channel);
      if (sub && !sub.cursor) sub.cursor = frame.cursor; // the start of a stream that received nothing yet
    } else if (frame.type === "unsubscribed" && !frame.id) {
      const sub = this.subscriptions.get(frame.channel);
      if (sub) {
        this.subscriptions.delete(frame.channel);
        sub.active = false;
        this._emit("error", { channel: frame.channel, error: new GatewayError({ code: "UNSUBSCRIBED", message: frame.reason }, 0) });
      }
    }
    const waiting = frame.id && this.pending.get(frame.id);
    if (waiting) {
      this.pending.delete(frame.id);
      if (frame.type === "error") waiting.reject(new GatewayError(frame.error, frame.error?.status ?? 0));
      else waiting.resolve(frame);
    } else if (frame.type === "error") {
      this._emit("error", { error: new GatewayError(frame.error, 0) });
    }
  }

  _command(object) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return reject(new GatewayError({ code: "DISCONNECTED", message: "not connected" }, 0));
      const id = String(this.nextId++);
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...object, id }));
    });
  }

  _wsSubscribe(sub) {
    const presence = sub.onPresence ? { presence: true } : {};
    this._command({ type: "subscribe", channel: sub.channel, ...sub._start(), ...presence }).then(
      (reply) => {
        if (!sub.cursor) sub.cursor = reply.cursor;
        // The list as it is once the subscription watches it; join / leave events follow from there.
        if (sub.onPresence) {
          this._command({ type: "presence", channel: sub.channel }).then((list) => sub.onPresence(list), () => {});
        }
      },
      (error) => this._emit("error", { error, channel: sub.channel }),
    );
  }

  // ---- Server-Sent Events: one stream per channel ----

  /**
   * A stream that has no cursor yet starts from one read over REST: the channel's head (live only), or after
   * the last `history` messages, which are delivered from that page. (A browser does not let a page read the
   * start position an event stream names in its first `id:` line.)
   */
  async _ensureStart(sub, signal) {
    if (sub.cursor) return;
    const page = await this._request("GET", `/v1/channels/${encodeURIComponent(sub.channel)}/messages?limit=${Math.max(1, sub.history)}`,
      undefined, signal);
    if (sub.history > 0) for (const message of page.messages) sub._deliver(message);
    if (!sub.cursor || sub.history === 0) sub.cursor = page.cursor;
  }

  async _openEventStreams() {
    await this._request("GET", "/healthz");
    await Promise.all([...this.subscriptions.values()].map((sub) => this._openEventSource(sub)));
  }

  async _openEventSource(sub) {
    this._stopStream(sub);
    const marker = {};
    sub.stream = marker;
    await this._ensureStart(sub);
    if (sub.stream !== marker) return; // stopped or reopened meanwhile
    const query = "?access_token=" + encodeURIComponent(this.token) + "&since=" + encodeURIComponent(sub.cursor);
    const source = new EventSource(this.url + "/v1/channels/" + encodeURIComponent(sub.channel) + "/events" + query);
    sub.stream = source;
    await new Promise((resolve, reject) => {
      let open = false;
      source.onopen = () => {
        open = true;
        resolve();
      };
      source.addEventListener("message", (event) => sub._deliver(JSON.parse(event.data)));
      source.onerror = () => {
        // The browser would reconnect by itself with Last-Event-ID; the client does it instead, from its
        // cursor, with a fresh token and its own backoff.
        source.close();
        if (!open) return reject(new Error("event stream refused"));
        if (sub.stream === source) this._lost({ channel: sub.channel });
      };
    });
  }

  // ---- long-poll: one loop per channel ----

  async _startLongPolls() {
    await this._request("GET", "/healthz");
    for (const sub of this.subscriptions.values()) this._pollLoop(sub);
  }

  async _pollLoop(sub) {
    this._stopStream(sub);
    const controller = new AbortController();
    sub.stream = controller;
    try {
      await this._ensureStart(sub, controller.signal);
      while (sub.stream === controller && sub.active) {
        const page = await this._request("GET",
          `/v1/channels/${encodeURIComponent(sub.channel)}/poll?since=${encodeURIComponent(sub.cursor)}&timeout=${this.pollTimeout}`,
          undefined, controller.signal);
        for (const message of page.messages) sub._deliver(message);
        if (page.cursor) sub.cursor = page.cursor;
      }
    } catch (error) {
      if (sub.stream === controller && !controller.signal.aborted) this._lost({ channel: sub.channel, error });
    }
  }

  _stopStream(sub) {
    const stream = sub.stream;
    sub.stream = null;
    if (stream instanceof EventSource) stream.close();
    else if (stream instanceof AbortController) stream.abort();
  }

  // ---- subscriptions and publishing ----

  /**
   * Subscribes to `channel`; `options`: onMessage(message), since (a cursor), history (N messages back).
   * Resubscribed from its cursor after every reconnect, on any transport.
   */
  subscribe(channel, options = {}) {
    if (this.subscriptions.has(channel)) throw new Error(`already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, options);
    this.subscriptions.set(channel, sub);
    if (this.connected) {
      if (this.transport === "websocket") this._wsSubscribe(sub);
      else if (this.transport === "sse") this._openEventSource(sub).catch(() => this._lost({ channel }));
      else this._pollLoop(sub);
    }
    return sub;
  }

  _unsubscribe(sub) {
    this.subscriptions.delete(sub.channel);
    this._stopStream(sub);
    if (this.transport === "websocket" && this.connected) this._command({ type: "unsubscribe", channel: sub.channel }).catch(() => {});
  }

  /**
   * Publishes `body` (a JSON object) to `channel`; resolves with the stored message once committed. The
   * request id (given, or made here) makes a retry idempotent: `publish(ch, body, { requestId })` again
   * after an error returns the original message.
   */
  async publish(channel, body, { requestId = randomId() } = {}) {
    if (this.transport === "websocket" && this.ws?.readyState === WebSocket.OPEN) {
      const ack = await this._command({ type: "publish", channel, request_id: requestId, body });
      return ack.message;
    }
    const answer = await this._request("POST", `/v1/channels/${encodeURIComponent(channel)}/messages`, { body }, undefined, { "Idempotency-Key": requestId });
    return answer.message;
  }

  /** Who is subscribed to `channel`, cluster-wide: `{channel, count, members: [{user, connections, joined_at}], truncated}`. */
  async presence(channel) {
    return this._request("GET", `/v1/channels/${encodeURIComponent(channel)}/presence`);
  }

  /** Tells a thread's other members this user is typing (WebSocket only; a no-op on other transports). */
  async typing(channel) {
    if (this.transport !== "websocket" || this.ws?.readyState !== WebSocket.OPEN) return;
    await this._command({ type: "typing", channel });
  }

  /** A REST call with the current token; the error envelope becomes a `GatewayError`. */
  async _request(method, path, body, signal, headers = {}) {
    if (!this.token) await this._freshToken();
    const response = await fetch(this.url + path, {
      method,
      signal,
      headers: { Authorization: "Bearer " + this.token, ...(body ? { "Content-Type": "application/json" } : {}), ...headers },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await response.text();
    const json = text ? JSON.parse(text) : {};
    if (response.status === 401 && typeof this.tokenSource === "function" && json.code === "UNAUTHENTICATED") this.token = null;
    if (!response.ok) throw new GatewayError(json, response.status);
    return json;
  }
}

/** Threads, members, read cursors and unread counts over the REST API. */
export class Threads {
  constructor(client) { this.client = client; }
  /** The caller's threads, each with its last message and `unread` count. */
  async list() { return (await this.client._request("GET", "/v1/threads")).threads; }
  async create(title, members = []) { return (await this.client._request("POST", "/v1/threads", { title, members })).thread; }
  async get(id) { return (await this.client._request("GET", `/v1/threads/${id}`)).thread; }
  async addMember(id, user) { return this.client._request("POST", `/v1/threads/${id}/members`, { user }); }
  async removeMember(id, user) { return this.client._request("DELETE", `/v1/threads/${id}/members/${encodeURIComponent(user)}`); }
  /** Moves the read cursor forward to `cursor` (default: the subscription's); resolves `{cursor, unread}`. */
  async markRead(id, cursor) {
    const position = cursor ?? this.client.subscriptions.get(`thread:${id}`)?.cursor;
    return this.client._request("PUT", `/v1/threads/${id}/read`, { cursor: position });
  }
  /** Unread counts by thread id. */
  async unreadCounts() {
    return Object.fromEntries((await this.list()).map((thread) => [thread.id, thread.unread]));
  }
}
