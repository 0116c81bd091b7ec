/**
 * The port server: hands each process unique ports over a Unix socket and
 * takes them back when the process dies. Wire-compatible with the Python
 * `portserver`: the client sends its pid and a newline, the server answers
 * with a port and a newline, or closes the connection with nothing written.
 * It also answers this project's extended requests (TAKE, LEASE, RETURN,
 * STATUS; see `mod.ts` for the protocol). This file owns the server's half:
 * it parses requests and writes replies.
 *
 * The file reads top to bottom: the public API; the pool; the state file;
 * requests and replies; one connection's life; the server; the runtime
 * adapter, the only code here that touches `Deno`, `Bun` or `process`.
 * Command-line parsing lives in `cli.ts`.
 *
 * @example Embed a server
 * ```ts
 * import { startPortServer } from "@x/portpicker/portserver";
 *
 * const server = await startPortServer({ address: "@my-tests", pool: [[20000, 20999]] });
 * // ... run tests with PORTSERVER_ADDRESS=@my-tests ...
 * await server.stop();
 * ```
 *
 * @module
 */

import {
  type AllocationStatus,
  isLabel,
  isPortFree,
  LineReader,
  processStartTime,
  PROTOCOL_LIMITS,
  reservedPorts,
} from "./mod.ts";
import * as fs from "node:fs";
import * as fsp from "node:fs/promises";
import * as net from "node:net";
import { pid } from "node:process";

// ===========================================================================
// The public API.

/**
 * Options of {@linkcode startPortServer}.
 *
 * @example
 * ```ts
 * import { startPortServer } from "@x/portpicker/portserver";
 *
 * const server = await startPortServer({
 *   address: "/tmp/ports.sock",
 *   pool: [[20000, 20999]],
 *   statePath: "/tmp/ports.json",
 *   socketMode: 0o660,
 * });
 * await server.stop();
 * ```
 *
 * @example
 * ```ts
 * import { startPortServer } from "@x/portpicker/portserver";
 *
 * const server = await startPortServer({ address: "@my-tests" });
 * server.logStats();
 * await server.stop();
 * ```
 */
export interface PortServerOptions {
  /**
   * Where to listen: `@name` for the Linux abstract namespace, else a
   * filesystem path. Default `@unittest-portserver`, as the Python server.
   */
  address?: string;
  /**
   * The ports to hand out, as inclusive `[first, last]` ranges. Default
   * `[[15000, 24999]]`, as the Python server. Ports in Linux's
   * `ip_local_reserved_ports` are left out.
   */
  pool?: Iterable<readonly [number, number]>;
  /**
   * A file that keeps the allocations, written before each reply that hands
   * out ports, so that a restarted server never hands out a port of a live
   * owner.
   */
  statePath?: string;
  /** Log a line per request, not only per event. */
  verbose?: boolean;
  /** Where log lines go; default stderr. */
  log?: (line: string) => void;
  /**
   * How long a client may take to send its request, and then to take its
   * reply, in milliseconds; a slower client is dropped. Default 2000.
   */
  timeoutMs?: number;
  /** The permissions of the socket file (say `0o660`); default the umask's. */
  socketMode?: number;
  /** The most client connections open at once; default 4096. */
  maxConnections?: number;
}

/**
 * The server's counters, as the Python server's statistics.
 *
 * @example
 * ```ts
 * import { startPortServer } from "@x/portpicker/portserver";
 *
 * const server = await startPortServer({ address: "@my-tests" });
 * console.log(server.stats().totalAllocations);
 * await server.stop();
 * ```
 */
export interface PortServerStats {
  /** Requests that could not be parsed, or did not arrive in time. */
  clientRequestErrors: number;
  /** Requests refused: bad pid, no such process, or no free port. */
  deniedAllocations: number;
  /** Ports in the pool. */
  numPortsManaged: number;
  /** Ports examined to answer the last request. */
  numPortsCheckedForLastRequest: number;
  /** Ports handed out since the start. */
  totalAllocations: number;
  /** Ports held now by a process not yet seen dead, or by a lease. */
  numPortsAllocated: number;
}

/** A running port server. */
export interface PortServer {
  /** The address it listens on, as given (`@name` or a path). */
  readonly address: string;
  /** The current counters. */
  stats(): PortServerStats;
  /** Logs the counters, as on SIGUSR1. */
  logStats(): void;
  /**
   * Stops listening, closes every connection (leases end), waits for the
   * state file, removes the socket file, and logs the counters and
   * `Goodbye.`, as the Python server does when it stops.
   */
  stop(): Promise<void>;
}

/**
 * Starts a port server.
 *
 * @param options See {@linkcode PortServerOptions}.
 * @returns The running server.
 * @throws {TypeError | RangeError} On an invalid option, naming it.
 * @throws {Error} When the pool is empty, `/proc` cannot be read, another
 * server serves the address, the state file cannot be read or written, or
 * the address cannot be listened on; the message is one line that names the
 * cause and the path.
 *
 * @example
 * ```ts
 * import { startPortServer } from "@x/portpicker/portserver";
 *
 * const server = await startPortServer({ address: "/tmp/ports.sock", pool: [[20000, 20099]] });
 * console.log(server.stats().numPortsManaged); // 100
 * await server.stop();
 * ```
 */
export async function startPortServer(
  options: PortServerOptions = {},
): Promise<PortServer> {
  const server = new Server(checkOptions(options));
  await server.open();
  return server;
}

/** The options, checked and with their defaults; the pool as its ports. */
type Settings = Omit<Required<PortServerOptions>, "pool"> & { ports: number[] };

