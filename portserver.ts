/**
 * The port server: hands each process unique ports over a Unix socket and
 * takes them back when the process dies. Wire-compatible with the Python
 * `portserver`: the client sends its pid and a newline, the server answers
 * with a port and a newline, or closes the connection with nothing written.
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

import * as fs from "node:fs";
import { parseArgs } from "node:util";
import {
  ephemeralRange,
  isLinux,
  processStartTime,
  reservedPorts,
} from "./claims.ts";
import { isPortFree } from "./mod.ts";

// deno-lint-ignore no-explicit-any
const runtime = globalThis as any;
const deno: typeof Deno | undefined = runtime.Deno;

/** The Python server's default address. */
export const DEFAULT_ADDRESS = "@unittest-portserver";
/** The Python server's default pool. */
export const DEFAULT_POOL = "15000-24999";

/** Options of {@linkcode startPortServer}. */
export interface PortServerOptions {
  /**
   * Where to listen: `@name` for the Linux abstract namespace, else a
   * filesystem path. Default `@unittest-portserver`.
   */
  address?: string;
  /** The ports to hand out, as inclusive `[first, last]` ranges. Default `[[15000, 24999]]`. */
  pool?: Iterable<readonly [number, number]>;
  /**
   * A file that keeps the allocations, written atomically before each reply,
   * so that a restarted server never hands out a port of a live owner.
   */
  statePath?: string;
  /** Log a line per request, not only per event. */
  verbose?: boolean;
  /** Where log lines go; default stderr. */
  log?: (line: string) => void;
  /** How long a client may take to send its request; default 2000 ms. */
  requestTimeoutMs?: number;
}

/** The server's counters, as the Python server's statistics. */
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
  /** Ports held now by a process not yet seen dead. */
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
  /** Stops listening, waits for the state file, removes the socket file. */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------------------
// The pool.

/** Who holds ports: a process (pid and start time), or a lease (pid 0). */
interface Owner {
  key: string;
  pid: number;
  startTime: number;
  ports: Set<number>;
}

interface Allocation {
  owner: Owner;
  /** When it was handed out, in ms since the epoch. */
  since: number;
  label: string | undefined;
}

/** One allocation in the state file: port, pid, start time, since, label. */
type SavedAllocation = [number, number, number, number?, string?];

/** One allocation as the status request shows it. */
export interface AllocationStatus {
  /** The port. */
  port: number;
  /** The owner process, or null for a lease. */
  pid: number | null;
  /** Whether a lease (a connection kept open) holds it. */
  lease: boolean;
  /** When it was handed out, as an ISO 8601 time. */
  since: string;
  /** The label given with the request, or null. */
  label: string | null;
}

/**
 * Ports and who holds them. Free ports wait in a queue, in round-robin order;
 * held ports are grouped by owner, so that finding dead owners costs one
 * look at each owner, not one at each port.
 */
class Pool {
  readonly size: number;
  readonly #members: Set<number>;
  /** Ports with no live owner, oldest first; `#queueHead` is the front. */
  #queue: number[];
  #queueHead = 0;
  #owners = new Map<string, Owner>();
  #allocations = new Map<number, Allocation>();

  constructor(ports: number[]) {
    this.size = ports.length;
    this.#members = new Set(ports);
    this.#queue = [...ports];
  }

  has(port: number): boolean {
    return this.#members.has(port);
  }

