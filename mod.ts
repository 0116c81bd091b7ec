/**
 * Network ports that nobody else is using, for tests, CI farms and scripts.
 *
 * A TypeScript reimplementation of Google's Python `portpicker`, wire-compatible
 * with its `portserver`. Runs on Deno, Bun and Node.js 22 or later, with no
 * dependencies.
 *
 * @example Pick a port
 * ```ts
 * import { pickUnusedPort } from "@x/portpicker";
 *
 * const port = await pickUnusedPort();
 * console.log(`listening on ${port}`);
 * ```
 *
 * @module
 */

import { claimPort, releaseClaim, reservedPorts } from "./claims.ts";

/** The version of this package. */
export const VERSION = "0.1.0";

/** The search range when none is given: the Python original's 15000–24999. */
export const DEFAULT_RANGE: readonly [number, number] = [15000, 24999];

/**
 * Thrown when no free port can be found: every port of the search range was
 * tried and none was free, or all of them were already handed out to this
 * process.
 *
 * @example
 * ```ts
 * import { NoFreePortFoundError, pickUnusedPort } from "@x/portpicker";
 *
 * try {
 *   await pickUnusedPort({ range: [40000, 40009] });
 * } catch (error) {
 *   if (!(error instanceof NoFreePortFoundError)) throw error;
 *   console.error(error.message);
 * }
 * ```
 */
export class NoFreePortFoundError extends Error {
  /** The inclusive search range that was exhausted. */
  readonly range: readonly [number, number];
  /** How many ports of the range were tried. */
  readonly tried: number;

  /**
   * Makes the error; the message names the range and the number of ports tried.
   *
   * @param range The inclusive search range that was walked.
   * @param tried How many of its ports were tried.
   */
  constructor(range: readonly [number, number], tried: number) {
    super(
      `No free port found in ${range[0]}-${range[1]}: tried ${tried} of ${
        range[1] - range[0] + 1
      } ports`,
    );
    this.name = "NoFreePortFoundError";
    this.range = range;
    this.tried = tried;
  }
}

/** Options of {@linkcode pickUnusedPort} and the functions built on it. */
export interface PickOptions {
  /**
   * The process the port is for, told to the port server. Defaults to this
   * process.
   */
  pid?: number;
  /**
   * The port server to ask first: a Unix socket path, or `@name` for the
   * Linux abstract namespace. Defaults to the `PORTSERVER_ADDRESS`
   * environment variable; without either, no server is asked.
   */
  portserverAddress?: string;
  /** Preferred ports, tried first and in this order. */
  ports?: Iterable<number>;
  /**
   * The inclusive search range `[first, last]`. When given, every port
   * returned lies in it and the kernel is not asked for a port of its own
   * choosing. Defaults to `[15000, 24999]`, searched after the kernel's pick.
   */
  range?: readonly [number, number];
  /** Ports never returned. */
  exclude?: Iterable<number>;
  /**
   * A directory shared by processes that must never get the same port, with
   * no port server: each port picked here is claimed with a file in it.
   * Defaults to the `PORTPICKER_LOCK_DIR` environment variable; without
   * either, no claims are made.
   */
  lockDir?: string;
  /**
   * Stored with the allocation by this project's port server (shown by its
   * status request); ignored by the Python server. Printable, no spaces, 1 to
   * 100 characters.
   */
  label?: string;
}

/** Options of {@linkcode getPortFromPortServer}. */
export interface PortServerOptions {
  /** The process the port is for. Defaults to this process. */
  pid?: number;
}

/**
 * A port held bound on TCP and UDP until {@linkcode PortReservation.release}
 * is called. Works with `using` and `await using`.
 */
export interface PortReservation extends Disposable, AsyncDisposable {
  /** The reserved port. */
  readonly port: number;
  /**
   * Closes the sockets that hold the port, so that the caller can bind it.
   * The port stays given to this process: pass it to
   * {@linkcode returnPort} when done with it.
   */
  release(): Promise<void>;
}

// ---------------------------------------------------------------------------
// Runtime adapter: Deno.* sockets where the runtime has them (much faster than
// Deno's node:net), node:net / node:dgram everywhere else.

type Proto = "tcp" | "udp";

interface BoundSocket {
  readonly port: number;
  close(): Promise<void>;
}

interface ErrorWithCode {
  code?: unknown;
  name?: unknown;
  message?: unknown;
}

// deno-lint-ignore no-explicit-any
const runtime = globalThis as any;
const deno: typeof Deno | undefined = runtime.Deno;
/** Bun's native socket API, the part used here. */
const bun: BunSockets | undefined = runtime.Bun;

interface BunSockets {
  listen(
    options: { hostname: string; port: number; socket: { data(): void } },
  ): {
    port: number;
    unref(): void;
    stop(closeActive: boolean): void;
  };
  udpSocket(options: { hostname: string; port: number }): Promise<{
    port: number;
    unref(): void;
    close(): void;
  }>;
}
const isWindows = deno
  ? deno.build.os === "windows"
  : runtime.process?.platform === "win32";

let netModule: Promise<typeof import("node:net")> | undefined;
let dgramModule: Promise<typeof import("node:dgram")> | undefined;
// Loaded on first use: importing them costs Deno start-up time.
const loadNet = () => netModule ??= import("node:net");
const loadDgram = () => dgramModule ??= import("node:dgram");

