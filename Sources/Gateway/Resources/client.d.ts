// Type declarations for /client.js (the realtime gateway's browser client).

/** A message, the same on every transport (PROTOCOL.md §1). */
export interface Message {
  id: string;
  channel: string;
  seq: number;
  cursor: string;
  created_at: string;
  sender: string;
  request_id: string | null;
  body: Record<string, unknown>;
}

/** The error envelope (PROTOCOL.md §4) as an Error. */
export declare class GatewayError extends Error {
  code: string;
  status: number;
  details: Record<string, string>;
  requestId?: string;
}

export type Transport = "websocket" | "sse" | "longpoll";

export interface ClientOptions {
  /** The gateway's base URL (default: the page's origin). */
  url?: string;
  /** Several gateways, tried in turn when one cannot be reached. */
  urls?: string[];
  /** A JWT, or a function that returns one; called again on close 4001 and before the token's `exp`. */
  token: string | (() => string | Promise<string>);
  /** The order transports are tried in (default: websocket, sse, longpoll). */
  transports?: Transport[];
  /** Reconnect backoff in milliseconds (default min 250, max 10000), with jitter. */
  backoff?: { min?: number; max?: number };
  /** How long a long-poll waits, in seconds (default 25). */
  pollTimeout?: number;
}

export interface SubscribeOptions {
  onMessage?: (message: Message) => void;
  /** Resume after this cursor. */
  since?: string;
  /** Start this many messages back (when no `since`). */
  history?: number;
  /** The channel's list when the subscription starts (`type: "presence"`), then its join / leave events
   * (WebSocket); giving it asks for them. */
  onPresence?: (event: PresenceEvent | (PresenceList & { type: "presence" })) => void;
  /** Another member typing in this thread (WebSocket). */
  onTyping?: (user: string) => void;
}

export interface PresenceMember { user: string; connections?: number; joined_at?: string }
export interface PresenceEvent { type: "join" | "leave"; channel: string; members: PresenceMember[]; count: number }
export interface PresenceList { channel: string; count: number; members: Required<PresenceMember>[]; truncated: boolean }

export declare class Subscription {
  readonly channel: string;
  /** The position after which the next message is expected (null until known). */
  cursor: string | null;
  /** The `seq` of the last message delivered (0: none). */
  lastSeq: number;
  unsubscribe(): void;
}

export interface ClientEvents {
  connected: { transport: Transport; url: string };
  disconnected: { transport: Transport; reason: unknown };
  resubscribed: { transport: Transport; channels: string[] };
  error: { error: unknown; channel?: string; transport?: Transport };
}

export interface Thread {
  id: string;
  title: string;
  created_at: string;
  members?: string[];
  last_message?: Message | null;
  unread?: number;
}

export declare class Threads {
  list(): Promise<Thread[]>;
  create(title: string, members?: string[]): Promise<Thread>;
  get(id: string): Promise<Thread>;
  addMember(id: string, user: string): Promise<unknown>;
  removeMember(id: string, user: string): Promise<unknown>;
  markRead(id: string, cursor?: string): Promise<{ cursor: string; unread: number }>;
  unreadCounts(): Promise<Record<string, number>>;
}

export declare class GatewayClient {
  constructor(options: ClientOptions);
  /** The transport in use (null before the first connection). */
  readonly transport: Transport | null;
  readonly connected: boolean;
  readonly subscriptions: Map<string, Subscription>;
  readonly threads: Threads;
  on<K extends keyof ClientEvents>(event: K, handler: (detail: ClientEvents[K]) => void): () => void;
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  /** Resolves with the stored message once committed; `requestId` makes a retry idempotent. */
  publish(channel: string, body: Record<string, unknown>, options?: { requestId?: string }): Promise<Message>;
  /** Who is subscribed to the channel, cluster-wide. */
  presence(channel: string): Promise<PresenceList>;
  /** Tells a thread's other members this user is typing (WebSocket only). */
  typing(channel: string): Promise<void>;
  close(): void;
}