/** The options, checked in the order of {@linkcode PortServerOptions}. */
function checkOptions(o: PortServerOptions): Settings {
  const bad = (name: string, value: unknown, expected: string) =>
    new TypeError(`Invalid ${name} ${show(value)}: expected ${expected}`);
  const address = o.address ?? "@unittest-portserver";
  if (typeof address !== "string" || address === "" || address === "@") {
    throw bad("address", address, "@name or a socket file path");
  }
  const mask = new Uint8Array(65536);
  for (const range of o.pool ?? [[15000, 24999]]) {
    const [first, last] = Array.isArray(range) ? range : [NaN, NaN];
    if (
      !Number.isInteger(first) || !Number.isInteger(last) || first < 1 ||
      last > 65535 || first > last
    ) {
      throw bad("pool range", range, "[first, last], ports from 1 to 65535");
    }
    mask.fill(1, first, last + 1);
  }
  for (const port of reservedPorts()) mask[port] = 0;
  const ports: number[] = [];
  for (let port = 1; port < 65536; port++) if (mask[port]) ports.push(port);
  if (ports.length === 0) throw new Error("No ports in the pool.");
  if (
    o.statePath !== undefined &&
    (typeof o.statePath !== "string" || !o.statePath)
  ) {
    throw bad("statePath", o.statePath, "a file path");
  }
  const timeoutMs = o.timeoutMs ?? 2000;
  if (
    typeof timeoutMs !== "number" ||
    !(timeoutMs > 0 && timeoutMs <= 2 ** 31 - 1)
  ) {
    throw bad("timeoutMs", timeoutMs, "milliseconds, more than 0");
  }
  const mode = o.socketMode;
  if (
    mode !== undefined && (!Number.isInteger(mode) || mode < 0 || mode > 0o777)
  ) {
    throw bad("socketMode", mode, "permissions from 0o000 to 0o777, as 0o660");
  }
  if (mode !== undefined && address.startsWith("@")) {
    throw new TypeError(
      `Invalid socketMode: the abstract address ${address} has no file`,
    );
  }
  const most = o.maxConnections ?? 4096;
  if (!Number.isInteger(most) || most < 1) {
    throw bad("maxConnections", most, "an integer, at least 1");
  }
  return {
    address,
    ports,
    statePath: o.statePath ?? "",
    verbose: o.verbose ?? false,
    log: o.log ?? ((line) => console.error(line)),
    timeoutMs,
    socketMode: mode ?? -1,
    maxConnections: most,
  };
}