const CLOSED: Promise<void> = Promise.resolve();

async function bindTcp(hostname: string, port: number): Promise<BoundSocket> {
  if (bun) {
    // Bun's own sockets: a quarter faster than its node:net here.
    const listener = bun.listen({ hostname, port, socket: { data() {} } });
    // A held port must not keep the caller's process alive.
    listener.unref();
    return { port: listener.port, close: () => (listener.stop(true), CLOSED) };
  }
  if (deno) {
    const listener = deno.listen({ hostname, port, transport: "tcp" });
    return {
      port: (listener.addr as Deno.NetAddr).port,
      close: () => (listener.close(), CLOSED),
    };
  }
  const net = await loadNet();
  return await new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen({ host: hostname, port, backlog: 1, exclusive: true }, () => {
      server.off("error", reject);
      // A held port must not keep the caller's process alive.
      server.unref();
      resolve({
        port: (server.address() as { port: number }).port,
        close: () => new Promise((done) => server.close(() => done())),
      });
    });
  });
}

async function bindUdp(hostname: string, port: number): Promise<BoundSocket> {
  if (bun) {
    const socket = await bun.udpSocket({ hostname, port });
    socket.unref();
    return { port: socket.port, close: () => (socket.close(), CLOSED) };
  }
  // Deno.listenDatagram exists only with --unstable-net.
  if (deno && typeof deno.listenDatagram === "function") {
    const conn = deno.listenDatagram({ hostname, port, transport: "udp" });
    return {
      port: (conn.addr as Deno.NetAddr).port,
      close: () => (conn.close(), CLOSED),
    };
  }
  if (deno) {
    // Deno's node:dgram reports a missing permission asynchronously, out of
    // reach of any catch: ask first.
    const host = `${hostname === "::" ? "[::]" : hostname}:${port}`;
    if (deno.permissions.querySync({ name: "net", host }).state !== "granted") {
      throw Object.assign(new Error(`Requires net access to "${host}"`), {
        name: "NotCapable",
      });
    }
  }
  const dgram = await loadDgram();
  return await new Promise((resolve, reject) => {
    const socket = dgram.createSocket({
      type: hostname.includes(":") ? "udp6" : "udp4",
      reuseAddr: false,
    });
    const failed = (error: Error) => {
      socket.close();
      reject(error);
    };
    socket.once("error", failed);
    socket.bind({ address: hostname, port, exclusive: true }, () => {
      socket.off("error", failed);
      socket.unref();
      resolve({
        port: socket.address().port,
        close: () => new Promise((done) => socket.close(() => done())),
      });
    });
  });
}

const bindOne = (proto: Proto, hostname: string, port: number) =>
  proto === "tcp" ? bindTcp(hostname, port) : bindUdp(hostname, port);

/** Errors that say the host lacks this address family: skip the family. */
const FAMILY_MISSING = new Set([
  "EAFNOSUPPORT",
  "EADDRNOTAVAIL",
  "EPROTONOSUPPORT",
  "AddrNotAvailable",
]);
/** Errors that say the port is taken, or not ours to take. */
const PORT_TAKEN = new Set([
  "EADDRINUSE",
  "EACCES",
  "EPERM",
  "AddrInUse",
]);

function classify(error: unknown): "family" | "taken" | "other" {
  const { code, name } = (error ?? {}) as ErrorWithCode;
  if (
    FAMILY_MISSING.has(code as string) || FAMILY_MISSING.has(name as string)
  ) {
    return "family";
  }
  // Deno's own permission error is "NotCapable", and is not about the port.
  if (PORT_TAKEN.has(code as string) || PORT_TAKEN.has(name as string)) {
    return "taken";
  }
  if (name === "PermissionDenied" && code === undefined) return "taken";
  return "other";
}

function bindError(
  error: unknown,
  proto: Proto,
  hostname: string,
  port: number,
): Error {
  const { name, message } = (error ?? {}) as ErrorWithCode;
  const why = name === "NotCapable"
    ? "network access denied (Deno needs --allow-net)"
    : String(message ?? error);
  return new Error(
    `Cannot check port ${port} (${proto.toUpperCase()} on ${hostname}): ${why}`,
    { cause: error },
  );
}

/** IPv6 first: a dual-stack IPv6 socket covers IPv4 too. */
const WILDCARDS = ["::", "0.0.0.0"] as const;

/**
 * Per protocol: whether one bind on `::` covers IPv4 too (dual-stack, as
 * Linux does by default). Then a single bind checks both families: it fails
 * whenever an IPv4 or an IPv6 socket holds the port, as the two binds of the
 * Python original would. Found out once, on first use.
 */
const dualStack: Partial<Record<Proto, Promise<boolean>>> = {};

async function detectDualStack(proto: Proto): Promise<boolean> {
  let v6: BoundSocket;
  try {
    v6 = await bindOne(proto, "::", 0);
  } catch {
    return false;
  }
  try {
    await (await bindOne(proto, "0.0.0.0", v6.port)).close();
    return false;
  } catch (error) {
    return classify(error) === "taken";
  } finally {
    await v6.close();
  }
}

/**
 * Python's `bind()`: binds `port` on each family the host has, one at a time,
 * and closes it again. Port 0 takes the kernel's choice on IPv6 and then tries
 * that port on IPv4. Returns the port, or undefined when it is taken on any
 * family or the host has none.
 */