  count(predicate: (port: number) => boolean): number {
    let n = 0;
    for (const port of this.#members) if (predicate(port)) n++;
    return n;
  }

  get allocated(): number {
    return this.#allocations.size;
  }

  /** Takes the next free port from the front of the queue. */
  shift(): number | undefined {
    if (this.#queueHead >= this.#queue.length) return undefined;
    const port = this.#queue[this.#queueHead++];
    // Compact now and then so that the queue does not grow without bound.
    if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
      this.#queue = this.#queue.slice(this.#queueHead);
      this.#queueHead = 0;
    }
    return port;
  }

  /** Puts a port at the back of the queue: the last to be reused. */
  push(port: number): void {
    this.#queue.push(port);
  }

  get queued(): number {
    return this.#queue.length - this.#queueHead;
  }

  /** The owner record of a live process; a reused pid drops the old one's. */
  processOwner(pid: number, startTime: number): Owner {
    const key = `pid:${pid}`;
    let owner = this.#owners.get(key);
    if (owner && owner.startTime !== startTime) {
      // The pid was reused: the old owner is dead.
      this.releaseOwner(owner);
      owner = undefined;
    }
    if (!owner) {
      owner = { key, pid, startTime, ports: new Set() };
      this.#owners.set(key, owner);
    }
    return owner;
  }

  leaseOwner(id: number): Owner {
    const owner = {
      key: `lease:${id}`,
      pid: 0,
      startTime: 0,
      ports: new Set<number>(),
    };
    this.#owners.set(owner.key, owner);
    return owner;
  }

  assign(port: number, owner: Owner, label?: string, since = Date.now()): void {
    owner.ports.add(port);
    this.#allocations.set(port, { owner, since, label });
  }

  /** Whether `pid` holds `port`. */
  holds(port: number, pid: number): boolean {
    const allocation = this.#allocations.get(port);
    return pid !== 0 && allocation?.owner.pid === pid;
  }

  /** Frees one port, if `pid` holds it. */
  releasePort(port: number, pid: number): boolean {
    const allocation = this.#allocations.get(port);
    if (!allocation || allocation.owner.pid !== pid || pid === 0) return false;
    allocation.owner.ports.delete(port);
    this.#allocations.delete(port);
    this.push(port);
    return true;
  }

  /** Frees every port of every process that has died: one look per owner. */
  sweep(): number {
    let freed = 0;
    for (const owner of [...this.#owners.values()]) {
      // Leases end with their connection, not here.
      if (owner.pid === 0) continue;
      if (processStartTime(owner.pid) !== owner.startTime) {
        freed += owner.ports.size;
        this.releaseOwner(owner);
      }
    }
    return freed;
  }

  releaseOwner(owner: Owner): void {
    this.#owners.delete(owner.key);
    for (const port of owner.ports) {
      this.#allocations.delete(port);
      this.push(port);
    }
    owner.ports.clear();
  }

  /** The allocations of processes, for the state file (leases end with us). */
  saved(): SavedAllocation[] {
    const out: SavedAllocation[] = [];
    for (const [port, { owner, since, label }] of this.#allocations) {
      if (owner.pid === 0) continue;
      out.push(
        label === undefined
          ? [port, owner.pid, owner.startTime, since]
          : [port, owner.pid, owner.startTime, since, label],
      );
    }
    return out;
  }

  /** Restores allocations of owners still alive; the rest stay free. */
  restore(allocations: SavedAllocation[]): number {
    const held = new Set<number>();
    for (const [port, pid, startTime, since, label] of allocations) {
      if (!this.has(port) || held.has(port)) continue;
      if (processStartTime(pid) !== startTime) continue;
      held.add(port);
      this.assign(port, this.processOwner(pid, startTime), label, since);
    }
    this.#queue = this.#queue.filter((port) => !held.has(port));
    this.#queueHead = 0;
    return held.size;
  }

  status(): AllocationStatus[] {
    return [...this.#allocations]
      .sort(([a], [b]) => a - b)
      .map(([port, { owner, since, label }]) => ({
        port,
        pid: owner.pid === 0 ? null : owner.pid,
        lease: owner.pid === 0,
        since: new Date(since).toISOString(),
        label: label ?? null,
      }));
  }
}

/**
 * Parses `N-P[,N-P...]` as the Python server does: a range that cannot be
 * parsed, or lies outside 1–65535, is skipped and reported to `onError`.
 *
 * @param spec The ranges, as `15000-24999` or `20000-20099,30000-30099`.
 * @param onError Told about each range skipped.
 * @returns The ranges kept, inclusive.
 *
 * @example
 * ```ts
 * import { parsePortRanges } from "@x/portpicker/portserver";
 *
 * parsePortRanges("20000-20099,30000-30099"); // [[20000, 20099], [30000, 30099]]
 * ```
 */
export function parsePortRanges(
  spec: string,
  onError: (message: string) => void = () => {},
): [number, number][] {
  const ranges: [number, number][] = [];
  for (const part of spec.split(",")) {
    const match = /^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*$/.exec(part);
    if (!match) {
      onError(`Ignoring unparsable port range '${part}'.`);
      continue;
    }
    const first = Number(match[1]);
    const last = Number(match[2]);
    if (first < 1 || last > 65535) {
      onError(`Ignoring out of bounds port range '${part}'.`);
      continue;
    }
    ranges.push([first, last]);
  }
  return ranges;
}

function poolPorts(ranges: Iterable<readonly [number, number]>): number[] {
  const ports = new Set<number>();
  for (const [first, last] of ranges) {
    for (let port = Math.max(first, 1); port <= Math.min(last, 65535); port++) {
      ports.add(port);
    }
  }
  return [...ports].sort((a, b) => a - b);
}

// ---------------------------------------------------------------------------
// Requests.

const MAX_REQUEST = 20;
/** Extended requests (they start with a letter) may carry a label. */
const MAX_EXTENDED_REQUEST = 1024;
/** After data without a newline, how long to wait for more (Python takes the first chunk). */
const REQUEST_IDLE_MS = 50;
const MAX_COUNT = 1000;

/** One client connection: its bytes in, at most one reply out. */
interface Connection {
  write(text: string): Promise<void>;
  close(): void;
}

/**
 * What to do with a request: write `reply` (nothing: close without a word),
 * and for a lease, keep the connection open and call `onClose` when it ends.
 */
interface Answer {
  reply?: string;
  onClose?: () => void;
}

/** An extended request: a verb and `key=value` arguments, on one line. */
export interface ExtendedRequest {
  /** TAKE, LEASE, RETURN or STATUS. */
  verb: "TAKE" | "LEASE" | "RETURN" | "STATUS";
  /** The owner, for TAKE and RETURN. */
  pid?: number;
  /** How many ports, for TAKE and LEASE; default 1. */
  count: number;
  /** The ports to give back, for RETURN. */
  ports: number[];
  /** Stored with the allocation, for TAKE and LEASE. */
  label?: string;
}

const VERBS: Record<ExtendedRequest["verb"], string[]> = {
  TAKE: ["pid", "count", "label"],
  LEASE: ["count", "label"],
  RETURN: ["pid", "ports"],
  STATUS: [],
};

/**
 * Parses an extended request, as `TAKE pid=1234 count=3 label=web`. The
 * Python server rejects every one of them (they are not a number), so its
 * clients and ours can tell the two servers apart.
 *
 * @param text The request line.
 * @returns The request, or an error message naming what is wrong.
 *
 * @example
 * ```ts
 * import { parseExtendedRequest } from "@x/portpicker/portserver";
 *
 * parseExtendedRequest("TAKE pid=1234 count=2\n"); // { verb: "TAKE", pid: 1234, count: 2, ports: [] }
 * ```
 */
export function parseExtendedRequest(text: string): ExtendedRequest | string {
  const line = text.replace(/\r?\n$/, "");
  if (!/^[\x20-\x7e]*$/.test(line)) return "not one line of printable ASCII";
  const [verb, ...args] = line.split(" ").filter((t) => t !== "");
  if (!(verb in VERBS)) return `unknown request ${JSON.stringify(verb ?? "")}`;
  const request: ExtendedRequest = {
    verb: verb as ExtendedRequest["verb"],
    count: 1,
    ports: [],
  };
  const allowedKeys = VERBS[request.verb];
  for (const arg of args) {
    const eq = arg.indexOf("=");
    const key = eq > 0 ? arg.slice(0, eq) : arg;
    const value = arg.slice(eq + 1);
    if (eq <= 0 || !allowedKeys.includes(key)) {
      return `unexpected ${JSON.stringify(arg)} in ${verb}`;
    }
    if (key === "pid" || key === "count") {
      if (!/^\d{1,10}$/.test(value)) {
        return `invalid ${key} ${JSON.stringify(value)}`;
      }
      request[key] = Number(value);
    } else if (key === "label") {
      if (value.length === 0 || value.length > 100) {
        return "a label has 1 to 100 characters";
      }
      request.label = value;
    } else {
      const ports = value.split(",");
      if (
        !ports.every((p) =>
          /^\d{1,5}$/.test(p) && Number(p) >= 1 && Number(p) <= 65535
        )
      ) {
        return `invalid ports ${JSON.stringify(value)}`;
      }
      request.ports = ports.map(Number);
    }
  }
  if (
    (request.verb === "TAKE" || request.verb === "RETURN") &&
    request.pid === undefined
  ) {
    return `${verb} needs pid=`;
  }
  if (request.verb === "RETURN" && request.ports.length === 0) {
    return "RETURN needs ports=";
  }
  if (request.count < 1 || request.count > MAX_COUNT) {
    return `invalid count ${request.count}: expected 1 to ${MAX_COUNT}`;
  }
  return request;
}

const isLetter = (byte: number | undefined): boolean =>
  byte !== undefined &&
  ((byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a));

/**
 * Whether a request is an extended one: it starts with one of our verbs.
 * Anything else, garbage that starts with a letter too, is a classic request
 * and gets the classic treatment for a bad one: closed with nothing written.
 */
function isExtended(bytes: Uint8Array): boolean {
  const head = String.fromCharCode(...bytes.subarray(0, 7));
  return /^(TAKE|LEASE|RETURN|STATUS)([ \r\n]|$)/.test(head);
}

/** The pid in a request, or undefined for one the Python server rejects. */
export function parseRequest(bytes: Uint8Array): number | undefined {
  if (bytes.length > MAX_REQUEST || bytes.length === 0) return undefined;
  let text = "";
  for (const b of bytes) {
    if (b > 0x7f) return undefined;
    text += String.fromCharCode(b);
  }
  // As Python's int(): surrounding white space, a sign, digit groups with "_".
  const match = /^[ \t\n\r\f\v]*([+-]?\d+(?:_\d+)*)[ \t\n\r\f\v]*$/.exec(text);
  return match ? Number(match[1].replaceAll("_", "")) : undefined;
}

function formatLog(level: "I" | "W" | "E", message: string): string {
  const now = new Date();
  const two = (n: number) => String(n).padStart(2, "0");
  const stamp = `${two(now.getMonth() + 1)}${two(now.getDate())} ${
    two(now.getHours())
  }:${two(now.getMinutes())}:${two(now.getSeconds())}.${
    String(now.getMilliseconds()).padStart(3, "0")
  }`;
  return `${level}${stamp} ${currentPid()} portserver] ${message}`;
}

function currentPid(): number {
  return deno ? deno.pid : runtime.process.pid;
}

class Server implements PortServer {
  readonly address: string;
  readonly #pool: Pool;
  readonly #options: PortServerOptions;
  readonly #log: (line: string) => void;
  #counters = {
    clientRequestErrors: 0,
    deniedAllocations: 0,
    numPortsCheckedForLastRequest: 0,
    totalAllocations: 0,
  };
  /** Allocations run one at a time: each awaits the previous. */
  #queue: Promise<unknown> = Promise.resolve();
  #state: StateFile | undefined;
  #close: (() => Promise<void>) | undefined;
  #connections = new Set<Connection>();
  #stopped: Promise<void> | undefined;
  #leases = 0;

  constructor(options: PortServerOptions, ports: number[]) {
    this.address = options.address ?? DEFAULT_ADDRESS;
    this.#options = options;
    this.#pool = new Pool(ports);
    this.#log = options.log ?? ((line) => console.error(line));
  }

  info(message: string): void {
    this.#log(formatLog("I", message));
  }

  warn(message: string): void {
    this.#log(formatLog("W", message));
  }

  stats(): PortServerStats {
    return {
      ...this.#counters,
      numPortsManaged: this.#pool.size,
      numPortsAllocated: this.#pool.allocated,
    };
  }

  logStats(): void {
    const s = this.stats();
    this.info("Dumping statistics:");
    this.info(`client-request-errors ${s.clientRequestErrors}`);
    this.info(`denied-allocations ${s.deniedAllocations}`);
    this.info(`num-ports-managed ${s.numPortsManaged}`);
    this.info(
      `num-ports-checked-for-last-request ${s.numPortsCheckedForLastRequest}`,
    );
    this.info(`total-allocations ${s.totalAllocations}`);
    this.info(`num-ports-allocated ${s.numPortsAllocated}`);
  }

  async open(): Promise<void> {
    if (this.#options.statePath) {
      this.#state = new StateFile(this.#options.statePath, this);
      const restored = this.#pool.restore(await this.#state.load());
      if (restored) {
        this.info(`Restored ${restored} allocations of live processes.`);
      }
      // A state file that cannot be written must stop us now, not fail
      // every request later.
      try {
        await this.#save();
      } catch (error) {
        throw new Error(
          `Cannot write the state file ${this.#options.statePath}: ${
            (error as Error).message
          }`,
        );
      }
    }
    this.#warnEphemeralOverlap();
    this.#close = await listen(this.address, this);
    this.info(`Serving on ${this.address}`);
  }

  /** Outgoing connections take their local ports from the ephemeral range. */
  #warnEphemeralOverlap(): void {
    const range = ephemeralRange();
    if (!range) return;
    const overlap = this.#pool.count((port) =>
      port >= range[0] && port <= range[1]
    );
    if (overlap > 0) {
      this.warn(
        `${overlap} ports of the pool lie in the kernel's ephemeral range ${
          range[0]
        }-${
          range[1]
        } (ip_local_port_range): outgoing connections may take them at any time.`,
      );
    }
  }