function show(value: unknown): string {
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

// ===========================================================================
// The pool: which port is held by whom. Free ports wait in a queue, in
// round-robin order, so that a port given back is the last to be reused;
// held ports are grouped by owner, so that finding dead owners costs one
// look at each owner. A request walks the queue only: its cost does not grow
// with the number of ports held.

/** A process (pid and start time), or a lease (pid 0). */
interface Owner {
  pid: number;
  startTime: number;
  ports: Set<number>;
}

interface Allocation {
  owner: Owner;
  /** When it was handed out, ms since the epoch. */
  since: number;
  label?: string;
}

/** One allocation in the state file: port, pid, start time, since, label. */
type Saved = [number, number, number, number, string?];

/** Whether the process `pid` that started at `startTime` still lives. */
const alive = (owner: { pid: number; startTime: number }) =>
  owner.startTime !== 0 && processStartTime(owner.pid) === owner.startTime;

/** Init, which never gets a port, as in the Python server. */
const INIT = 1;

/** A first-in, first-out queue of numbers with O(1) steps. */
class Queue {
  #items: number[] = [];
  #head = 0;

  get length(): number {
    return this.#items.length - this.#head;
  }

  push(item: number): void {
    this.#items.push(item);
  }

  shift(): number {
    const item = this.#items[this.#head++];
    if (this.#head > 1024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }
}

class Pool {
  readonly size: number;
  readonly #ports: Set<number>;
  #free = new Queue();
  readonly #held = new Map<number, Allocation>();
  /** Process owners by pid. */
  readonly #owners = new Map<number, Owner>();

  constructor(ports: number[]) {
    this.#ports = new Set(ports);
    this.size = ports.length;
    for (const port of ports) this.#free.push(port);
  }

  get allocated(): number {
    return this.#held.size;
  }

  has(port: number): boolean {
    return this.#ports.has(port);
  }

  /**
   * `count` free ports, each checked with `isFree`, round-robin; when the
   * queue runs dry, the ports of dead processes are reclaimed once. The
   * ports are out of the queue but not yet assigned: the caller assigns
   * them, or puts them back with {@linkcode Pool.putBack}. Undefined, and
   * the ports found put back, when there are too few.
   */
  async take(
    count: number,
    isFree: (port: number) => Promise<boolean>,
  ): Promise<{ ports?: number[]; checked: number; inUse: number[] }> {
    const found: number[] = [];
    const inUse: number[] = [];
    let checked = 0;
    let budget = this.#free.length;
    let swept = false;
    try {
      while (found.length < count) {
        if (budget === 0) {
          if (swept) break;
          swept = true;
          this.reclaim();
          budget = this.#free.length;
          continue;
        }
        budget--;
        checked++;
        const port = this.#free.shift();
        // Out of the queue while it is checked: no other request gets it.
        found.push(port);
        if (!(await isFree(port))) {
          found.pop();
          inUse.push(port);
          this.#free.push(port);
        }
      }
    } catch (error) {
      this.putBack(found);
      throw error;
    }
    if (found.length === count) return { ports: found, checked, inUse };
    this.putBack(found);
    return { checked, inUse };
  }

  putBack(ports: readonly number[]): void {
    for (const port of ports) this.#free.push(port);
  }

  /** The owner of a live process; its pid naming another process drops the old. */
  ownerOf(pid: number, startTime: number): Owner {
    const known = this.#owners.get(pid);
    if (known?.startTime === startTime) return known;
    if (known) this.drop(known);
    const owner = { pid, startTime, ports: new Set<number>() };
    this.#owners.set(pid, owner);
    return owner;
  }

  assign(
    ports: readonly number[],
    owner: Owner,
    label?: string,
    since = Date.now(),
  ): void {
    for (const port of ports) {
      this.#held.set(
        port,
        label === undefined ? { owner, since } : { owner, since, label },
      );
      owner.ports.add(port);
    }
  }

  /**
   * Frees `ports` when the process `pid` holds every one of them; returns
   * those it does not hold (then none is freed).
   */
  giveBack(ports: readonly number[], pid: number): number[] {
    const owner = this.#owners.get(pid);
    const refused = ports.filter((p) => this.#held.get(p)?.owner !== owner);
    if (owner && refused.length === 0) this.release(ports, owner);
    return owner ? refused : [...ports];
  }

  /** Frees `ports`, held by `owner`. */
  release(ports: readonly number[], owner: Owner): void {
    for (const port of ports) {
      if (this.#held.get(port)?.owner !== owner) continue;
      this.#held.delete(port);
      owner.ports.delete(port);
      this.#free.push(port);
    }
  }

  /** Frees every port of `owner` and forgets it; returns its ports. */
  drop(owner: Owner): number[] {
    const ports = [...owner.ports];
    this.release(ports, owner);
    if (this.#owners.get(owner.pid) === owner) this.#owners.delete(owner.pid);
    return ports;
  }

  /** Frees the ports of every process that died: one look per owner. */
  reclaim(): void {
    for (const owner of [...this.#owners.values()]) {
      if (!alive(owner)) this.drop(owner);
    }
  }

  /** The allocations of processes, for the state file (leases end with us). */
  saved(): Saved[] {
    const out: Saved[] = [];
    for (const [port, { owner, since, label }] of this.#held) {
      if (owner.pid === 0) continue;
      const entry: Saved = [port, owner.pid, owner.startTime, since];
      if (label !== undefined) entry.push(label);
      out.push(entry);
    }
    return out;
  }

  /**
   * Restores allocations of owners still alive (the rest stay free), then
   * queues the free ports in the pool's order. Returns how many.
   */
  restore(entries: readonly Saved[]): number {
    const verdicts = new Map<string, boolean>();
    for (const [port, pid, startTime, since, label] of entries) {
      const key = `${pid} ${startTime}`;
      if (!verdicts.has(key)) verdicts.set(key, alive({ pid, startTime }));
      if (verdicts.get(key)) {
        this.assign([port], this.ownerOf(pid, startTime), label, since);
      }
    }
    this.#free = new Queue();
    for (const port of this.#ports) {
      if (!this.#held.has(port)) this.#free.push(port);
    }
    return this.#held.size;
  }

  /** Who holds which port, by port. */
  status(): AllocationStatus[] {
    const verdicts = new Map<Owner, boolean>();
    const out: AllocationStatus[] = [];
    for (const [port, { owner, since, label }] of this.#held) {
      if (!verdicts.has(owner)) {
        verdicts.set(owner, owner.pid === 0 || alive(owner));
      }
      out.push({
        port,
        pid: owner.pid === 0 ? null : owner.pid,
        lease: owner.pid === 0,
        alive: verdicts.get(owner)!,
        since: new Date(since).toISOString(),
        label: label ?? null,
      });
    }
    return out.sort((a, b) => a.port - b.port);
  }
}

// ===========================================================================
// The state file: `{"version":1,"allocations":[[port,pid,start,since,label?]]}`,
// written to an unpredictable temporary name made exclusively (never through
// a link), then renamed over the file. Handed-out ports are on disk before
// the reply; ports given back may reach the disk later, which errs on the
// side of holding.

/** The largest state file read at start: a full pool with labels needs 11 MiB. */
const MAX_STATE_BYTES = 16 * 1024 * 1024;

class StateFile {
  readonly path: string;
  #writing: Promise<void> = Promise.resolve();
  #next: Promise<void> | undefined;
  #snapshot: () => Saved[];

  constructor(path: string, snapshot: () => Saved[]) {
    this.path = path;
    this.#snapshot = snapshot;
  }

  /**
   * The allocations in the file, each checked, and how many were dropped.
   * A file that is not a state file at all is moved aside; one that is too
   * large stops the start.
   */
  async load(
    warn: (message: string) => void,
    has: (port: number) => boolean,
  ): Promise<{ entries: Saved[]; dropped: number }> {
    files.removeLeftovers(this.path);
    const text = await files.readState(this.path, MAX_STATE_BYTES);
    if (text === undefined) return { entries: [], dropped: 0 };
    let all: unknown[];
    try {
      const data = JSON.parse(text);
      if (data?.version !== 1 || !Array.isArray(data.allocations)) {
        throw new Error("not a port server state file");
      }
      all = data.allocations;
    } catch (error) {
      const aside = `${this.path}.corrupt-${Date.now()}`;
      await files.rename(this.path, aside);
      warn(
        `State file ${this.path} is corrupt (${
          (error as Error).message
        }): moved aside to ${aside}; starting with no allocations.`,
      );
      return { entries: [], dropped: 0 };
    }
    const now = Date.now();
    const seen = new Set<number>();
    const entries = all.filter((entry): entry is Saved =>
      wellFormed(entry) && has(entry[0]) && !seen.has(entry[0]) &&
      !!seen.add(entry[0])
    );
    for (const entry of entries) entry[3] ??= now;
    return { entries, dropped: all.length - entries.length };
  }

  /**
   * Writes the pool as it is when the write starts. Calls made while a write
   * runs share the next one: one write serves every request of a burst.
   */
  save(): Promise<void> {
    return this.#next ??= this.#writing.catch(() => {}).then(() => {
      this.#next = undefined;
      const text = JSON.stringify({
        version: 1,
        allocations: this.#snapshot(),
      });
      return this.#writing = files.writeAtomically(this.path, text);
    });
  }

  async flush(): Promise<void> {
    await this.#next?.catch(() => {});
    await this.#writing.catch(() => {});
  }
}

/** An allocation as a state file may hold it, every field checked. */
function wellFormed(entry: unknown): entry is Saved {
  if (!Array.isArray(entry) || entry.length < 3 || entry.length > 5) {
    return false;
  }
  const [port, pid, startTime, since = 0, label] = entry;
  return Number.isInteger(port) && port >= 1 && port <= 65535 &&
    Number.isSafeInteger(pid) && pid > INIT &&
    Number.isSafeInteger(startTime) &&
    startTime >= 0 && typeof since === "number" && since >= 0 &&
    since <= 8.64e15 && (label === undefined || isLabel(label));
}

// ===========================================================================
// Requests and replies: the server's half of the protocol.

const VERBS: Record<string, readonly string[]> = {
  TAKE: ["pid", "count", "label"],
  LEASE: ["count", "label"],
  RETURN: ["pid", "ports"],
  STATUS: [],
};

/** An extended request, parsed. */
interface Request {
  verb: string;
  pid: number;
  count: number;
  label?: string;
  ports: number[];
}

/**
 * What the first bytes of a request say: an extended request (a verb and a
 * space or the line's end), a classic one (anything else), or not yet
 * known (they could still begin a verb: `T`, `STA`, `STATUS`).
 */
function kindOf(bytes: Uint8Array): "extended" | "classic" | "undecided" {
  const head = String.fromCharCode(...bytes.subarray(0, 7));
  for (const verb of Object.keys(VERBS)) {
    if (verb.startsWith(head)) return "undecided";
    if (head.startsWith(verb) && " \r\n".includes(head[verb.length])) {
      return "extended";
    }
  }
  return "classic";
}

/**
 * The pid of a classic request, parsed as the Python server does (Python's
 * `int()`: white space around, a sign, digit groups with `_`), or undefined
 * for one it rejects.
 */
function parseClassic(bytes: Uint8Array): number | undefined {
  const text = String.fromCharCode(...bytes);
  const match = /^[ \t\n\r\f\v]*([+-]?\d+(?:_\d+)*)[ \t\n\r\f\v]*$/.exec(text);
  return match ? Number(match[1].replaceAll("_", "")) : undefined;
}

/**
 * An extended request line, as `TAKE pid=1234 count=3 label=web`; unknown
 * and repeated keys are refused. Throws a string that says what is wrong.
 */
function parseRequest(line: string): Request {
  line = line.endsWith("\r") ? line.slice(0, -1) : line;
  if (!/^[\x20-\x7e]*$/.test(line)) throw "not one line of printable ASCII";
  const [verb, ...words] = line.split(" ").filter((t) => t !== "");
  const known = VERBS[verb ?? ""];
  if (!known) throw `unknown request ${JSON.stringify(verb ?? "")}`;
  const values = new Map<string, string>();
  for (const word of words) {
    const eq = word.indexOf("=");
    const key = word.slice(0, Math.max(eq, 0));
    if (eq <= 0 || !known.includes(key)) {
      throw `unexpected ${JSON.stringify(word)} in ${verb}`;
    }
    if (values.has(key)) {
      throw `duplicate key ${JSON.stringify(key)} in ${verb}`;
    }
    values.set(key, word.slice(eq + 1));
  }
  const number = (key: string, digits: number, min: number, max: number) => {
    const text = values.get(key);
    if (text === undefined) throw `${verb} needs ${key}=`;
    if (
      !new RegExp(`^\\d{1,${digits}}$`).test(text) || +text < min || +text > max
    ) {
      throw `invalid ${key} ${JSON.stringify(text)}: expected ${min} to ${max}`;
    }
    return Number(text);
  };
  const most = PROTOCOL_LIMITS.ports;
  const label = values.get("label");
  if (label !== undefined && !isLabel(label)) {
    throw "a label has 1 to 100 printable characters";
  }
  const request: Request = {
    verb,
    label,
    count: values.has("count") ? number("count", 4, 1, most) : 1,
    pid: known.includes("pid") ? number("pid", 10, 0, 9999999999) : 0,
    ports: [],
  };
  if (verb !== "RETURN") return request;
  const list = (values.get("ports") ?? "").split(",");
  if (!values.has("ports")) throw "RETURN needs ports=";
  if (list.length > most) throw `more than ${most} ports in RETURN`;
  for (const text of list) {
    const port = Number(text);
    if (!/^\d{1,5}$/.test(text) || port < 1 || port > 65535) {
      throw `invalid port ${JSON.stringify(text)}`;
    }
    if (request.ports.includes(port)) throw `port ${port} named twice`;
    request.ports.push(port);
  }
  return request;
}

function okReply(ports: readonly number[]): Uint8Array {
  return encoder.encode(`OK ${ports.join(" ")}\n`);
}

function errorReply(why: string): Uint8Array {
  return encoder.encode(`ERR ${why.replace(/[^\x20-\x7e]/g, "?")}\n`);
}

// ===========================================================================
// One connection's life: a request read to its end under a limit and a
// deadline; one reply, written under the same deadline; a lease holds the
// connection open and ends when the connection does, by any path.

/** A client connection, as the runtime adapter gives it. */
interface Connection {
  /** The next chunk; null at the end or once closed. */
  read(): Promise<Uint8Array | null>;
  /** Writes all of `bytes`; resolves once the kernel has taken them. */
  write(bytes: Uint8Array): Promise<void>;
  /** Closes the connection (idempotent). */
  close(): void;
}

/** What to do with a request: the reply, and for a lease, its end. */
interface Answer {
  reply?: Uint8Array;
  onEnd?: () => void;
}

/** A request as read: a classic one's bytes, an extended line, or an error. */
type Incoming = { classic: Uint8Array } | { line: string } | { error: string };

/** After data without a newline, how long a classic request may pause (Python takes the first chunk). */
const CLASSIC_IDLE_MS = 50;
/** The most bytes of replies waiting for slow readers, all connections together. */
const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
/** A repeated warning is logged at most this often, with a count. */
const LOG_INTERVAL_MS = 10_000;
const IDLE = Symbol("idle");

/**
 * Reads a request to its end: an extended one to its newline, however it is
 * split; a classic one to its newline, its 21st byte, the end of the
 * connection, or a pause. Null when the client sent nothing.
 */
async function readRequest(connection: Connection): Promise<Incoming | null> {
  let bytes = new Uint8Array(0);
  let kind: ReturnType<typeof kindOf> = "undecided";
  const reader = new LineReader(PROTOCOL_LIMITS.request);
  while (true) {
    const reading = connection.read();
    const chunk = kind === "classic"
      ? await Promise.race([
        reading,
        new Promise<typeof IDLE>((r) => setTimeout(r, CLASSIC_IDLE_MS, IDLE)),
      ])
      : await reading;
    if (chunk === IDLE) return { classic: bytes };
    if (chunk === null) {
      if (kind === "extended") return { error: "a request without a newline" };
      return bytes.length === 0 ? null : { classic: bytes };
    }
    let line = chunk;
    if (kind !== "extended") {
      const joined = new Uint8Array(bytes.length + chunk.length);
      joined.set(bytes);
      joined.set(chunk, bytes.length);
      bytes = joined;
      kind = kindOf(bytes);
      if (kind !== "extended") {
        const complete = bytes.length > PROTOCOL_LIMITS.classicRequest ||
          kind === "classic" && bytes.includes(10);
        if (complete) return { classic: bytes };
        continue;
      }
      // An extended request: all its bytes so far go to the line reader.
      line = bytes;
    }
    try {
      const text = reader.push(line);
      if (text !== undefined) return { line: text };
    } catch (error) {
      return { error: (error as Error).message };
    }
  }
}

// ===========================================================================
// The server.

class Server implements PortServer {
  readonly address: string;
  readonly #options: Settings;
  readonly #pool: Pool;
  #counters = {
    clientRequestErrors: 0,
    deniedAllocations: 0,
    numPortsCheckedForLastRequest: 0,
    totalAllocations: 0,
  };
  #state: StateFile | undefined;
  #listener: (() => Promise<void>) | undefined;
  #connections = new Set<Connection>();
  #running = new Set<Promise<void>>();
  #stopped: Promise<void> | undefined;
  #bytesInFlight = 0;
  #maxConnections: number;
  /** Per kind of warning logged in the last interval: what it said, and how many more came. */
  #limited = new Map<string, { message: string; count: number }>();
  #startTimes = new Map<number, { startTime: number; at: number }>();

  constructor(options: Settings) {
    this.address = options.address;
    this.#options = options;
    this.#pool = new Pool(options.ports);
    // Below the descriptor limit, with room for port checks and the state
    // file: new connections over it are closed, so accept never fails.
    this.#maxConnections = Math.max(
      1,
      Math.min(options.maxConnections, descriptorLimit() - 64),
    );
  }

  #info(message: string): void {
    this.#options.log(formatLog("I", message));
  }

  /**
   * Logs a warning now, and then at most once per interval for the same
   * `key`, with how many it stands for: a flood of bad clients, a full disk
   * or a lack of descriptors is a few lines, not one per request.
   */
  #warn(key: string, message: string): void {
    const seen = this.#limited.get(key);
    if (seen) return void seen.count++;
    this.#options.log(formatLog("W", message));
    this.#limited.set(key, { message, count: 0 });
    unrefTimer(() => this.#repeats(key), LOG_INTERVAL_MS);
  }

  /** Logs how many more warnings of a kind came since it was logged. */
  #repeats(key: string): void {
    const entry = this.#limited.get(key);
    this.#limited.delete(key);
    if (!entry?.count) return;
    this.#options.log(formatLog(
      "W",
      `${entry.message} (and ${entry.count} more like it in the last ${
        LOG_INTERVAL_MS / 1000
      } s)`,
    ));
  }

  stats(): PortServerStats {
    // In the Python server's order: logStats prints them so.
    const { clientRequestErrors, deniedAllocations } = this.#counters;
    return {
      clientRequestErrors,
      deniedAllocations,
      numPortsManaged: this.#pool.size,
      numPortsCheckedForLastRequest:
        this.#counters.numPortsCheckedForLastRequest,
      totalAllocations: this.#counters.totalAllocations,
      numPortsAllocated: this.#pool.allocated,
    };
  }

  logStats(): void {
    this.#info("Dumping statistics:");
    for (const [name, value] of Object.entries(this.stats())) {
      this.#info(
        `${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} ${value}`,
      );
    }
  }

  async open(): Promise<void> {
    // Try what every request will do: without /proc, every owner would
    // look dead.
    processStartTime(ownPid());
    const path = this.#options.statePath;
    if (path) {
      this.#state = new StateFile(path, () => this.#pool.saved());
      const { entries, dropped } = await this.#state.load(
        (m) => this.#warn("state", m),
        (port) => this.#pool.has(port),
      );
      if (dropped > 0) {
        this.#warn(
          "state",
          `State file ${path}: dropped ${dropped} invalid ${
            dropped === 1 ? "entry" : "entries"
          } (a port not in the pool or named twice, or a bad pid, time or label).`,
        );
      }
      const restored = this.#pool.restore(entries);
      if (restored) {
        this.#info(`Restored ${restored} allocations of live processes.`);
      }
      // A state file that cannot be written must stop us now, not fail
      // every request later.
      try {
        await this.#state.save();
      } catch (error) {
        throw new Error(
          `Cannot write the state file ${path}: ${(error as Error).message}`,
        );
      }
    }
    const range = ephemeralRange();
    const overlap = range
      ? this.#options.ports.filter((p) => p >= range[0] && p <= range[1])
      : [];
    if (overlap.length > 0) {
      this.#warn(
        "ephemeral",
        `${overlap.length} ports of the pool lie in the kernel's ephemeral range ${
          range![0]
        }-${
          range![1]
        } (ip_local_port_range): outgoing connections may take them at any time.`,
      );
    }
    this.#listener = await listenUnix(
      this.address,
      (connection) => this.#accept(connection),
      (error) =>
        this.#warn(
          "accept",
          `Cannot accept connections (${error.message}): pausing, serving again as soon as descriptors come back`,
        ),
      this.#options.socketMode,
    );
    this.#info(`Serving on ${this.address}`);
  }

  #accept(connection: Connection): void {
    if (this.#stopped) return connection.close();
    if (this.#connections.size >= this.#maxConnections) {
      connection.close();
      return this.#warn(
        "limit",
        `Dropped a client over the limit of ${this.#maxConnections} connections`,
      );
    }
    this.#connections.add(connection);
    const serving = this.#serve(connection).finally(() => {
      this.#connections.delete(connection);
      this.#running.delete(serving);
    });
    this.#running.add(serving);
  }

  #clientError(why: string): void {
    this.#counters.clientRequestErrors++;
    this.#warn("parse", `Could not parse request: ${why}`);
  }

  /** One connection, from its request to its end. */
  async #serve(connection: Connection): Promise<void> {
    const { timeoutMs } = this.#options;
    let phase: "request" | "answer" | "reply" | "lease" = "request";
    // The request, and then the reply, each within the timeout.
    let expired = false;
    const expire = () => {
      expired = true;
      if (phase === "request") {
        this.#clientError(`no complete request within ${timeoutMs} ms`);
      } else {
        this.#warn(
          "slow",
          `Dropped a client that did not take its reply within ${timeoutMs} ms`,
        );
      }
      connection.close();
    };
    let timer = setTimeout(expire, timeoutMs);
    let answer: Answer = {};
    let reserved = 0;
    try {
      const incoming = await readRequest(connection);
      if (expired || incoming === null) return;
      phase = "answer";
      clearTimeout(timer);
      answer = await this.#answer(incoming);
      if (this.#stopped) return;
      const { reply } = answer;
      if (reply) {
        if (this.#bytesInFlight + reply.length > MAX_BYTES_IN_FLIGHT) {
          return this.#warn(
            "bytes",
            `Dropped a client: its reply would pass ${MAX_BYTES_IN_FLIGHT} bytes in flight to slow readers`,
          );
        }
        this.#bytesInFlight += reserved = reply.length;
        phase = "reply";
        clearTimeout(timer);
        timer = setTimeout(expire, timeoutMs);
        await connection.write(reply);
      }
      clearTimeout(timer);
      // A lease lasts while the connection is open, both ways.
      phase = "lease";
      if (answer.onEnd) { while ((await connection.read()) !== null); }
    } catch (error) {
      if (phase === "answer") {
        this.#warn("failed", `Request failed: ${(error as Error).message}`);
      }
    } finally {
      clearTimeout(timer);
      this.#bytesInFlight -= reserved;
      answer.onEnd?.();
      connection.close();
    }
  }

  #answer(incoming: Incoming): Promise<Answer> | Answer {
    if ("error" in incoming) {
      this.#clientError(incoming.error);
      return { reply: errorReply(incoming.error) };
    }
    if ("classic" in incoming) return this.#classic(incoming.classic);
    let request: Request;
    try {
      request = parseRequest(incoming.line);
    } catch (why) {
      this.#clientError(why as string);
      return { reply: errorReply(why as string) };
    }
    if (this.#options.verbose) this.#info(`Request ${incoming.line.trim()}.`);
    return this.#extended(request);
  }

  /** The Python protocol: a pid in, a port and a newline out, or nothing. */
  async #classic(bytes: Uint8Array): Promise<Answer> {
    const pid = bytes.length <= PROTOCOL_LIMITS.classicRequest
      ? parseClassic(bytes)
      : undefined;
    if (pid === undefined) {
      this.#clientError(
        bytes.length > PROTOCOL_LIMITS.classicRequest
          ? `more than ${PROTOCOL_LIMITS.classicRequest} bytes`
          : `invalid pid ${JSON.stringify(String.fromCharCode(...bytes))}`,
      );
      return {};
    }
    const ports = await this.#allocate(pid, 1);
    return typeof ports === "string"
      ? {}
      : { reply: encoder.encode(`${ports[0]}\n`) };
  }

  async #extended(request: Request): Promise<Answer> {
    const { verb, pid, count, label, ports } = request;
    if (verb === "STATUS") {
      const allocations = this.#pool.status();
      return {
        reply: encoder.encode(`${
          JSON.stringify({
            address: this.address,
            pool: this.#pool.size,
            allocated: allocations.length,
            reclaimable: allocations.filter((a) => !a.alive).length,
            allocations,
          })
        }\n`),
      };
    }
    if (verb === "TAKE") {
      const taken = await this.#allocate(pid, count, label);
      return {
        reply: typeof taken === "string" ? errorReply(taken) : okReply(taken),
      };
    }
    if (verb === "LEASE") {
      const taken = await this.#take(count);
      if (!taken) {
        return { reply: errorReply(this.#deny("not enough free ports")) };
      }
      const owner: Owner = { pid: 0, startTime: 0, ports: new Set() };
      this.#pool.assign(taken, owner, label);
      this.#counters.totalAllocations += taken.length;
      this.#info(`Leased ports ${taken.join(", ")}.`);
      return {
        reply: okReply(taken),
        onEnd: () => {
          const freed = this.#pool.drop(owner);
          this.#info(`Lease of ports ${freed.join(", ")} ended.`);
        },
      };
    }
    // RETURN: all or none, so that the client knows what it still holds.
    const refused = this.#pool.giveBack(ports, pid);
    if (refused.length > 0) {
      return {
        reply: errorReply(`not held by pid ${pid}: ${refused.join(" ")}`),
      };
    }
    this.#info(`Pid ${pid} returned ports ${ports.join(", ")}.`);
    // The file may list them a while longer: that errs on the side of
    // holding, and the next write catches up.
    await this.#state?.save().catch((error) => this.#saveFailed(error));
    return { reply: okReply(ports) };
  }

  /**
   * A requester's start time, read at most once per pid in 50 ms: reading
   * /proc is a sixth of a request, and the bench's floor (3x Python's
   * requests per second) is not met without this. A pid names another
   * process only once the kernel has gone round every other pid, never in
   * 50 ms; whether a holder died is always read afresh (`alive`).
   */
  #startTime(pid: number): number {
    const now = performance.now();
    const kept = this.#startTimes.get(pid);
    if (kept && now - kept.at < 50) return kept.startTime;
    const startTime = processStartTime(pid);
    if (this.#startTimes.size >= 1000) this.#startTimes.clear();
    this.#startTimes.set(pid, { startTime, at: now });
    return startTime;
  }

  #deny(why: string): string {
    this.#counters.deniedAllocations++;
    this.#info(`Denied: ${why}.`);
    return why;
  }

  #saveFailed(error: unknown): string {
    const why = `cannot write the state file ${this.#state!.path}: ${
      (error as Error).message
    }`;
    this.#warn("save", `Not handing out ports: ${why}`);
    return why;
  }

  /** `count` ports for a live `pid`, on disk before they are handed out; or why not. */
  async #allocate(
    pid: number,
    count: number,
    label?: string,
  ): Promise<number[] | string> {
    if (this.#options.verbose) this.#info(`Request on behalf of pid ${pid}.`);
    const startTime = pid === INIT ? 0 : this.#startTime(pid);
    if (startTime === 0) {
      return this.#deny(
        pid <= 0
          ? `not allocating a port to invalid pid ${pid}`
          : pid === INIT
          ? "not allocating a port to init"
          : `not allocating a port to a non-existent process ${pid}`,
      );
    }
    const ports = await this.#take(count);
    if (!ports) {
      return this.#deny(
        count === 1 ? "all ports in use" : `fewer than ${count} ports free`,
      );
    }
    const owner = this.#pool.ownerOf(pid, startTime);
    this.#pool.assign(ports, owner, label);
    if (this.#state) {
      try {
        await this.#state.save();
      } catch (error) {
        // Not on disk, not handed out: a restart must not lose it.
        this.#pool.release(ports, owner);
        return this.#saveFailed(error);
      }
    }
    this.#counters.totalAllocations += ports.length;
    if (this.#options.verbose) {
      this.#info(`Allocated ports ${ports.join(", ")} to pid ${pid}.`);
    }
    return ports;
  }

  async #take(count: number): Promise<number[] | undefined> {
    const { ports, checked, inUse } = await this.#pool.take(count, isPortFree);
    this.#counters.numPortsCheckedForLastRequest = checked;
    for (const port of inUse) this.#info(`Port ${port} unexpectedly in use.`);
    return ports;
  }

  stop(): Promise<void> {
    return this.#stopped ??= (async () => {
      const closing = this.#listener?.();
      for (const connection of this.#connections) connection.close();
      await closing;
      await Promise.all(this.#running);
      await this.#state?.flush();
      for (const key of [...this.#limited.keys()]) this.#repeats(key);
      this.logStats();
      this.#info("Goodbye.");
    })();
  }
}

function formatLog(level: "I" | "W", message: string): string {
  const now = new Date();
  const two = (n: number) => String(n).padStart(2, "0");
  const stamp = `${two(now.getMonth() + 1)}${two(now.getDate())} ${
    two(now.getHours())
  }:${two(now.getMinutes())}:${two(now.getSeconds())}.${
    String(now.getMilliseconds()).padStart(3, "0")
  }`;
  return `${level}${stamp} ${ownPid()} portserver] ${message}`;
}

// ===========================================================================
// The runtime adapter. Deno's own Unix listener on Deno (its node:net is
// slower), node:net on Bun and Node; node:fs everywhere: the server is
// long-lived, so loading Deno's Node layer at start costs nothing that
// matters.

// deno-lint-ignore no-explicit-any
const deno: typeof Deno | undefined = (globalThis as any).Deno;
const encoder = new TextEncoder();
const ownPid = (): number => pid;

/** A file of /proc (Linux), or "" where it cannot be read. */
function procText(path: string): string {
  try {
    return fs.readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/** This process's soft limit of open files (Linux), else a large number. */
function descriptorLimit(): number {
  const soft = /^Max open files\s+(\d+)/m.exec(procText("/proc/self/limits"));
  return soft ? Number(soft[1]) : Infinity;
}

/** The kernel's ephemeral range, or undefined where it cannot be read. */
function ephemeralRange(): [number, number] | undefined {
  const text = procText("/proc/sys/net/ipv4/ip_local_port_range");
  const [first, last] = text.trim().split(/\s+/).map(Number);
  return first > 0 && last > 0 ? [first, last] : undefined;
}

/** A timer that does not keep the process alive. */
function unrefTimer(fn: () => void, ms: number): void {
  const timer = setTimeout(fn, ms);
  if (deno) deno.unrefTimer(timer);
  else (timer as unknown as { unref(): void }).unref();
}

function errorCode(error: unknown): string | undefined {
  return (error as { code?: string } | undefined)?.code;
}

function removeFile(path: string): void {
  try {
    fs.unlinkSync(path);
  } catch { /* gone already */ }
}

const files = {
  /** The text of the state file, or undefined when there is none. */
  async readState(path: string, limit: number): Promise<string | undefined> {
    let size: number;
    try {
      size = fs.statSync(path).size;
      if (size <= limit) return await fsp.readFile(path, "utf8");
    } catch (error) {
      if (errorCode(error) === "ENOENT") return undefined;
      throw new Error(
        `Cannot read the state file ${path}: ${(error as Error).message}`,
      );
    }
    throw new Error(
      `State file ${path} is too large: ${size} bytes, at most ${limit}`,
    );
  },
  /** Writes a new file (never through a link) and renames it over `path`. */
  async writeAtomically(path: string, text: string): Promise<void> {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    const temporary = `${path}.tmp-${
      [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")
    }`;
    try {
      // "wx": made exclusively, so never written through a planted link.
      await fsp.writeFile(temporary, text, { flag: "wx", mode: 0o644 });
      await fsp.rename(temporary, path);
    } catch (error) {
      removeFile(temporary);
      throw error;
    }
  },
  rename: (from: string, to: string): Promise<void> => fsp.rename(from, to),
  /** Removes the temporary files of a server killed mid-write. */
  removeLeftovers(path: string): void {
    const slash = path.lastIndexOf("/");
    const dir = slash < 0 ? "." : path.slice(0, slash) || "/";
    const leftover = new RegExp(
      `^${path.slice(slash + 1).replace(/\W/g, "\\$&")}\\.tmp-[0-9a-f]{16}$`,
    );
    let names: string[] = [];
    try {
      names = fs.readdirSync(dir);
    } catch { /* no directory: nothing left over */ }
    for (const name of names) {
      if (leftover.test(name)) removeFile(`${dir}/${name}`);
    }
  },
};

/** How long to stop accepting after a failure, so as not to spin. */
const ACCEPT_PAUSE_MS = 100;

/**
 * Listens on a Unix socket and hands each connection to `accept`; returns
 * what stops listening (and removes the socket file).
 */
async function listenUnix(
  address: string,
  accept: (connection: Connection) => void,
  acceptFailed: (error: Error) => void,
  mode: number,
): Promise<() => Promise<void>> {
  const abstract = address.startsWith("@");
  const path = abstract ? `\0${address.slice(1)}` : address;
  const failed = (error: unknown) =>
    errorCode(error) === "EADDRINUSE"
      ? new Error(`Another port server is already serving on ${address}`)
      : new Error(`Cannot listen on ${address}: ${(error as Error).message}`);
  if (!abstract) await prepareSocketFile(address);
  let stop: () => Promise<void>;
  if (deno) {
    let listener: Deno.UnixListener;
    try {
      listener = deno.listen({ transport: "unix", path });
    } catch (error) {
      throw failed(error);
    }
    const loop = (async () => {
      while (true) {
        try {
          accept(denoConnection(await listener.accept()));
        } catch (error) {
          if (error instanceof Deno.errors.BadResource) return;
          // Out of file descriptors, say: pause, then serve again.
          acceptFailed(error as Error);
          await new Promise((resolve) => setTimeout(resolve, ACCEPT_PAUSE_MS));
        }
      }
    })();
    stop = async () => (listener.close(), await loop);
  } else {
    const server = net.createServer(
      { allowHalfOpen: true },
      (socket) => accept(nodeConnection(socket)),
    );
    await new Promise<void>((resolve, reject) => {
      server.once("error", (error) => reject(failed(error)));
      server.listen({ path, exclusive: true }, resolve);
    });
    server.on("error", acceptFailed);
    stop = () => new Promise((resolve) => server.close(() => resolve()));
  }
  const close = async () => {
    await stop();
    if (!abstract) removeFile(address);
  };
  try {
    if (mode >= 0) fs.chmodSync(address, mode);
  } catch (error) {
    await close();
    throw failed(error);
  }
  return close;
}

function denoConnection(conn: Deno.UnixConn): Connection {
  // Small: a classic request is 20 bytes; longer ones take several reads.
  const buffer = new Uint8Array(1024);
  let closed = false;
  return {
    read: async () => {
      try {
        const n = closed ? null : await conn.read(buffer);
        return n === null ? null : buffer.slice(0, n);
      } catch {
        return null;
      }
    },
    write: async (bytes) => {
      for (let n = 0; n < bytes.length;) {
        n += await conn.write(bytes.subarray(n));
      }
    },
    close: () => {
      if (!closed) conn.close();
      closed = true;
    },
  };
}

/** A node:net socket as a {@linkcode Connection}: paused until read. */
function nodeConnection(socket: import("node:net").Socket): Connection {
  const chunks: (Uint8Array | null)[] = [];
  let wake: (() => void) | undefined;
  const push = (chunk: Uint8Array | null) => {
    chunks.push(chunk);
    socket.pause();
    wake?.();
  };
  socket.on("data", push);
  socket.on("end", () => push(null));
  socket.on("close", () => push(null));
  socket.on("error", () => push(null));
  return {
    read: async () => {
      while (chunks.length === 0) {
        socket.resume();
        await new Promise<void>((resolve) => wake = resolve);
      }
      return chunks[0] === null ? null : chunks.shift()!;
    },
    write: (bytes) =>
      new Promise((resolve, reject) =>
        socket.write(bytes, (error) => error ? reject(error) : resolve())
      ),
    close: () => {
      socket.destroy();
      push(null);
    },
  };
}

/** Replaces a stale socket file; refuses anything else at the address. */
async function prepareSocketFile(address: string): Promise<void> {
  let isSocket: boolean;
  try {
    isSocket = fs.lstatSync(address).isSocket();
  } catch {
    return;
  }
  if (!isSocket) {
    throw new Error(
      `Cannot listen on ${address}: it exists and is not a socket`,
    );
  }
  // A live server answers a connect; a stale socket file refuses it.
  const live = await new Promise<boolean>((resolve) => {
    const socket = net.connect({ path: address });
    socket.once("connect", () => (socket.destroy(), resolve(true)));
    socket.once("error", () => resolve(false));
  });
  if (live) {
    throw new Error(`Another port server is already serving on ${address}`);
  }
  removeFile(address);
}