async function bindEachFamily(
  proto: Proto,
  port: number,
): Promise<number | undefined> {
  const hosts = (await (dualStack[proto] ??= detectDualStack(proto)))
    ? DUAL
    : WILDCARDS;
  let found = false;
  for (const hostname of hosts) {
    let socket: BoundSocket;
    try {
      socket = await bindOne(proto, hostname, port);
    } catch (error) {
      const kind = classify(error);
      if (kind === "family") continue;
      if (kind === "taken") return undefined;
      throw bindError(error, proto, hostname, port);
    }
    found = true;
    port = socket.port;
    await socket.close();
  }
  return found ? port : undefined;
}

const DUAL = ["::"] as const;

/**
 * Binds `port` on TCP and UDP on the wildcard address and keeps both bound:
 * IPv6 (dual-stack, so IPv4 too) where the host has it, else IPv4.
 */
async function holdPort(port: number): Promise<BoundSocket[] | undefined> {
  const held: BoundSocket[] = [];
  for (const proto of ["tcp", "udp"] as const) {
    let socket: BoundSocket | undefined;
    for (const hostname of WILDCARDS) {
      try {
        socket = await bindOne(proto, hostname, port);
        break;
      } catch (error) {
        const kind = classify(error);
        if (kind === "family") continue;
        await Promise.all(held.map((s) => s.close()));
        if (kind === "taken") return undefined;
        throw bindError(error, proto, hostname, port);
      }
    }
    if (socket) held.push(socket);
  }
  return held;
}

// ---------------------------------------------------------------------------
// Argument checks: a bad value is named in the error.

function checkPort(port: unknown, what = "port"): number {
  if (typeof port !== "number" || !Number.isInteger(port)) {
    throw new TypeError(
      `Invalid ${what} ${formatValue(port)}: expected an integer`,
    );
  }
  if (port < 1 || port > 65535) {
    throw new RangeError(
      `Invalid ${what} ${port}: expected an integer from 1 to 65535`,
    );
  }
  return port;
}

function checkPid(pid: unknown): number {
  if (typeof pid !== "number" || !Number.isInteger(pid)) {
    throw new TypeError(`Invalid pid ${formatValue(pid)}: expected an integer`);
  }
  if (pid < 1 || pid > 0x7fffffff) {
    throw new RangeError(`Invalid pid ${pid}: expected a positive integer`);
  }
  return pid;
}

function checkRange(range: unknown): readonly [number, number] {
  if (!Array.isArray(range) || range.length !== 2) {
    throw new TypeError(
      `Invalid range ${formatValue(range)}: expected [first, last]`,
    );
  }
  const [first, last] = range;
  checkPort(first, "range start");
  checkPort(last, "range end");
  if (first > last) {
    throw new RangeError(
      `Invalid range [${first}, ${last}]: the first port is after the last`,
    );
  }
  return [first, last];
}

function formatValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(formatValue).join(", ")}]`;
  return String(value);
}

// ---------------------------------------------------------------------------
// Per-process state, as in the Python original.

/** Reserved or returned ports: handed out first, without a check. */
const freePorts = new Set<number>();
/** Ports that came from the port server or from the free set. */
const ownedPorts = new Set<number>();
/** Ports this process found itself and has not returned. */
const randomPorts = new Set<number>();

/** Whether this process was given `port` and has not returned it. */
function given(port: number): boolean {
  return randomPorts.has(port) || ownedPorts.has(port);
}

/**
 * Marks a port, acquired by other means, as free for this process: the next
 * pick hands it out first, without checking it.
 *
 * @param port The port, from 1 to 65535.
 *
 * @example
 * ```ts
 * import { addReservedPort, pickUnusedPort } from "@x/portpicker";
 *
 * addReservedPort(20000);
 * console.log(await pickUnusedPort()); // 20000
 * ```
 */
export function addReservedPort(port: number): void {
  freePorts.add(checkPort(port));
}

/**
 * Gives back a port that is no longer used. A port this process found itself
 * may be picked again (its claim in a lock directory is removed). A port from
 * this project's port server goes back to the server, which frees it at once
 * (in the background); one from the Python server, or from the free set, goes
 * back to the free set and is handed out first. Returning a port that was
 * already returned, or never given, does nothing.
 *
 * @param port The port, from 1 to 65535.
 *
 * @example
 * ```ts
 * import { pickUnusedPort, returnPort } from "@x/portpicker";
 *
 * const port = await pickUnusedPort();
 * // ... use the port, stop using it ...
 * returnPort(port);
 * ```
 */
export function returnPort(port: number): void {
  checkPort(port);
  releaseClaim(port);
  if (randomPorts.delete(port)) return;
  if (!ownedPorts.delete(port)) return;
  const from = serverPorts.get(port);
  serverPorts.delete(port);
  // A server that takes ports back frees it for everybody; kept here too, it
  // could be handed out twice.
  if (from && extendedServers.get(from.address) !== false) {
    returnToServer(port, from.address, from.pid);
  } else {
    freePorts.add(port);
  }
}

/**
 * Tells whether `port` is free on both TCP and UDP: it binds the wildcard
 * address on IPv6 and then on IPv4 for each protocol, as the Python original
 * does. A family the host lacks is skipped; a port in use, or one this process
 * may not bind, is not free.
 *
 * @param port The port, from 1 to 65535.
 * @returns Whether every bind succeeded.
 * @throws {Error} On any other bind error, naming the port.
 *
 * @example
 * ```ts
 * import { isPortFree } from "@x/portpicker";
 *
 * if (await isPortFree(8080)) console.log("8080 is free");
 * ```
 */
export async function isPortFree(port: number): Promise<boolean> {
  checkPort(port);
  return await isFree(port);
}

async function isFree(port: number): Promise<boolean> {
  return (await bindEachFamily("tcp", port)) !== undefined &&
    (await bindEachFamily("udp", port)) !== undefined;
}

// ---------------------------------------------------------------------------
// Port server client.

const REPLY_LIMIT = 1024;
const SERVER_TIMEOUT_MS = 10_000;

/** `@name` is the Linux abstract namespace; on Windows, a named pipe. */
function socketPath(address: string): string {
  if (!address.startsWith("@")) return address;
  return isWindows
    ? `\\\\.\\pipe\\${address.slice(1)}`
    : `\0${address.slice(1)}`;
}

/** A Unix stream connection to a port server, the same on every runtime. */
interface ServerConnection {
  /** Sends `text`; with `end`, closes the sending side afterwards. */
  write(text: string, end: boolean): Promise<void>;
  /** The next chunk, or null at the end. */
  read(): Promise<Uint8Array | null>;
  close(): void;
  /** Lets the process exit while the connection stays open. */
  unref(): void;
}

async function connectServer(address: string): Promise<ServerConnection> {
  const path = socketPath(address);
  if (deno && !isWindows) {
    const conn = await deno.connect({ transport: "unix", path });
    const buffer = new Uint8Array(4096);
    let closed = false;
    return {
      write: async (text, end) => {
        const bytes = new TextEncoder().encode(text);
        for (let n = 0; n < bytes.length;) {
          n += await conn.write(bytes.subarray(n));
        }
        if (end) await conn.closeWrite();
      },
      read: async () => {
        if (closed) return null;
        const n = await conn.read(buffer);
        return n === null ? null : buffer.slice(0, n);
      },
      close: () => {
        if (closed) return;
        closed = true;
        try {
          conn.close();
        } catch { /* already closed */ }
      },
      unref: () => conn.unref(),
    };
  }
  const net = await loadNet();
  const socket = net.connect({ path });
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  const chunks: (Uint8Array | null)[] = [];
  let wake: (() => void) | undefined;
  let failure: Error | undefined;
  const push = (chunk: Uint8Array | null) => {
    chunks.push(chunk);
    wake?.();
  };
  socket.on("data", (chunk: Uint8Array) => push(chunk));
  socket.on("end", () => push(null));
  socket.on("close", () => push(null));
  socket.on("error", (error: Error) => {
    failure = error;
    push(null);
  });
  return {
    write: (text, end) =>
      new Promise((resolve, reject) => {
        const done = (error?: Error | null) =>
          error ? reject(error) : resolve();
        if (end) socket.end(text, () => done());
        else socket.write(text, done);
      }),
    read: async () => {
      while (chunks.length === 0) {
        await new Promise<void>((resolve) => wake = resolve);
        wake = undefined;
      }
      const chunk = chunks.shift()!;
      if (chunk === null) {
        chunks.unshift(null);
        if (failure) throw failure;
      }
      return chunk;
    },
    close: () => void socket.destroy(),
    unref: () => void socket.unref(),
  };
}

/**
 * Sends one request to a port server and reads the reply up to its end.
 * @internal Shared with the server tests and the CLI.
 */
export async function portServerRequest(
  address: string,
  request: string,
  limit = REPLY_LIMIT,
): Promise<string> {
  const connection = await connectServer(address);
  const timer = setTimeout(() => connection.close(), SERVER_TIMEOUT_MS);
  try {
    await connection.write(request, true);
    const chunks: Uint8Array[] = [];
    let size = 0;
    while (size < limit) {
      const chunk = await connection.read();
      if (chunk === null) break;
      chunks.push(chunk);
      size += chunk.length;
    }
    return new TextDecoder().decode(concat(chunks)).slice(0, limit);
  } finally {
    clearTimeout(timer);
    connection.close();
  }
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

/** The port in a server reply, or undefined for none (empty, 0, garbage). */
function parseReply(reply: string): number | undefined {
  const line = reply.split("\n")[0].trim();
  if (!/^\+?\d{1,5}$/.test(line)) return undefined;
  const port = Number(line);
  return port >= 1 && port <= 65535 ? port : undefined;
}

/**
 * Asks a port server for a port, with the Python client's wire protocol: the
 * pid in ASCII and a newline; the reply's first line is the port. On an empty
 * or unusable reply, prints `Portserver failed to find a port.` to stderr; on
 * a connection error, prints it. Both return undefined.
 *
 * @param address A Unix socket path, or `@name` for the Linux abstract
 * namespace (a named pipe on Windows). Empty: no server, undefined.
 * @param options The pid to ask for; defaults to this process.
 * @returns The port, or undefined when the server gave none.
 *
 * @example
 * ```ts
 * import { getPortFromPortServer } from "@x/portpicker";
 *
 * const port = await getPortFromPortServer("@unittest-portserver");
 * console.log(port ?? "no port from the server");
 * ```
 */
export async function getPortFromPortServer(
  address: string,
  options: PortServerOptions = {},
): Promise<number | undefined> {
  if (typeof address !== "string") {
    throw new TypeError(
      `Invalid port server address ${formatValue(address)}: expected a string`,
    );
  }
  const pid = options.pid === undefined ? currentPid() : checkPid(options.pid);
  if (!address) return undefined;
  let reply: string;
  try {
    reply = await portServerRequest(address, `${pid}\n`);
  } catch (error) {
    const { message } = (error ?? {}) as ErrorWithCode;
    console.error(
      `Socket error when connecting to portserver: ${message ?? error}`,
    );
    return undefined;
  }
  const port = parseReply(reply);
  if (port === undefined) {
    console.error("Portserver failed to find a port.");
    return undefined;
  }
  ownedPorts.add(port);
  serverPorts.set(port, { address, pid });
  return port;
}

// ---------------------------------------------------------------------------
// The extended protocol of this project's server. Every extended request
// starts with a word, which the Python server cannot parse: it closes without
// a reply, and the client falls back to the classic request.

/** Per server address: whether it speaks the extended protocol. */
const extendedServers = new Map<string, boolean>();
/** Ports from a port server: who asked for them, and where. */
const serverPorts = new Map<number, { address: string; pid: number }>();

/** A label as the server takes it: printable, no spaces, 1–100 characters. */
function checkLabel(label: unknown): string {
  if (typeof label !== "string" || !/^[\x21-\x7e]{1,100}$/.test(label)) {
    throw new TypeError(
      `Invalid label ${
        formatValue(label)
      }: expected 1 to 100 printable characters without spaces`,
    );
  }
  return label;
}

function checkCount(count: unknown): number {
  if (typeof count !== "number" || !Number.isInteger(count)) {
    throw new TypeError(
      `Invalid count ${formatValue(count)}: expected an integer`,
    );
  }
  if (count < 1) {
    throw new RangeError(`Invalid count ${count}: expected at least 1`);
  }
  return count;
}

/** Runs `talk`; a connection error names the server it could not reach. */
async function reach<T>(address: string, talk: () => Promise<T>): Promise<T> {
  try {
    return await talk();
  } catch (error) {
    const { message } = (error ?? {}) as ErrorWithCode;
    throw new Error(
      `Cannot reach the port server at ${address}: ${message ?? error}`,
      { cause: error },
    );
  }
}

/**
 * Sends an extended request. Returns the reply line, or undefined when the
 * server closed without one (the Python server).
 */
async function extendedRequest(
  address: string,
  request: string,
  limit = REPLY_LIMIT,
): Promise<string | undefined> {
  const reply = await reach(
    address,
    () => portServerRequest(address, request, limit),
  );
  const supported = reply.length > 0;
  extendedServers.set(address, supported);
  return supported ? reply.trimEnd() : undefined;
}

function parsePorts(reply: string): number[] | undefined {
  const match = /^OK((?: \d{1,5})+)$/.exec(reply);
  return match ? match[1].trim().split(" ").map(Number) : undefined;
}

/**
 * Takes `count` ports for `pid` in one request, with a label. On the Python
 * server, which closes without a reply, falls back to one classic request a
 * port (the label is then lost) and remembers to ask classically from then
 * on. Prints the Python client's messages; undefined when no port came.
 */
async function takeFromServer(
  address: string,
  pid: number,
  count: number,
  label: string | undefined,
): Promise<number[] | undefined> {
  if (extendedServers.get(address) !== false) {
    let reply: string | undefined;
    try {
      reply = await extendedRequest(
        address,
        `TAKE pid=${pid} count=${count}${label ? ` label=${label}` : ""}\n`,
      );
    } catch (error) {
      // The Python client's words, with the socket's own message.
      const { message } = ((error as Error).cause ?? error) as ErrorWithCode;
      console.error(
        `Socket error when connecting to portserver: ${message ?? error}`,
      );
      return undefined;
    }
    if (reply !== undefined) {
      const ports = parsePorts(reply);
      if (!ports) {
        console.error("Portserver failed to find a port.");
        return undefined;
      }
      for (const port of ports) {
        ownedPorts.add(port);
        serverPorts.set(port, { address, pid });
      }
      return ports;
    }
  }
  const ports: number[] = [];
  while (ports.length < count) {
    const port = await getPortFromPortServer(address, { pid });
    if (port === undefined) break;
    ports.push(port);
  }
  return ports.length > 0 ? ports : undefined;
}

/**
 * Gives ports back to this project's port server, which frees them at once.
 *
 * @param address The server's address.
 * @param ports The ports, held by `options.pid`.
 * @param options The pid that holds them; defaults to this process.
 * @returns The ports freed.
 * @throws {Error} When the server refuses (a port not held by that pid) or
 * does not speak the extended protocol (the Python server).
 *
 * @example
 * ```ts
 * import { returnPortsToServer } from "@x/portpicker";
 *
 * await returnPortsToServer("@unittest-portserver", [15000]);
 * ```
 */
export async function returnPortsToServer(
  address: string,
  ports: number[],
  options: PortServerOptions = {},
): Promise<number[]> {
  const pid = options.pid === undefined ? currentPid() : checkPid(options.pid);
  if (!Array.isArray(ports) || ports.length === 0) {
    throw new TypeError(
      `Invalid ports ${formatValue(ports)}: expected a non-empty array`,
    );
  }
  ports.forEach((port) => checkPort(port));
  const reply = await extendedRequest(
    address,
    `RETURN pid=${pid} ports=${ports.join(",")}\n`,
  );
  if (reply === undefined) {
    throw new Error(
      `The port server at ${address} cannot take ports back (a Python portserver?)`,
    );
  }
  const freed = parsePorts(reply);
  if (!freed) {
    throw new Error(
      `The port server at ${address} refused: ${reply.replace(/^ERR /, "")}`,
    );
  }
  for (const port of freed) {
    serverPorts.delete(port);
    ownedPorts.delete(port);
    freePorts.delete(port);
  }
  return freed;
}

/** Tells the server a port came back; on the Python server, keeps it locally. */
function returnToServer(port: number, address: string, pid: number): void {
  returnPortsToServer(address, [port], { pid }).catch(() => {
    // The Python server keeps the port for this process: reuse it here.
    if (extendedServers.get(address) === false) freePorts.add(port);
  });
}

/** A lease: ports held by the server for as long as its connection is open. */
export interface PortLease extends Disposable, AsyncDisposable {
  /** The leased ports. */
  readonly ports: readonly number[];
  /** Closes the connection: the server frees the ports at once. */
  release(): Promise<void>;
}

/** Options of {@linkcode leasePorts}. */
export interface LeaseOptions {
  /** The server; defaults to `PORTSERVER_ADDRESS`. */
  portserverAddress?: string;
  /** Stored with the allocation, shown by the status request. */
  label?: string;
}

/**
 * Leases `count` distinct ports from this project's port server: they stay
 * held for exactly as long as this connection is open, whatever happens to
 * the process; for containers and other places where the server cannot see
 * the client's pid. The open connection does not keep the process alive.
 *
 * @param count How many ports, at least 1.
 * @param options The server and a label.
 * @returns The lease.
 * @throws {Error} With no server, when the server has too few free ports, or
 * when it does not speak the extended protocol (the Python server).
 *
 * @example
 * ```ts
 * import { leasePorts } from "@x/portpicker";
 *
 * await using lease = await leasePorts(2, { label: "e2e" });
 * const [web, db] = lease.ports;
 * ```
 */
export async function leasePorts(
  count: number,
  options: LeaseOptions = {},
): Promise<PortLease> {
  checkCount(count);
  const label = options.label === undefined
    ? undefined
    : checkLabel(options.label);
  const address = options.portserverAddress ?? readEnv("PORTSERVER_ADDRESS");
  if (!address) {
    throw new Error(
      "A lease needs a port server: pass portserverAddress or set PORTSERVER_ADDRESS",
    );
  }
  const connection = await reach(address, () => connectServer(address));
  const timer = setTimeout(() => connection.close(), SERVER_TIMEOUT_MS);
  let reply = "";
  try {
    // Not closing the sending side: the lease lasts while the connection does.
    await connection.write(
      `LEASE count=${count}${label ? ` label=${label}` : ""}\n`,
      false,
    );
    while (!reply.includes("\n")) {
      const chunk = await connection.read();
      if (chunk === null) break;
      reply += new TextDecoder().decode(chunk);
    }
  } catch (error) {
    connection.close();
    throw error;
  } finally {
    clearTimeout(timer);
  }
  const ports = parsePorts(reply.trimEnd());
  if (!ports) {
    connection.close();
    extendedServers.set(address, reply.length > 0);
    throw new Error(
      reply.length === 0
        ? `The port server at ${address} cannot lease ports (a Python portserver?)`
        : `The port server at ${address} refused the lease: ${
          reply.trim().replace(/^ERR /, "")
        }`,
    );
  }
  connection.unref();
  const release = () => Promise.resolve(connection.close());
  return {
    ports,
    release,
    [Symbol.dispose]: () => void release(),
    [Symbol.asyncDispose]: release,
  };
}

/** What the status request answers. */
export interface PortServerStatus {
  /** The server's address. */
  address: string;
  /** How many ports it manages. */
  pool: number;
  /** How many are held now. */
  allocated: number;
  /** Who holds which port, since when, with which label. */
  allocations: {
    port: number;
    pid: number | null;
    lease: boolean;
    since: string;
    label: string | null;
  }[];
}

/**
 * Asks this project's port server who holds which port.
 *
 * @param address The server; defaults to `PORTSERVER_ADDRESS`.
 * @returns The server's answer.
 * @throws {Error} With no server, or when it does not speak the extended
 * protocol (the Python server).
 *
 * @example
 * ```ts
 * import { getPortServerStatus } from "@x/portpicker";
 *
 * const status = await getPortServerStatus("@unittest-portserver");
 * console.log(`${status.allocated} of ${status.pool} ports held`);
 * ```
 */
export async function getPortServerStatus(
  address?: string,
): Promise<PortServerStatus> {
  const where = address ?? readEnv("PORTSERVER_ADDRESS");
  if (!where) {
    throw new Error(
      "No port server: pass an address or set PORTSERVER_ADDRESS",
    );
  }
  const reply = await extendedRequest(where, "STATUS\n", 64 * 1024 * 1024);
  if (reply === undefined) {
    throw new Error(
      `The port server at ${where} has no status request (a Python portserver?)`,
    );
  }
  return JSON.parse(reply) as PortServerStatus;
}

function currentPid(): number {
  return deno ? deno.pid : runtime.process.pid;
}

let envWarned = false;
const envAccess: Record<string, Deno.PermissionState> = {};

/**
 * Reads an environment variable; on Deno without `--allow-env` for it, says
 * so once on stderr and treats it as unset (no prompt, no crash).
 */
function readEnv(name: string): string | undefined {
  if (!deno) return runtime.process?.env?.[name];
  // Asked once per variable: a grant lasts, and asking costs every pick.
  const state = envAccess[name] ??=
    deno.permissions.querySync({ name: "env", variable: name }).state;
  if (state !== "granted") {
    if (!envWarned) {
      envWarned = true;
      console.error(
        "portpicker: PORTSERVER_ADDRESS and PORTPICKER_LOCK_DIR not read (Deno needs --allow-env); picking without them",
      );
    }
    return undefined;
  }
  return deno.env.get(name);
}

// ---------------------------------------------------------------------------
// The picker.

interface Held {
  port: number;
  release(): Promise<void>;
}

interface Plan {
  pid: number | undefined;
  serverAddress: string | undefined;
  preferred: number[];
  range: readonly [number, number];
  rangeGiven: boolean;
  exclude: Set<number>;
  lockDir: string | undefined;
  label: string | undefined;
}

function plan(options: PickOptions | undefined): Plan {
  if (
    options !== undefined && (typeof options !== "object" || options === null)
  ) {
    throw new TypeError(
      `Invalid options ${formatValue(options)}: expected an object`,
    );
  }
  const opts = options ?? {};
  const address = opts.portserverAddress;
  if (address !== undefined && typeof address !== "string") {
    throw new TypeError(
      `Invalid portserverAddress ${formatValue(address)}: expected a string`,
    );
  }
  if (
    opts.lockDir !== undefined &&
    (typeof opts.lockDir !== "string" || opts.lockDir === "")
  ) {
    throw new TypeError(
      `Invalid lockDir ${formatValue(opts.lockDir)}: expected a directory path`,
    );
  }
  return {
    pid: opts.pid === undefined ? undefined : checkPid(opts.pid),
    serverAddress: address,
    preferred: [...(opts.ports ?? [])].map((p) => checkPort(p)),
    range: opts.range === undefined ? DEFAULT_RANGE : checkRange(opts.range),
    rangeGiven: opts.range !== undefined,
    exclude: new Set(
      [...(opts.exclude ?? [])].map((p) => checkPort(p, "excluded port")),
    ),
    lockDir: opts.lockDir ?? (readEnv("PORTPICKER_LOCK_DIR") || undefined),
    label: opts.label === undefined ? undefined : checkLabel(opts.label),
  };
}

function allowed(port: number, p: Plan, taken: Set<number>): boolean {
  if (p.exclude.has(port) || taken.has(port)) return false;
  if (reservedPorts().has(port)) return false;
  return !p.rangeGiven || (port >= p.range[0] && port <= p.range[1]);
}

const NOTHING_HELD: Held["release"] = () => Promise.resolve();

/** What releases the sockets that hold a port. */
function closing(sockets: BoundSocket[]): Held["release"] {
  return async () => void await Promise.all(sockets.map((s) => s.close()));
}

/** Holds a port that was checked elsewhere; if it cannot, hands it out unheld. */
async function tryHold(port: number, hold: boolean): Promise<Held> {
  const sockets = hold ? await holdPort(port) : undefined;
  return { port, release: sockets ? closing(sockets) : NOTHING_HELD };
}

/**
 * Checks that `port` is free and, when `hold`, keeps it bound. Undefined if
 * it is not free.
 */
async function claim(port: number, hold: boolean): Promise<Held | undefined> {
  if (!(await isFree(port))) return undefined;
  if (!hold) return { port, release: NOTHING_HELD };
  const sockets = await holdPort(port);
  return sockets ? { port, release: closing(sockets) } : undefined;
}

/**
 * Takes a port this process found free: claims it in the lock directory, if
 * any (another process may have it), and remembers it as given.
 */
async function take(
  held: Held | undefined,
  p: Plan,
): Promise<Held | undefined> {
  if (!held) return undefined;
  if (p.lockDir !== undefined && !claimPort(p.lockDir, held.port)) {
    await held.release();
    return undefined;
  }
  randomPorts.add(held.port);
  return held;
}

const UDP_FIRST = ["udp", "tcp"] as const;
const TCP_FIRST = ["tcp", "udp"] as const;

/** The one pick, in the Python order; `taken` holds this call's other ports. */
async function pickOne(
  p: Plan,
  hold: boolean,
  taken: Set<number>,
): Promise<Held> {
  for (const port of p.preferred) {
    if (
      !allowed(port, p, taken) || given(port)
    ) {
      continue;
    }
    if (freePorts.delete(port)) {
      ownedPorts.add(port);
      return await tryHold(port, hold);
    }
    const held = await take(await claim(port, hold), p);
    if (held) return held;
  }

  for (const port of freePorts) {
    if (!allowed(port, p, taken)) continue;
    freePorts.delete(port);
    ownedPorts.add(port);
    return await tryHold(port, hold);
  }

  for (const address of [p.serverAddress, readEnv("PORTSERVER_ADDRESS")]) {
    if (!address) continue;
    const [port] =
      await takeFromServer(address, p.pid ?? currentPid(), 1, p.label) ??
        [];
    if (port === undefined) continue;
    if (allowed(port, p, taken)) return await tryHold(port, hold);
    console.error(
      `portpicker: port ${port} from the port server is excluded or outside the range; picking locally`,
    );
  }

  if (!p.rangeGiven) {
    // The kernel's choice: on Linux, UDP's port 0 is random while TCP's often
    // repeats the port just closed (which this process was just given), so
    // UDP first; every other try TCP first, for kernels where UDP repeats.
    for (let i = 0; i < 10; i++) {
      const [first, second] = i % 2 === 0 ? UDP_FIRST : TCP_FIRST;
      const port = await bindEachFamily(first, 0);
      if (port === undefined) continue;
      if (!allowed(port, p, taken) || given(port)) continue;
      if ((await bindEachFamily(second, port)) === undefined) continue;
      const held = await take(
        hold ? await claim(port, true) : { port, release: NOTHING_HELD },
        p,
      );
      if (held) return held;
    }
  }

  // Every port of the range, in random order, before giving up.
  const [first, last] = p.range;
  const candidates: number[] = [];
  for (let port = first; port <= last; port++) {
    if (allowed(port, p, taken) && !given(port)) {
      candidates.push(port);
    }
  }
  let tried = 0;
  while (candidates.length > 0) {
    const i = Math.floor(Math.random() * candidates.length);
    const port = candidates[i];
    candidates[i] = candidates[candidates.length - 1];
    candidates.pop();
    tried++;
    const held = await take(await claim(port, hold), p);
    if (held) return held;
  }
  throw new NoFreePortFoundError(p.range, tried);
}

/**
 * Picks a port that is free on TCP and UDP, IPv6 and IPv4. In order: the
 * preferred `ports`; a reserved or returned port; a port from the port server
 * (`portserverAddress`, else `PORTSERVER_ADDRESS`); the kernel's choice
 * (unless a `range` is given); then every port of the search range in random
 * order. One process never gets the same port twice until it is returned.
 *
 * @param options See {@linkcode PickOptions}.
 * @returns The port.
 * @throws {NoFreePortFoundError} When every port of the range was tried.
 * @throws {TypeError | RangeError} On an invalid option, naming it.
 *
 * @example
 * ```ts
 * import { pickUnusedPort } from "@x/portpicker";
 *
 * const port = await pickUnusedPort();
 * const other = await pickUnusedPort({ range: [20000, 20999], exclude: [20080] });
 * ```
 */
export async function pickUnusedPort(options?: PickOptions): Promise<number> {
  const held = await pickOne(plan(options), false, new Set());
  return held.port;
}

/**
 * Picks `count` distinct ports, each as {@linkcode pickUnusedPort} does. All
 * of them are held bound until the last is found, then released.
 *
 * @param count How many ports, at least 1.
 * @param options See {@linkcode PickOptions}.
 * @returns The ports, in the order they were picked.
 * @throws {NoFreePortFoundError} When there are not enough free ports; the
 * ports found so far stay given to this process.
 *
 * @example
 * ```ts
 * import { pickUnusedPorts } from "@x/portpicker";
 *
 * const [http, grpc, metrics] = await pickUnusedPorts(3);
 * ```
 */
export async function pickUnusedPorts(
  count: number,
  options?: PickOptions,
): Promise<number[]> {
  checkCount(count);
  const p = plan(options);
  const held: Held[] = [];
  const taken = new Set<number>();
  try {
    for (const port of await bulkFromServer(p, count)) {
      if (allowed(port, p, taken)) {
        held.push(await tryHold(port, true));
        taken.add(port);
      } else {
        returnPort(port);
      }
    }
    while (held.length < count) {
      const one = await pickOne(p, true, taken);
      held.push(one);
      taken.add(one.port);
    }
  } finally {
    await Promise.all(held.map((h) => h.release()));
  }
  return held.map((h) => h.port);
}

/**
 * Several ports in one request to the port server, when nothing comes before
 * the server in the order of {@linkcode pickOne}.
 */
async function bulkFromServer(p: Plan, count: number): Promise<number[]> {
  if (count < 2 || p.preferred.length > 0) return [];
  for (const port of freePorts) if (allowed(port, p, new Set())) return [];
  const address = p.serverAddress || readEnv("PORTSERVER_ADDRESS");
  if (!address) return [];
  return await takeFromServer(address, p.pid ?? currentPid(), count, p.label) ??
    [];
}

/**
 * Picks a port as {@linkcode pickUnusedPort} does and keeps it bound on TCP
 * and UDP until `release()`, so that nothing else can take it meanwhile.
 * Release it right before binding it yourself.
 *
 * @param options See {@linkcode PickOptions}.
 * @returns The reservation.
 *
 * @example
 * ```ts
 * import { reservePort } from "@x/portpicker";
 *
 * await using reservation = await reservePort();
 * // ... prepare the server; nobody can take the port meanwhile ...
 * await reservation.release();
 * Deno.serve({ port: reservation.port }, () => new Response("hi"));
 * ```
 */
export async function reservePort(
  options?: PickOptions,
): Promise<PortReservation> {
  const held = await pickOne(plan(options), true, new Set());
  let released: Promise<void> | undefined;
  const release = () => released ??= held.release();
  return {
    port: held.port,
    release,
    [Symbol.dispose]: () => void release(),
    [Symbol.asyncDispose]: release,
  };
}