  /** A new client: read its request, with a deadline. */
  accept(connection: Connection): Session {
    this.#connections.add(connection);
    return new Session(
      this,
      connection,
      this.#options.requestTimeoutMs ?? 2000,
    );
  }

  forget(connection: Connection): void {
    this.#connections.delete(connection);
  }

  clientError(why: string): void {
    this.#counters.clientRequestErrors++;
    this.warn(`Could not parse request: ${why}`);
  }

  /** Answers one request; allocations run one at a time, in order. */
  handle(bytes: Uint8Array): Promise<Answer> {
    const answer = this.#queue.then(() =>
      isExtended(bytes) ? this.#extended(bytes) : this.#classic(bytes)
    );
    this.#queue = answer.catch(() => {});
    return answer;
  }

  /** The Python protocol: a pid in, a port and a newline out, or nothing. */
  async #classic(bytes: Uint8Array): Promise<Answer> {
    const pid = parseRequest(bytes);
    if (pid === undefined) {
      const shown = JSON.stringify(
        String.fromCharCode(...bytes.subarray(0, MAX_REQUEST + 1)),
      );
      this.clientError(
        bytes.length > MAX_REQUEST
          ? `more than ${MAX_REQUEST} bytes`
          : `invalid pid ${shown}`,
      );
      return {};
    }
    const ports = await this.#allocate(pid, 1, undefined);
    return ports ? { reply: `${ports[0]}\n` } : {};
  }

  /** Extended requests: every answer is one line, so no answer means the Python server. */
  async #extended(bytes: Uint8Array): Promise<Answer> {
    const request = parseExtendedRequest(new TextDecoder().decode(bytes));
    if (typeof request === "string") {
      this.clientError(request);
      return { reply: `ERR ${request}\n` };
    }
    if (this.#options.verbose) {
      this.info(`Request ${new TextDecoder().decode(bytes).trim()}.`);
    }
    switch (request.verb) {
      case "STATUS":
        return { reply: `${JSON.stringify(this.status())}\n` };
      case "TAKE": {
        const ports = await this.#allocate(
          request.pid!,
          request.count,
          request.label,
        );
        return {
          reply: ports
            ? `OK ${ports.join(" ")}\n`
            : `ERR ${this.#lastDenial}\n`,
        };
      }
      case "LEASE": {
        const owner = this.#pool.leaseOwner(++this.#leases);
        const ports = await this.#takePorts(request.count);
        if (!ports) {
          this.#pool.releaseOwner(owner);
          return this.#deny("not enough free ports");
        }
        for (const port of ports) this.#pool.assign(port, owner, request.label);
        this.#counters.totalAllocations += ports.length;
        this.info(`Leased ports ${ports.join(", ")}.`);
        return {
          reply: `OK ${ports.join(" ")}\n`,
          onClose: () => {
            this.info(`Lease of ports ${[...owner.ports].join(", ")} ended.`);
            this.#pool.releaseOwner(owner);
          },
        };
      }
      case "RETURN": {
        // All or nothing, so that the client knows what it still holds.
        const refused = request.ports.filter((port) =>
          !this.#pool.holds(port, request.pid!)
        );
        const freed = refused.length
          ? []
          : request.ports.filter((port) =>
            this.#pool.releasePort(port, request.pid!)
          );
        if (freed.length) {
          this.info(`Pid ${request.pid} returned ports ${freed.join(", ")}.`);
          await this.#save();
        }
        return {
          reply: refused.length
            ? `ERR not held by pid ${request.pid}: ${refused.join(" ")}\n`
            : `OK ${freed.join(" ")}\n`,
        };
      }
    }
  }

  #lastDenial = "";

  #deny(why: string): Answer {
    this.#counters.deniedAllocations++;
    this.#lastDenial = why;
    this.info(`Denied: ${why}.`);
    return { reply: `ERR ${why}\n` };
  }

  async #save(): Promise<void> {
    if (this.#state) await this.#state.save(this.#pool.saved());
  }

  /** The allocations, as the STATUS request answers. */
  status(): {
    address: string;
    pool: number;
    allocated: number;
    allocations: AllocationStatus[];
  } {
    return {
      address: this.address,
      pool: this.#pool.size,
      allocated: this.#pool.allocated,
      allocations: this.#pool.status(),
    };
  }

  /** `count` ports for a live `pid`, all or none. */
  async #allocate(
    pid: number,
    count: number,
    label: string | undefined,
  ): Promise<number[] | undefined> {
    const verbose = this.#options.verbose;
    if (verbose) this.info(`Request on behalf of pid ${pid}.`);
    const startTime = pid > 1 ? processStartTime(pid) : 0;
    if (pid <= 0 || pid === 1 || startTime === 0) {
      this.#deny(
        pid <= 0
          ? `not allocating a port to invalid pid ${pid}`
          : pid === 1
          ? "not allocating a port to init"
          : `not allocating a port to a non-existent process ${pid}`,
      );
      return undefined;
    }
    const ports = await this.#takePorts(count);
    if (!ports) {
      this.#deny(
        count === 1 ? "all ports in use" : `fewer than ${count} ports free`,
      );
      return undefined;
    }
    const owner = this.#pool.processOwner(pid, startTime);
    for (const port of ports) this.#pool.assign(port, owner, label);
    try {
      await this.#save();
    } catch (error) {
      // Not on disk, not handed out: a restart must not lose it.
      for (const port of ports) this.#pool.releasePort(port, pid);
      throw error;
    }
    this.#counters.totalAllocations += ports.length;
    if (verbose) {
      this.info(`Allocated ports ${ports.join(", ")} to pid ${pid}.`);
    }
    return ports;
  }

  /** `count` free ports, or none (those found go back to the queue). */
  async #takePorts(count: number): Promise<number[] | undefined> {
    const ports: number[] = [];
    let checked = 0;
    while (ports.length < count) {
      const [port, n] = await this.#takePort();
      checked += n;
      if (port === undefined) break;
      ports.push(port);
    }
    this.#counters.numPortsCheckedForLastRequest = checked;
    if (ports.length === count) return ports;
    for (const port of ports) this.#pool.push(port);
    return undefined;
  }

  /**
   * The next free port of the queue; when it runs dry, reclaim dead owners
   * once. Returns the port (or undefined) and how many ports were examined.
   */
  async #takePort(): Promise<[number | undefined, number]> {
    let checked = 0;
    let swept = false;
    let budget = this.#pool.queued;
    while (true) {
      if (budget === 0) {
        if (swept) break;
        swept = true;
        this.#pool.sweep();
        budget = this.#pool.queued;
        continue;
      }
      budget--;
      const port = this.#pool.shift()!;
      checked++;
      if (await isPortFree(port)) return [port, checked];
      this.info(`Port ${port} unexpectedly in use.`);
      this.#pool.push(port);
    }
    return [undefined, checked];
  }

  stop(): Promise<void> {
    return this.#stopped ??= (async () => {
      // node:net's close waits for every open connection: close them too.
      const closing = this.#close?.();
      for (const connection of this.#connections) connection.close();
      await closing;
      await this.#queue;
      await this.#state?.flush();
    })();
  }
}

/** Reads one request off a connection and answers it. */
class Session {
  #server: Server;
  #connection: Connection;
  #chunks: Uint8Array[] = [];
  #size = 0;
  #done = false;
  #deadline: ReturnType<typeof setTimeout>;
  #idle: ReturnType<typeof setTimeout> | undefined;
  /** Set while a lease keeps the connection open. */
  #onClose: (() => void) | undefined;

  constructor(server: Server, connection: Connection, timeoutMs: number) {
    this.#server = server;
    this.#connection = connection;
    this.#deadline = setTimeout(() => {
      if (this.#done) return;
      this.#finish();
      server.clientError(`no complete request within ${timeoutMs} ms`);
    }, timeoutMs);
  }

  data(chunk: Uint8Array): void {
    if (this.#done) return;
    this.#chunks.push(chunk);
    this.#size += chunk.length;
    clearTimeout(this.#idle);
    const limit = isLetter(this.#chunks[0][0])
      ? MAX_EXTENDED_REQUEST
      : MAX_REQUEST;
    if (this.#size > limit || chunk.includes(10)) return this.#answer();
    this.#idle = setTimeout(() => this.#answer(), REQUEST_IDLE_MS);
  }

  /**
   * Whether more reading is pointless: a classic request is complete (only
   * an extended one, a lease, needs to see the client hang up).
   */
  get read(): boolean {
    return this.#done && !isLetter(this.#chunks[0]?.[0]);
  }

  end(): void {
    if (!this.#done) this.#answer();
    else this.#hangUp();
  }

  /** The client went away: nothing to answer, and a lease ends. */
  gone(): void {
    if (!this.#done) this.#finish();
    else this.#hangUp();
  }

  #hangUp(): void {
    this.#clientGone = true;
    if (this.#onClose) this.#finish();
  }

  #answer(): void {
    const bytes = new Uint8Array(this.#size);
    let offset = 0;
    for (const c of this.#chunks) {
      bytes.set(c, offset);
      offset += c.length;
    }
    this.#done = true;
    clearTimeout(this.#deadline);
    clearTimeout(this.#idle);
    this.#server.handle(bytes).then(
      async ({ reply, onClose }) => {
        if (reply !== undefined) {
          await this.#connection.write(reply).catch(() => {});
        }
        // A lease lasts as long as the client keeps the connection open.
        if (onClose && !this.#clientGone && !this.#closed) {
          this.#onClose = onClose;
        } else {
          onClose?.();
          this.#finish();
        }
      },
      (error) => {
        this.#server.warn(`Request failed: ${(error as Error).message}`);
        this.#finish();
      },
    );
  }

  #closed = false;
  #clientGone = false;

  #finish(): void {
    this.#done = true;
    this.#closed = true;
    clearTimeout(this.#deadline);
    clearTimeout(this.#idle);
    const onClose = this.#onClose;
    this.#onClose = undefined;
    onClose?.();
    this.#connection.close();
    this.#server.forget(this.#connection);
  }
}

// ---------------------------------------------------------------------------
// Listening, on Deno.listen where the runtime has it, else node:net.

function socketPath(address: string): string {
  return address.startsWith("@") ? `\0${address.slice(1)}` : address;
}

/** A live server on `path` answers a connect; a stale socket file refuses it. */
async function probe(path: string): Promise<"live" | "stale"> {
  const net = await import("node:net");
  return await new Promise((resolve) => {
    const socket = net.connect({ path });
    socket.once("connect", () => {
      socket.destroy();
      resolve("live");
    });
    socket.once("error", () => resolve("stale"));
  });
}

async function prepareSocketFile(address: string): Promise<void> {
  if (address.startsWith("@")) return;
  let stat;
  try {
    stat = fs.lstatSync(address);
  } catch {
    return;
  }
  if (!stat.isSocket()) {
    throw new Error(
      `Cannot listen on ${address}: it exists and is not a socket`,
    );
  }
  if (await probe(address) === "live") {
    throw new Error(`Another port server is already serving on ${address}`);
  }
  fs.unlinkSync(address);
}

async function listen(
  address: string,
  server: Server,
): Promise<() => Promise<void>> {
  await prepareSocketFile(address);
  const path = socketPath(address);
  const inUse = () =>
    new Error(`Another port server is already serving on ${address}`);
  const removeFile = () => {
    if (address.startsWith("@")) return;
    try {
      fs.unlinkSync(address);
    } catch { /* already gone */ }
  };
  if (deno) {
    let listener: Deno.UnixListener;
    try {
      listener = deno.listen({ transport: "unix", path });
    } catch (error) {
      if ((error as { code?: string }).code === "EADDRINUSE") throw inUse();
      throw error;
    }
    const loop = acceptLoop(listener, server);
    return async () => {
      listener.close();
      await loop;
      removeFile();
    };
  }
  const net = await import("node:net");
  const netServer = net.createServer({ allowHalfOpen: true }, (socket) => {
    const session = server.accept({
      write: (text) => new Promise((done) => socket.write(text, () => done())),
      close: () => socket.end(() => socket.destroy()),
    });
    socket.on("data", (chunk: Uint8Array) => session.data(chunk));
    socket.on("end", () => session.end());
    socket.on("error", () => session.gone());
    socket.on("close", () => session.gone());
  });
  await new Promise<void>((resolve, reject) => {
    netServer.once("error", (error: Error & { code?: string }) => {
      reject(error.code === "EADDRINUSE" ? inUse() : error);
    });
    netServer.listen({ path, exclusive: true }, () => resolve());
  });
  netServer.on(
    "error",
    (error) => server.warn(`Accept failed: ${error.message}`),
  );
  return () =>
    new Promise((resolve) => {
      netServer.close(() => {
        removeFile();
        resolve();
      });
    });
}

async function acceptLoop(
  listener: Deno.UnixListener,
  server: Server,
): Promise<void> {
  while (true) {
    let conn: Deno.UnixConn;
    try {
      conn = await listener.accept();
    } catch (error) {
      if (
        error instanceof Deno.errors.BadResource ||
        error instanceof Deno.errors.Interrupted
      ) {
        return;
      }
      // Out of file descriptors, say: wait a little and go on serving.
      server.warn(`Accept failed: ${(error as Error).message}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
      continue;
    }
    serveDenoConnection(conn, server);
  }
}

async function serveDenoConnection(
  conn: Deno.UnixConn,
  server: Server,
): Promise<void> {
  let closed = false;
  const session = server.accept({
    write: async (text) => {
      const bytes = new TextEncoder().encode(text);
      for (let n = 0; n < bytes.length;) {
        n += await conn.write(bytes.subarray(n));
      }
    },
    close: () => {
      if (closed) return;
      closed = true;
      try {
        conn.close();
      } catch { /* already closed */ }
    },
  });
  const buffer = new Uint8Array(128);
  try {
    // Reading on after a complete classic request only costs a rejected read.
    while (!closed && !session.read) {
      const n = await conn.read(buffer);
      if (n === null) return session.end();
      session.data(buffer.slice(0, n));
    }
  } catch {
    session.gone();
  }
}

// ---------------------------------------------------------------------------
// The state file.

interface StateData {
  version: 1;
  allocations: SavedAllocation[];
}

class StateFile {
  #path: string;
  #server: Server;
  #writing: Promise<void> = Promise.resolve();
  #pending: SavedAllocation[] | undefined;
  #waiting: Promise<void> | undefined;

  constructor(path: string, server: Server) {
    this.#path = path;
    this.#server = server;
  }

  async load(): Promise<SavedAllocation[]> {
    let text: string;
    try {
      text = await fs.promises.readFile(this.#path, "utf8");
    } catch (error) {
      if ((error as { code?: string }).code === "ENOENT") return [];
      throw new Error(
        `Cannot read the state file ${this.#path}: ${(error as Error).message}`,
      );
    }
    try {
      const data = JSON.parse(text) as StateData;
      if (
        data?.version !== 1 || !Array.isArray(data.allocations) ||
        !data.allocations.every((a) =>
          Array.isArray(a) && a.length >= 3 && a.length <= 5 &&
          a.slice(0, 4).every((n) => Number.isInteger(n)) &&
          (a[4] === undefined || typeof a[4] === "string")
        )
      ) {
        throw new Error("not a port server state file");
      }
      return data.allocations;
    } catch (error) {
      const aside = `${this.#path}.corrupt-${Date.now()}`;
      await fs.promises.rename(this.#path, aside);
      this.#server.warn(
        `State file ${this.#path} is corrupt (${
          (error as Error).message
        }): moved aside to ${aside}; starting with no allocations.`,
      );
      return [];
    }
  }

  /**
   * Writes the allocations (to a temporary file, then renamed over the old
   * one). Requests that arrive while a write runs share the next write.
   */
  save(allocations: SavedAllocation[]): Promise<void> {
    this.#pending = allocations;
    return this.#waiting ??= this.#writing.then(async () => {
      this.#waiting = undefined;
      const data: StateData = { version: 1, allocations: this.#pending! };
      const temporary = `${this.#path}.tmp-${currentPid()}`;
      this.#writing = (async () => {
        await fs.promises.writeFile(temporary, JSON.stringify(data));
        await fs.promises.rename(temporary, this.#path);
      })();
      await this.#writing;
    });
  }

  async flush(): Promise<void> {
    await this.#waiting;
    await this.#writing;
  }
}

// ---------------------------------------------------------------------------

/**
 * Starts a port server.
 *
 * @param options See {@linkcode PortServerOptions}.
 * @returns The running server.
 * @throws {Error} When the pool is empty, another server serves the address,
 * or the address cannot be listened on.
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
  if (deno && isLinux) {
    const { state } = await deno.permissions.query({
      name: "read",
      path: "/proc",
    });
    if (state !== "granted") {
      throw new Error(
        "The port server needs --allow-read (for /proc/<pid>/stat) on Deno",
      );
    }
  }
  const reserved = reservedPorts();
  const ports = poolPorts(options.pool ?? parsePortRanges(DEFAULT_POOL))
    .filter((port) => !reserved.has(port));
  if (ports.length === 0) throw new Error("No ports in the pool.");
  const server = new Server(options, ports);
  await server.open();
  return server;
}

const SERVE_USAGE = `Usage: portpicker serve [options]

Runs the port server: hands each process unique ports over a Unix socket and
takes them back when the process dies. Wire-compatible with Python's portserver.

Options:
      --portserver_static_pool, --pool N-P[,N-P]
                         the ports to hand out, inclusive (default: ${DEFAULT_POOL})
      --portserver_address, --portserver_unix_socket_address, --address ADDR
                         where to listen: @name for the Linux abstract
                         namespace, else a socket file (default: ${DEFAULT_ADDRESS})
      --state FILE       keep allocations in FILE across restarts
      --verbose          log every request
      --debug            log every request (as --verbose)
  -h, --help             print this help

Signals: SIGUSR1 logs statistics; SIGINT and SIGTERM stop it cleanly.
Exit status: 0 stopped, 1 could not serve, 2 usage error.
`;

/**
 * Runs `portpicker serve` with `args` until SIGINT or SIGTERM; returns the
 * exit status. Errors are one line on stderr.
 *
 * @param args The arguments after `serve`.
 * @returns 0 after a clean stop, 1 when it could not serve, 2 on a usage error.
 *
 * @example
 * ```ts
 * import { serveCommand } from "@x/portpicker/portserver";
 *
 * const status = await serveCommand(["--pool", "20000-20999", "--address", "@ports"]);
 * ```
 */
export async function serveCommand(args: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args,
      options: {
        portserver_static_pool: { type: "string" },
        pool: { type: "string" },
        portserver_address: { type: "string" },
        portserver_unix_socket_address: { type: "string" },
        address: { type: "string" },
        state: { type: "string" },
        verbose: { type: "boolean" },
        debug: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    }));
  } catch (error) {
    console.error(
      `portpicker serve: ${
        (error as Error).message.split(". ")[0]
      } (see --help)`,
    );
    return 2;
  }
  if (values.help) {
    console.log(SERVE_USAGE);
    return 0;
  }
  const address = values.address ?? values.portserver_address ??
    values.portserver_unix_socket_address ?? DEFAULT_ADDRESS;
  if (!address || address === "@") {
    console.error(
      `portpicker serve: invalid address ${
        JSON.stringify(address)
      } (see --help)`,
    );
    return 2;
  }
  const log = (line: string) => console.error(line);
  const ranges = parsePortRanges(
    values.pool ?? values.portserver_static_pool ?? DEFAULT_POOL,
    (message) => log(formatLog("E", message)),
  );
  if (poolPorts(ranges).length === 0) {
    log(
      formatLog(
        "E",
        "No ports. Invalid port ranges in --portserver_static_pool?",
      ),
    );
    return 1;
  }
  let server: PortServer;
  try {
    server = await startPortServer({
      address,
      pool: ranges,
      statePath: values.state,
      verbose: values.verbose || values.debug,
      log,
    });
  } catch (error) {
    log(formatLog("E", (error as Error).message));
    return 1;
  }
  const handlers: [Signal, () => void][] = [];
  const stopSignal = await new Promise<string>((resolve) => {
    handlers.push(
      ["SIGUSR1", () => server.logStats()],
      ["SIGINT", () => resolve("SIGINT")],
      ["SIGTERM", () => resolve("SIGTERM")],
    );
    for (const [signal, handler] of handlers) onSignal(signal, handler);
  });
  // Deno's signal listeners would keep the process alive.
  for (const [signal, handler] of handlers) offSignal(signal, handler);
  log(formatLog("I", `Stopping on ${stopSignal}.`));
  await server.stop();
  server.logStats();
  log(formatLog("I", "Goodbye."));
  return 0;
}

type Signal = "SIGUSR1" | "SIGINT" | "SIGTERM";

function onSignal(signal: Signal, handler: () => void): void {
  if (deno) deno.addSignalListener(signal, handler);
  else runtime.process.on(signal, handler);
}

function offSignal(signal: Signal, handler: () => void): void {
  if (deno) deno.removeSignalListener(signal, handler);
  else runtime.process.off(signal, handler);
}
