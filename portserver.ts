/**
 * The port server: hands each process unique ports over a Unix socket and
 * takes them back when the process dies. Wire-compatible with the Python
 * `portserver`: the client sends its pid and a newline, the server answers
 * with a port and a newline, or closes the connection with nothing written.
 * It also answers this project's extended requests (TAKE, LEASE, RETURN,
 * STATUS), whose protocol is defined once, in `mod.ts`.
 *
 * The file reads top to bottom: the public API; the pool (pure: no I/O, the
 * owner check and the port check are passed in); the state file; client
 * connections; the server's life cycle; the runtime adapter, the only code
 * here that touches `Deno`, `Bun` or `process`. Command-line parsing lives
 * in `cli.ts`.
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
  formatReply,
  isExtendedRequest,
  isLabel,
  isPortFree,
  isPortFreeSync,
  LineReader,
  parseClassicRequest,
  parseRequest,
  processStartTime,
  PROTOCOL_LIMITS,
  reservedPorts,
  type ServerRequest,
} from "./mod.ts";

// ===========================================================================
// The public API.

/** The Python server's default address. */
export const DEFAULT_ADDRESS = "@unittest-portserver";
/** The Python server's default pool: 15000–24999. */
export const DEFAULT_POOL: readonly (readonly [number, number])[] = [[
  15000,
  24999,
]];
/** The largest state file read at start: a full pool with labels needs 11 MiB. */
export const MAX_STATE_BYTES: number = 16 * 1024 * 1024;

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
   * How long a client may take to send its request, and then to take a long
   * reply (one over `PROTOCOL_LIMITS.reply`, which the socket buffer does not
   * take at once), in milliseconds; a slower client is dropped. Request
   * deadlines are checked every tenth of this (every 100 ms at most), so a
   * client is dropped within the timeout and one such tick. Default 2000.
   */
  timeoutMs?: number;
  /** The permissions of the socket file (say `0o660`); default the umask's. */
  socketMode?: number;
  /** The most client connections open at once; default 4096. */
  maxConnections?: number;
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
   * state file, removes the socket file.
   */
  stop(): Promise<void>;
}

/**
 * Starts a port server.
 *
 * @param options See {@linkcode PortServerOptions}.
 * @returns The running server.
 * @throws {Error} When the pool is empty, another server serves the address,
 * the state file cannot be read or written, or the address cannot be
 * listened on; the message is one line that names the cause.
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
  requireProcAccess();
  const reserved = reservedPorts();
  const ports = poolPorts(options.pool ?? DEFAULT_POOL, reserved);
  if (ports.length === 0) throw new Error("No ports in the pool.");
  const server = new Server(options, ports);
  await server.open();
  return server;
}

/**
 * The ports of some inclusive ranges, each once, in order, but `reserved`.
 * A mask of every port, not a set of numbers: a large pool leaves no
 * garbage behind that the heap would keep (its pages stay resident).
 */
function poolPorts(
  ranges: Iterable<readonly [number, number]>,
  reserved: ReadonlySet<number>,
): Uint16Array {
  const mask = new Uint8Array(65536);
  for (const [first, last] of ranges) {
    mask.fill(1, Math.max(first, 1), Math.min(last, 65535) + 1);
  }
  for (const port of reserved) mask[port] = 0;
  const ports = new Uint16Array(65536);
  let n = 0;
  for (let port = 1; port < 65536; port++) if (mask[port]) ports[n++] = port;
  return ports.slice(0, n);
}

// ===========================================================================
// The pool: which port is held by whom. Pure: no I/O; whether a process
// lives and whether a port is free are asked of the caller.

/** Whether the process `pid` that started at `startTime` still lives. */
export type AliveCheck = (pid: number, startTime: number) => boolean;

/** One allocation in the state file: port, pid, start time, since, label. */
export type SavedAllocation = [number, number, number, number, string?];

/** What {@linkcode PortPool.take} did. */
export interface Taken {
  /** The ports given, or undefined when there were not enough. */
  ports: number[] | undefined;
  /** How many ports were examined. */
  checked: number;
  /** Ports of the pool found in use by something else (skipped). */
  inUse: number[];
}

interface Owner {
  /** 0 for a lease. */
  pid: number;
  startTime: number;
  slots: Set<number>;
}

/**
 * The ports of a server and who holds them, in typed arrays: no object per
 * port. Free ports wait in a ring, in round-robin order, so that a port
 * given back is the last to be reused; held ports are grouped by owner, so
 * that finding dead owners costs one look at each owner, not at each port.
 *
 * @example
 * ```ts
 * import { PortPool } from "@x/portpicker/portserver";
 *
 * const pool = new PortPool([20000, 20001]);
 * const owner = pool.ownerOf(1234, 5678);
 * const { ports } = await pool.take(1, owner, undefined, async () => true, () => true);
 * console.log(ports); // [20000]
 * ```
 */
export class PortPool {
  /** How many ports it has. */
  readonly size: number;
  readonly #slotOf = new Int32Array(65536).fill(-1);
  readonly #port: Uint16Array;
  /** Per slot: its owner's id, 0 when free. */
  readonly #owner: Int32Array;
  /** Per slot: when it was handed out, ms since the epoch. */
  readonly #since: Float64Array;
  readonly #labels = new Map<number, string>();
  /** Free slots, a ring: `#head` is the front, `#queued` how many. */
  readonly #ring: Int32Array;
  #head = 0;
  #queued = 0;
  #owners = new Map<number, Owner>();
  #byPid = new Map<number, number>();
  #nextOwner = 1;
  #allocated = 0;
  #version = 0;

  /**
   * Makes a pool of free ports.
   *
   * @param ports The ports, each 1 to 65535; repeats are ignored.
   */
  constructor(ports: Iterable<number>) {
    const slotOf = this.#slotOf;
    let size = 0;
    for (const port of ports) {
      if (!Number.isInteger(port) || port < 1 || port > 65535) {
        throw new RangeError(`Not a port: ${port}`);
      }
      if (slotOf[port] < 0) slotOf[port] = size++;
    }
    this.size = size;
    this.#port = new Uint16Array(size);
    this.#owner = new Int32Array(size);
    this.#since = new Float64Array(size);
    this.#ring = new Int32Array(size);
    for (let port = 1; port < 65536; port++) {
      if (slotOf[port] >= 0) this.#port[slotOf[port]] = port;
    }
    for (let slot = 0; slot < size; slot++) this.#push(slot);
  }

  /** How many ports are held. */
  get allocated(): number {
    return this.#allocated;
  }

  /** A number that changes whenever a port is taken or freed. */
  get version(): number {
    return this.#version;
  }

  /** Whether `port` is in the pool. */
  has(port: number): boolean {
    return Number.isInteger(port) && port > 0 && port < 65536 &&
      this.#slotOf[port] >= 0;
  }

  /** How many ports of the pool lie in `[first, last]`. */
  countIn(first: number, last: number): number {
    let n = 0;
    for (const port of this.#port) if (port >= first && port <= last) n++;
    return n;
  }

  /**
   * The owner id of a live process; a pid now naming another process (its
   * start time changed) drops the old owner's ports first.
   *
   * @param pid The process.
   * @param startTime Its start time.
   * @returns Its owner id.
   */
  ownerOf(pid: number, startTime: number): number {
    const id = this.#byPid.get(pid);
    if (id !== undefined) {
      if (this.#owners.get(id)!.startTime === startTime) return id;
      this.#dropOwner(id);
    }
    const next = this.#newOwner(pid, startTime);
    this.#byPid.set(pid, next);
    return next;
  }

  /** A new owner for a lease, which ends with its connection. */
  leaseOwner(): number {
    return this.#newOwner(0, 0);
  }

  /**
   * Takes `count` free ports for `owner`, round-robin, each checked with
   * `isFree`; when the free ring runs dry, the ports of dead processes
   * (asked of `alive`) are reclaimed once. All or none: ports found go back
   * when there are too few. Synchronous while `isFree` answers synchronously
   * (the server's fast path); a promise once it does not.
   *
   * @param count How many.
   * @param owner The owner id.
   * @param label Stored with each port.
   * @param isFree Whether a port is free on TCP and UDP.
   * @param alive Whether a process still lives.
   * @param now The time to record.
   * @returns The ports, how many were examined, and those found in use.
   */
  take(
    count: number,
    owner: number,
    label: string | undefined,
    isFree: (port: number) => boolean | Promise<boolean>,
    alive: AliveCheck,
    now: number = Date.now(),
  ): Taken | Promise<Taken> {
    return this.#walk({
      count,
      owner,
      label,
      alive,
      now,
      slots: [],
      inUse: [],
      checked: 0,
      budget: this.#queued,
      swept: false,
    }, isFree);
  }

  /**
   * The walk of {@linkcode PortPool.take} from where `w` stands: synchronous
   * while `isFree` answers so, from its first promise on asynchronous. A
   * check that fails puts its port and the ports found so far back.
   */
  #walk(
    w: Walk,
    isFree: (port: number) => boolean | Promise<boolean>,
  ): Taken | Promise<Taken> {
    while (w.slots.length < w.count) {
      if (w.budget === 0) {
        if (w.swept) break;
        w.swept = true;
        this.reclaim(w.alive);
        w.budget = this.#queued;
        continue;
      }
      w.budget--;
      const slot = this.#shift();
      w.checked++;
      let free: boolean | Promise<boolean>;
      try {
        free = isFree(this.#port[slot]);
      } catch (error) {
        throw this.#putBack(w, slot, error);
      }
      if (typeof free !== "boolean") {
        return free.then((f) => {
          this.#checked(w, slot, f);
          return this.#walk(w, isFree);
        }, (error) => {
          throw this.#putBack(w, slot, error);
        });
      }
      this.#checked(w, slot, free);
    }
    if (w.slots.length < w.count || !this.#owners.has(w.owner)) {
      for (const slot of w.slots) this.#push(slot);
      return { ports: undefined, checked: w.checked, inUse: w.inUse };
    }
    for (const slot of w.slots) this.#assign(slot, w.owner, w.label, w.now);
    const ports = w.slots.map((slot) => this.#port[slot]);
    return { ports, checked: w.checked, inUse: w.inUse };
  }

  #checked(w: Walk, slot: number, free: boolean): void {
    if (free) {
      w.slots.push(slot);
    } else {
      w.inUse.push(this.#port[slot]);
      this.#push(slot);
    }
  }

  /** The walk failed at `slot`: it and the ports found go back; returns `error`. */
  #putBack(w: Walk, slot: number, error: unknown): unknown {
    this.#push(slot);
    for (const found of w.slots) this.#push(found);
    w.slots.length = 0;
    return error;
  }

  /**
   * Whether `pid` holds every one of `ports`.
   *
   * @param ports The ports.
   * @param pid The process.
   */
  holdsAll(ports: readonly number[], pid: number): boolean {
    const id = this.#byPid.get(pid);
    return id !== undefined &&
      ports.every((port) =>
        this.has(port) && this.#owner[this.#slotOf[port]] === id
      );
  }

  /**
   * Frees ports held by `owner` (others are left alone).
   *
   * @param ports The ports.
   * @param owner The owner id, or a pid's with {@linkcode PortPool.ownerIdOf}.
   * @returns The ports freed.
   */
  release(ports: readonly number[], owner: number): number[] {
    const freed: number[] = [];
    const o = this.#owners.get(owner);
    for (const port of ports) {
      const slot = this.has(port) ? this.#slotOf[port] : -1;
      if (slot < 0 || this.#owner[slot] !== owner) continue;
      o!.slots.delete(slot);
      this.#free(slot);
      freed.push(port);
    }
    return freed;
  }

  /** The owner id of `pid`, if it holds anything. */
  ownerIdOf(pid: number): number | undefined {
    return this.#byPid.get(pid);
  }

  /** Frees every port of `owner` and forgets it; returns its ports. */
  releaseOwner(owner: number): number[] {
    const slots = this.#owners.get(owner)?.slots ?? [];
    const ports = Array.from(slots, (slot) => this.#port[slot]);
    this.#dropOwner(owner);
    return ports;
  }

  /**
   * Frees the ports of every process that died: one look per owner. A
   * request pays for it when the free ports run out, so it builds no list.
   */
  reclaim(alive: AliveCheck): number {
    let freed = 0;
    for (const [id, owner] of [...this.#owners]) {
      // Leases end with their connection, not here.
      if (owner.pid === 0 || alive(owner.pid, owner.startTime)) continue;
      freed += this.#dropOwner(id);
    }
    return freed;
  }

  /** Frees every port of `owner` and forgets it; returns how many. */
  #dropOwner(owner: number): number {
    const o = this.#owners.get(owner);
    if (!o) return 0;
    this.#owners.delete(owner);
    if (o.pid !== 0 && this.#byPid.get(o.pid) === owner) {
      this.#byPid.delete(o.pid);
    }
    // In one pass, not #free a slot: a request pays for this when the pool
    // runs dry, in code not yet compiled (10,000 ports on Bun: 1.1-1.3 ms
    // against 1.3-3.2 ms).
    const [ring, owners, size] = [this.#ring, this.#owner, this.size];
    let end = (this.#head + this.#queued) % size;
    for (const slot of o.slots) {
      owners[slot] = 0;
      ring[end] = slot;
      if (++end === size) end = 0;
    }
    if (this.#labels.size > 0) {
      for (const slot of o.slots) this.#labels.delete(slot);
    }
    const n = o.slots.size;
    this.#queued += n;
    this.#allocated -= n;
    this.#version++;
    return n;
  }

  /** The allocations of processes, for the state file (leases end with us). */
  saved(): SavedAllocation[] {
    const out: SavedAllocation[] = [];
    for (const owner of this.#owners.values()) {
      if (owner.pid === 0) continue;
      for (const slot of owner.slots) {
        const entry: SavedAllocation = [
          this.#port[slot],
          owner.pid,
          owner.startTime,
          this.#since[slot],
        ];
        const label = this.#labels.get(slot);
        if (label !== undefined) entry.push(label);
        out.push(entry);
      }
    }
    return out;
  }

  /**
   * Restores allocations of owners still alive (the rest stay free); ports
   * not in the pool and repeated ports are skipped.
   *
   * @param entries Allocations, checked in form by the caller.
   * @param alive Whether a process still lives.
   * @returns How many were restored.
   */
  restore(entries: readonly SavedAllocation[], alive: AliveCheck): number {
    let restored = 0;
    const verdicts = new Map<string, boolean>();
    const held = new Set<number>();
    for (const [port, pid, startTime, since, label] of entries) {
      if (!this.has(port) || held.has(port)) continue;
      const key = `${pid} ${startTime}`;
      let live = verdicts.get(key);
      if (live === undefined) verdicts.set(key, live = alive(pid, startTime));
      if (!live) continue;
      held.add(port);
      this.#assign(
        this.#slotOf[port],
        this.ownerOf(pid, startTime),
        label,
        since,
      );
      restored++;
    }
    // The ring again, without the restored ports, in the pool's order.
    this.#head = this.#queued = 0;
    for (let slot = 0; slot < this.size; slot++) {
      if (this.#owner[slot] === 0) this.#push(slot);
    }
    return restored;
  }

  /**
   * Who holds which port, by port.
   *
   * @param alive Whether a process still lives (asked once per owner).
   * @returns The allocations, as the STATUS request shows them.
   */
  status(alive: AliveCheck): AllocationStatus[] {
    const out: AllocationStatus[] = [];
    for (const owner of this.#owners.values()) {
      const live = owner.pid === 0 || alive(owner.pid, owner.startTime);
      for (const slot of owner.slots) {
        out.push({
          port: this.#port[slot],
          pid: owner.pid === 0 ? null : owner.pid,
          lease: owner.pid === 0,
          alive: live,
          since: new Date(this.#since[slot]).toISOString(),
          label: this.#labels.get(slot) ?? null,
        });
      }
    }
    return out.sort((a, b) => a.port - b.port);
  }

  #newOwner(pid: number, startTime: number): number {
    const id = this.#nextOwner++;
    this.#owners.set(id, { pid, startTime, slots: new Set() });
    return id;
  }

  #assign(slot: number, owner: number, label: string | undefined, t: number) {
    this.#owner[slot] = owner;
    this.#since[slot] = t;
    if (label !== undefined) this.#labels.set(slot, label);
    this.#owners.get(owner)!.slots.add(slot);
    this.#allocated++;
    this.#version++;
  }

  #free(slot: number): void {
    this.#owner[slot] = 0;
    if (this.#labels.size > 0) this.#labels.delete(slot);
    this.#allocated--;
    this.#version++;
    this.#push(slot);
  }

  #push(slot: number): void {
    this.#ring[(this.#head + this.#queued++) % this.size] = slot;
  }

  #shift(): number {
    const slot = this.#ring[this.#head];
    this.#head = (this.#head + 1) % this.size;
    this.#queued--;
    return slot;
  }
}

/**
 * Start times of requesting processes, each read at most once per `ttlMs`:
 * reading `/proc/<pid>/stat` is a third of a request's system calls. A pid
 * names another process only after the kernel has handed out every other
 * pid (Linux goes round up to pid_max), so {@linkcode startTimeTtlMs} keeps
 * an entry for less time than that takes at a million new processes a
 * second, several times more than any machine starts. Only live processes
 * are kept; the pool still reads /proc afresh whenever it decides whether an
 * owner died.
 *
 * @example
 * ```ts
 * import { StartTimes } from "@x/portpicker/portserver";
 *
 * let reads = 0;
 * const times = new StartTimes(() => (reads++, 42), 5);
 * times.get(1234, 0);
 * times.get(1234, 4); // within 5 ms: not read again
 * console.log(times.get(1234, 6), reads); // 42 2
 * ```
 */
export class StartTimes {
  /** How long a start time is taken as read, in ms. */
  readonly ttlMs: number;
  #read: (pid: number) => number;
  /** By pid: the start time, and when it was read. */
  #kept = new Map<number, { startTime: number; at: number }>();

  /**
   * Makes an empty cache.
   *
   * @param read Reads a process's start time; 0 when there is none.
   * @param ttlMs How long a start time is taken as read, in ms.
   */
  constructor(read: (pid: number) => number, ttlMs: number) {
    this.#read = read;
    this.ttlMs = ttlMs;
  }

  /** How many pids are kept. */
  get size(): number {
    return this.#kept.size;
  }

  /**
   * The start time of `pid`, 0 when it does not exist.
   *
   * @param pid The process.
   * @param now A monotonic clock in ms.
   */
  get(pid: number, now: number = performance.now()): number {
    const kept = this.#kept.get(pid);
    if (kept && now - kept.at < this.ttlMs) return kept.startTime;
    const startTime = this.#read(pid);
    if (startTime === 0) {
      this.#kept.delete(pid);
      return 0;
    }
    if (!kept && this.#kept.size >= 4096) this.#prune(now);
    this.#kept.set(pid, { startTime, at: now });
    return startTime;
  }

  #prune(now: number): void {
    for (const [pid, { at }] of this.#kept) {
      if (now - at >= this.ttlMs) this.#kept.delete(pid);
    }
  }
}

/**
 * How long a pid's start time may be taken as read, given pid_max: the time
 * it takes to start pid_max processes at a million a second, at most 1 s.
 *
 * @param pidMax `/proc/sys/kernel/pid_max`.
 * @returns Milliseconds.
 *
 * @example
 * ```ts
 * import { startTimeTtlMs } from "@x/portpicker/portserver";
 *
 * console.log(startTimeTtlMs(32768)); // 32.768
 * ```
 */
export function startTimeTtlMs(pidMax: number): number {
  return Math.min(1000, Math.max(0, pidMax) / 1000);
}

/** The server's check of a port: synchronous where the C library can tell. */
const portIsFree = (port: number): boolean | Promise<boolean> =>
  isPortFreeSync(port) ?? isPortFree(port);

/** `f` of `value`, at once when it is not a promise. */
function then<T, U>(
  value: T | Promise<T>,
  f: (value: T) => U | Promise<U>,
): U | Promise<U> {
  return value instanceof Promise ? value.then(f) : f(value);
}

/** Where a walk of {@linkcode PortPool.take} stands. */
interface Walk {
  count: number;
  owner: number;
  label: string | undefined;
  alive: AliveCheck;
  now: number;
  slots: number[];
  inUse: number[];
  checked: number;
  budget: number;
  swept: boolean;
}

/** The pool's check of an owner: its pid still names the same process. */
const alive: AliveCheck = (pid, startTime) =>
  processStartTime(pid) === startTime;

// ===========================================================================
// The state file: `{"version":1,"allocations":[[port,pid,start,since,label?]]}`,
// written to an unpredictable temporary name made exclusively (never through
// a link), then renamed over the file. Handed-out ports are on disk before
// the reply; ports given back may reach the disk later, which errs on the
// side of holding.

class StateFile {
  readonly path: string;
  #writing: Promise<void> = Promise.resolve();
  #next: Promise<void> | undefined;
  #snapshot: () => SavedAllocation[];

  constructor(path: string, snapshot: () => SavedAllocation[]) {
    this.path = path;
    this.#snapshot = snapshot;
  }

  /**
   * Reads the allocations; entries that are not well-formed are dropped,
   * and counted in `dropped`. A file that is not a state file at all is
   * moved aside; one that is too large stops the start.
   */
  async load(
    warn: (message: string) => void,
  ): Promise<{ entries: SavedAllocation[]; dropped: number }> {
    removeLeftovers(this.path);
    const text = await readState(this.path, MAX_STATE_BYTES);
    if (text === undefined) return { entries: [], dropped: 0 };
    let data: { version?: unknown; allocations?: unknown };
    try {
      data = JSON.parse(text);
      if (data?.version !== 1 || !Array.isArray(data.allocations)) {
        throw new Error("not a port server state file");
      }
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
    const entries = data.allocations.filter(wellFormed);
    const now = Date.now();
    for (const entry of entries) entry[3] ??= now;
    return { entries, dropped: data.allocations.length - entries.length };
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
      return this.#writing = writeAtomically(this.path, text);
    });
  }

  async flush(): Promise<void> {
    await this.#next?.catch(() => {});
    await this.#writing.catch(() => {});
  }
}

/** An allocation as a state file may hold it, every field checked. */
function wellFormed(entry: unknown): entry is SavedAllocation {
  if (!Array.isArray(entry) || entry.length < 3 || entry.length > 5) {
    return false;
  }
  const [port, pid, startTime, since = 0, label] = entry;
  return Number.isInteger(port) && port >= 1 && port <= 65535 &&
    Number.isInteger(pid) && pid >= 2 && pid <= 0x7fffffff &&
    Number.isSafeInteger(startTime) && startTime >= 0 &&
    Number.isFinite(since) && since >= 0 && since <= 8.64e15 &&
    (entry.length < 4 || typeof entry[3] === "number") &&
    (label === undefined || isLabel(label));
}

async function writeAtomically(path: string, text: string): Promise<void> {
  const temporary = `${path}.tmp-${randomHex()}`;
  try {
    await files.writeNew(temporary, text);
    await files.rename(temporary, path);
  } catch (error) {
    await files.remove(temporary).catch(() => {});
    throw error;
  }
}

/** Temporary files of a server killed mid-write. */
function removeLeftovers(path: string): void {
  const slash = path.lastIndexOf("/");
  const dir = slash < 0 ? "." : path.slice(0, slash) || "/";
  const prefix = `${path.slice(slash + 1)}.tmp-`;
  for (const name of files.list(dir)) {
    if (
      name.startsWith(prefix) &&
      /^[0-9a-f]{16}$/.test(name.slice(prefix.length))
    ) {
      files.removeSync(`${dir}/${name}`);
    }
  }
}

function randomHex(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// ===========================================================================
// Client connections: one request each, read to its newline under a limit
// and a deadline; one reply, written under a deadline; a lease holds its
// connection open and ends when the connection does, by any path.

/** The transport of one connection, as the runtime adapter gives it. */
interface Transport {
  /** Writes all of `bytes`; resolves once the kernel has taken them. */
  write(bytes: Uint8Array): Promise<void>;
  /**
   * Writes `bytes` and closes: for a short reply (at most
   * `PROTOCOL_LIMITS.reply` bytes), which a new connection's socket buffer
   * always takes at once, so no deadline is needed.
   */
  end(bytes: Uint8Array): void;
  /** Closes the connection (idempotent). */
  close(): void;
}

/** After data without a newline, how long a classic request may pause (Python takes the first chunk). */
const CLASSIC_IDLE_MS = 50;
/** The most bytes of replies waiting for slow readers, all connections together. */
const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
/** Repeated events (dropped clients, accept failures) are logged this often. */
const LOG_INTERVAL_MS = 10_000;

/** What to do with a request: the reply, and for a lease, its end. */
interface Answer {
  reply?: Uint8Array;
  onEnd?: () => void;
}

/**
 * Request deadlines, swept: a clock that ticks every tenth of the timeout
 * (at most 100 ms) while connections are open, and at each tick a look at
 * those still reading. A connection only notes the tick it came in on: a
 * timer, or a set to leave, for each one cost Bun and Deno about a twentieth
 * of a request. A deadline is thus met within the timeout plus one tick.
 */
class Deadlines {
  /** The current tick. */
  now = 0;
  readonly #ticks: number;
  readonly #sliceMs: number;
  readonly #open: ReadonlySet<Connection>;
  #timer: unknown;

  /** Sweeps `open`, the server's live connections. */
  constructor(timeoutMs: number, open: ReadonlySet<Connection>) {
    this.#sliceMs = Math.min(100, Math.max(1, timeoutMs / 10));
    this.#ticks = Math.ceil(timeoutMs / this.#sliceMs);
    this.#open = open;
  }

  /** A connection came in: ticks from now on, unless they already do. */
  started(): void {
    this.#timer ??= unrefTimer(() => this.#tick(), this.#sliceMs, true);
  }

  #tick(): void {
    this.now++;
    if (this.#open.size === 0) return this.stop();
    for (const connection of this.#open) {
      if (this.now - connection.since > this.#ticks) connection.expire();
    }
  }

  /** Stops ticking, until the next connection. */
  stop(): void {
    clearInterval(this.#timer as number);
    this.#timer = undefined;
  }
}

class Connection {
  #server: Server;
  #transport: Transport;
  #reader: LineReader | undefined;
  #bytes: Uint8Array[] = [];
  #state: "reading" | "answering" | "leased" | "closed" = "reading";
  /** The tick of {@linkcode Deadlines} it came in on. */
  readonly since: number;
  /** The reply's deadline, for a long reply. */
  #timer: ReturnType<typeof setTimeout> | undefined;
  #idle: ReturnType<typeof setTimeout> | undefined;
  #onEnd: (() => void) | undefined;
  #ended = false;

  constructor(server: Server, transport: Transport) {
    this.#server = server;
    this.#transport = transport;
    this.since = server.deadlines.now;
  }

  /** The request's deadline passed. */
  expire(): void {
    if (this.#state !== "reading") return;
    this.#server.clientError(
      `no complete request within ${this.#server.timeoutMs} ms`,
    );
    this.close();
  }

  /** Whether reading on is pointless: a classic request was answered. */
  get done(): boolean {
    return this.#state === "closed" ||
      (this.#state === "answering" && this.#reader === undefined);
  }

  data(chunk: Uint8Array): void {
    if (this.#state !== "reading") return;
    if (!this.#reader && this.#bytes.length === 0) {
      const extended = isExtendedRequest(chunk);
      if (extended) this.#reader = new LineReader(PROTOCOL_LIMITS.request);
    }
    if (this.#reader) {
      let line: string | undefined;
      try {
        line = this.#reader.push(chunk);
      } catch (error) {
        return this.#refuse((error as Error).message);
      }
      if (line !== undefined) this.#answer(() => this.#server.extended(line));
      return;
    }
    this.#bytes.push(chunk);
    clearTimeout(this.#idle);
    const size = this.#bytes.reduce((n, c) => n + c.length, 0);
    if (size > PROTOCOL_LIMITS.classicRequest || chunk.includes(10)) {
      return this.#classic();
    }
    this.#idle = setTimeout(() => this.#classic(), CLASSIC_IDLE_MS);
  }

  /** The client closed its sending side (or the whole connection). */
  end(): void {
    this.#ended = true;
    if (this.#state === "reading") {
      if (this.#reader) {
        if (this.#reader.size === 0) return this.close();
        return this.#refuse("a request without a newline");
      }
      if (this.#bytes.length) return this.#classic();
      return this.close();
    }
    // A lease lasts while the connection is open, both ways.
    if (this.#state === "leased") this.close();
  }

  close(): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    clearTimeout(this.#timer);
    clearTimeout(this.#idle);
    const onEnd = this.#onEnd;
    this.#onEnd = undefined;
    onEnd?.();
    this.#transport.close();
    this.#server.forget(this);
  }

  #classic(): void {
    if (this.#state !== "reading") return;
    clearTimeout(this.#idle);
    const bytes = this.#bytes.length === 1
      ? this.#bytes[0]
      : concatBytes(this.#bytes);
    this.#answer(() => this.#server.classic(bytes));
  }

  #refuse(why: string): void {
    this.#server.clientError(why);
    this.#answer(() => Promise.resolve({ reply: errorReply(why) }));
  }

  #answer(handle: () => Answer | Promise<Answer>): void {
    this.#state = "answering";
    clearTimeout(this.#idle);
    const failed = (error: unknown) => {
      this.#server.warn(`Request failed: ${(error as Error).message}`);
      this.close();
    };
    let answer: Answer | Promise<Answer>;
    try {
      answer = handle();
    } catch (error) {
      return failed(error);
    }
    if (answer instanceof Promise) answer.then((a) => this.#reply(a), failed);
    else this.#reply(answer);
  }

  #reply({ reply, onEnd }: Answer): void {
    if (this.#state === "closed") return onEnd?.();
    if (reply && !onEnd && reply.length <= PROTOCOL_LIMITS.reply) {
      // Most replies: written and closed within this turn.
      this.#state = "closed";
      this.#transport.end(reply);
      this.#server.forget(this);
      return;
    }
    this.#send(reply, onEnd);
  }

  /** A long reply, under a deadline, or a lease's. */
  async #send(
    reply: Uint8Array | undefined,
    onEnd: (() => void) | undefined,
  ): Promise<void> {
    this.#onEnd = onEnd;
    if (reply) {
      if (!this.#server.reserveBytes(reply.length)) return this.close();
      this.#timer = setTimeout(() => {
        this.#server.dropped("did not take its reply", this.#server.timeoutMs);
        this.close();
      }, this.#server.timeoutMs);
      try {
        await this.#transport.write(reply);
      } catch {
        return this.close();
      } finally {
        clearTimeout(this.#timer);
        this.#server.reserveBytes(-reply.length);
      }
    }
    // Closed meanwhile (the deadline, or the client went away)?
    if ((this.#state as string) === "closed") return;
    if (!onEnd || this.#ended) return this.close();
    this.#state = "leased";
  }
}

/** `port` and a newline, the classic reply, without a string in between. */
function portLine(port: number): Uint8Array {
  const digits = port < 10
    ? 1
    : port < 100
    ? 2
    : port < 1000
    ? 3
    : port < 10000
    ? 4
    : 5;
  const line = new Uint8Array(digits + 1);
  line[digits] = 10;
  for (let i = digits - 1; i >= 0; i--, port = Math.floor(port / 10)) {
    line[i] = 48 + port % 10;
  }
  return line;
}

function errorReply(why: string): Uint8Array {
  return encoder.encode(formatReply({ ok: false, error: why }));
}

// ===========================================================================
// The server's life cycle: open, answer, stop.

class Server implements PortServer {
  readonly address: string;
  readonly timeoutMs: number;
  readonly deadlines: Deadlines;
  readonly #pool: PortPool;
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
  /** How many allocations are waiting or running asynchronously. */
  #pending = 0;
  #startTimes: StartTimes = new StartTimes(
    processStartTime,
    startTimeTtlMs(pidMax()),
  );
  #state: StateFile | undefined;
  #listener: Listener | undefined;
  #connections = new Set<Connection>();
  #stopped: Promise<void> | undefined;
  #bytesInFlight = 0;
  #maxConnections: number;
  /** The last STATUS reply, encoded once and shared until the pool changes. */
  #status: { reply: Uint8Array; at: number; version: number } | undefined;
  #limited = new Map<string, { count: number; timer: unknown }>();

  constructor(options: PortServerOptions, ports: Uint16Array) {
    this.address = options.address ?? DEFAULT_ADDRESS;
    this.timeoutMs = options.timeoutMs ?? 2000;
    this.deadlines = new Deadlines(this.timeoutMs, this.#connections);
    this.#options = options;
    this.#pool = new PortPool(ports);
    this.#log = options.log ?? ((line) => console.error(line));
    // Below the descriptor limit, with room for port checks and the state
    // file: new connections over it are closed, so accept never fails.
    this.#maxConnections = Math.max(
      1,
      Math.min(options.maxConnections ?? 4096, descriptorLimit() - 64),
    );
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
    const path = this.#options.statePath;
    if (path) {
      this.#state = new StateFile(path, () => this.#pool.saved());
      const loaded = await this.#state.load((m) => this.warn(m));
      // Each port once, and only ports of this pool.
      const seen = new Set<number>();
      const entries = loaded.entries.filter(([port]) =>
        this.#pool.has(port) && !seen.has(port) && seen.add(port)
      );
      const dropped = loaded.dropped + loaded.entries.length - entries.length;
      if (dropped > 0) {
        this.warn(
          `State file ${path}: dropped ${dropped} invalid ${
            dropped === 1 ? "entry" : "entries"
          } (a port not in the pool or named twice, or a bad pid, time or label).`,
        );
      }
      const restored = this.#pool.restore(entries, alive);
      if (restored) {
        this.info(`Restored ${restored} allocations of live processes.`);
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
    this.#warnEphemeralOverlap();
    this.#listener = await listenUnix(this.address, {
      accept: (transport) => this.#accept(transport),
      acceptFailed: (error) =>
        this.#limit(
          "accept",
          `Cannot accept connections (${error.message}): pausing, serving again as soon as descriptors come back`,
        ),
    }, this.#options.socketMode);
    this.info(`Serving on ${this.address}`);
  }

  /** Outgoing connections take their local ports from the ephemeral range. */
  #warnEphemeralOverlap(): void {
    const range = ephemeralRange();
    if (!range) return;
    const overlap = this.#pool.countIn(range[0], range[1]);
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

  #accept(transport: Transport): Connection | undefined {
    if (this.#stopped) return void transport.close();
    if (this.#connections.size >= this.#maxConnections) {
      transport.close();
      this.dropped(`was over the limit of ${this.#maxConnections} connections`);
      return undefined;
    }
    const connection = new Connection(this, transport);
    this.#connections.add(connection);
    this.deadlines.started();
    return connection;
  }

  forget(connection: Connection): void {
    this.#connections.delete(connection);
  }

  clientError(why: string): void {
    this.#counters.clientRequestErrors++;
    this.warn(`Could not parse request: ${why}`);
  }

  /** Counts bytes of replies in flight; false when `n` more would pass the cap. */
  reserveBytes(n: number): boolean {
    if (n > 0 && this.#bytesInFlight + n > MAX_BYTES_IN_FLIGHT) {
      this.dropped(
        `had a reply that would pass ${MAX_BYTES_IN_FLIGHT} bytes in flight to slow readers`,
      );
      return false;
    }
    this.#bytesInFlight += n;
    return true;
  }

  /** A client dropped; logged once per interval with a count. */
  dropped(why: string, ms?: number): void {
    this.#limit(
      why,
      `Dropped a client that ${why}${ms ? ` within ${ms} ms` : ""}`,
    );
  }

  /** Logs `message` now, and then at most once per interval, with how many it stands for. */
  #limit(key: string, message: string): void {
    const seen = this.#limited.get(key);
    if (seen) return void seen.count++;
    this.warn(message);
    const entry = { count: 0, timer: undefined as unknown };
    entry.timer = unrefTimer(() => {
      this.#limited.delete(key);
      if (entry.count > 0) {
        this.warn(
          `${message}: ${entry.count} more times in the last ${
            LOG_INTERVAL_MS / 1000
          } s`,
        );
      }
    }, LOG_INTERVAL_MS);
    this.#limited.set(key, entry);
  }

  /**
   * Runs `work` after every earlier one: at once when none is pending (most
   * requests are answered within the turn that read them), else in turn.
   */
  #serial<T>(work: () => T | Promise<T>): T | Promise<T> {
    if (this.#pending === 0) {
      const result = work();
      if (!(result instanceof Promise)) return result;
      return this.#track(result);
    }
    return this.#track(this.#queue.then(work));
  }

  #track<T>(work: Promise<T>): Promise<T> {
    this.#pending++;
    const done = work.finally(() => this.#pending--);
    this.#queue = done.catch(() => {});
    return done;
  }

  /** The Python protocol: a pid in, a port and a newline out, or nothing. */
  classic(bytes: Uint8Array): Answer | Promise<Answer> {
    const pid = parseClassicRequest(bytes);
    if (pid === undefined) {
      const shown = JSON.stringify(
        String.fromCharCode(
          ...bytes.subarray(0, PROTOCOL_LIMITS.classicRequest + 1),
        ),
      );
      this.clientError(
        bytes.length > PROTOCOL_LIMITS.classicRequest
          ? `more than ${PROTOCOL_LIMITS.classicRequest} bytes`
          : `invalid pid ${shown}`,
      );
      return {};
    }
    return then(
      this.#allocate(pid, 1, undefined),
      (result) =>
        typeof result === "string" ? {} : { reply: portLine(result[0]) },
    );
  }

  /** Extended requests: every answer is one line. */
  extended(line: string): Answer | Promise<Answer> {
    const request = parseRequest(line);
    if ("error" in request) {
      this.clientError(request.error);
      return { reply: errorReply(request.error) };
    }
    if (this.#options.verbose) this.info(`Request ${line.trim()}.`);
    return this.#answer(request);
  }

  #answer(request: ServerRequest): Answer | Promise<Answer> {
    switch (request.verb) {
      case "STATUS":
        return { reply: this.#statusReply() };
      case "TAKE":
        return then(
          this.#allocate(request.pid, request.count, request.label),
          (result) => ({
            reply: encoder.encode(formatReply(
              typeof result === "string"
                ? { ok: false, error: result }
                : { ok: true, ports: result },
            )),
          }),
        );
      case "LEASE": {
        const owner = this.#pool.leaseOwner();
        const taken = this.#serial(() =>
          this.#take(request.count, owner, request.label)
        );
        return then(taken, (ports) => {
          if (!ports) {
            this.#pool.releaseOwner(owner);
            return { reply: errorReply(this.#deny("not enough free ports")) };
          }
          this.#counters.totalAllocations += ports.length;
          this.info(`Leased ports ${ports.join(", ")}.`);
          return {
            reply: encoder.encode(formatReply({ ok: true, ports })),
            onEnd: () => {
              const freed = this.#pool.releaseOwner(owner);
              this.info(`Lease of ports ${freed.join(", ")} ended.`);
            },
          };
        });
      }
      case "RETURN": {
        const { pid, ports } = request;
        // All or none, so that the client knows what it still holds.
        if (!this.#pool.holdsAll(ports, pid)) {
          const refused = ports.filter((p) => !this.#pool.holdsAll([p], pid));
          return {
            reply: errorReply(`not held by pid ${pid}: ${refused.join(" ")}`),
          };
        }
        const freed = this.#pool.release(ports, this.#pool.ownerIdOf(pid)!);
        this.info(`Pid ${pid} returned ports ${freed.join(", ")}.`);
        // The file may list them a while longer: that errs on the side of
        // holding, and the next write catches up.
        const answer = {
          reply: encoder.encode(formatReply({ ok: true, ports })),
        };
        if (!this.#state) return answer;
        return this.#state.save().then(
          () => answer,
          (error) => (this.#saveFailed(error), answer),
        );
      }
    }
  }

  #deny(why: string): string {
    this.#counters.deniedAllocations++;
    this.info(`Denied: ${why}.`);
    return why;
  }

  #saveFailed(error: unknown): string {
    const why = `cannot write the state file ${this.#state!.path}: ${
      (error as Error).message
    }`;
    this.warn(`Not handing out ports: ${why}`);
    return why;
  }

  /** `count` ports for a live `pid`, on disk before they are handed out; or why not. */
  #allocate(
    pid: number,
    count: number,
    label: string | undefined,
  ): number[] | string | Promise<number[] | string> {
    if (this.#options.verbose) this.info(`Request on behalf of pid ${pid}.`);
    const startTime = pid > 1 ? this.#startTimes.get(pid) : 0;
    if (pid <= 1 || startTime === 0) {
      return this.#deny(
        pid <= 0
          ? `not allocating a port to invalid pid ${pid}`
          : pid === 1
          ? "not allocating a port to init"
          : `not allocating a port to a non-existent process ${pid}`,
      );
    }
    const owner = this.#pool.ownerOf(pid, startTime);
    const taken = this.#serial(() => this.#take(count, owner, label));
    return then(taken, (ports) => {
      if (!ports) {
        return this.#deny(
          count === 1 ? "all ports in use" : `fewer than ${count} ports free`,
        );
      }
      if (!this.#state) return this.#handedOut(pid, ports);
      return this.#state.save().then(
        () => this.#handedOut(pid, ports),
        (error) => {
          // Not on disk, not handed out: a restart must not lose it.
          this.#pool.release(ports, owner);
          return this.#saveFailed(error);
        },
      );
    });
  }

  #handedOut(pid: number, ports: number[]): number[] {
    this.#counters.totalAllocations += ports.length;
    if (this.#options.verbose) {
      this.info(`Allocated ports ${ports.join(", ")} to pid ${pid}.`);
    }
    return ports;
  }

  #take(
    count: number,
    owner: number,
    label: string | undefined,
  ): number[] | undefined | Promise<number[] | undefined> {
    const taken = this.#pool.take(count, owner, label, portIsFree, alive);
    return then(taken, ({ ports, checked, inUse }) => {
      this.#counters.numPortsCheckedForLastRequest = checked;
      for (const port of inUse) this.info(`Port ${port} unexpectedly in use.`);
      return ports;
    });
  }

  #statusReply(): Uint8Array {
    // One encoding serves every STATUS until the pool changes (or a second
    // passes: holders may die meanwhile).
    const now = Date.now();
    const version = this.#pool.version;
    const last = this.#status;
    if (last?.version === version && now - last.at < 1000) return last.reply;
    const allocations = this.#pool.status(alive);
    const reply = encoder.encode(`${
      JSON.stringify({
        address: this.address,
        pool: this.#pool.size,
        allocated: allocations.length,
        reclaimable: allocations.filter((a) => !a.alive).length,
        allocations,
      })
    }\n`);
    this.#status = { reply, at: now, version };
    return reply;
  }

  stop(): Promise<void> {
    return this.#stopped ??= (async () => {
      const closing = this.#listener?.close();
      for (const connection of this.#connections) connection.close();
      this.deadlines.stop();
      await closing;
      await this.#queue;
      await this.#state?.flush();
    })();
  }
}

function formatLog(level: "I" | "W" | "E", message: string): string {
  const now = new Date();
  const two = (n: number) => String(n).padStart(2, "0");
  const stamp = `${two(now.getMonth() + 1)}${two(now.getDate())} ${
    two(now.getHours())
  }:${two(now.getMinutes())}:${two(now.getSeconds())}.${
    String(now.getMilliseconds()).padStart(3, "0")
  }`;
  return `${level}${stamp} ${ownPid()} portserver] ${message}`;
}

/**
 * A log line as the Python server writes them, for the command line's own
 * messages about the server.
 *
 * @param level `I`nfo, `W`arning or `E`rror.
 * @param message The message.
 * @returns The line.
 *
 * @example
 * ```ts
 * import { logLine } from "@x/portpicker/portserver";
 *
 * console.error(logLine("I", "Stopping."));
 * ```
 */
export function logLine(level: "I" | "W" | "E", message: string): string {
  return formatLog(level, message);
}

function concatBytes(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

// ===========================================================================
// The runtime adapter: Deno's own sockets and files on Deno (no node:
// module is loaded there), node:net and node:fs on Bun and Node.

/** What this file uses of Node's `process` (Bun has it too). */
interface NodeProcess {
  pid: number;
  platform: string;
  getBuiltinModule(name: "node:fs"): typeof import("node:fs");
}

// deno-lint-ignore no-explicit-any
const host = globalThis as any;
const deno: typeof Deno | undefined = host.Deno;
const bun: BunApi | undefined = deno ? undefined : host.Bun;
const node: NodeProcess | undefined = deno ? undefined : host.process;
const encoder = new TextEncoder();
const fs = () => node!.getBuiltinModule("node:fs");
const IS_LINUX = deno ? deno.build.os === "linux" : node!.platform === "linux";

function ownPid(): number {
  return deno ? deno.pid : node!.pid;
}

/** On Deno, reading /proc needs a permission: without it every owner would look dead. */
function requireProcAccess(): void {
  if (!deno || !IS_LINUX) return;
  const { state } = deno.permissions.querySync({ name: "read", path: "/proc" });
  if (state !== "granted") {
    throw new Error(
      "The port server needs --allow-read (for /proc/<pid>/stat) on Deno",
    );
  }
}

/** A file of /proc or /proc/sys (Linux), or undefined where it cannot be read. */
function procText(path: string): string | undefined {
  if (!IS_LINUX) return undefined;
  try {
    return deno ? deno.readTextFileSync(path) : fs().readFileSync(path, "utf8");
  } catch {
    return undefined;
  }
}

/** This process's soft limit of open files (Linux), else a large number. */
function descriptorLimit(): number {
  const text = procText("/proc/self/limits") ?? "";
  const soft = /^Max open files\s+(\d+)/m.exec(text)?.[1];
  return soft ? Number(soft) : Infinity;
}

/** The kernel's ephemeral range, or undefined where it cannot be read. */
function ephemeralRange(): [number, number] | undefined {
  const text = procText("/proc/sys/net/ipv4/ip_local_port_range");
  const [first, last] = (text ?? "").trim().split(/\s+/).map(Number);
  return Number.isInteger(first) && Number.isInteger(last)
    ? [first, last]
    : undefined;
}

/** The kernel's largest pid + 1, or 0 where it cannot be read (no caching then). */
function pidMax(): number {
  return Number(procText("/proc/sys/kernel/pid_max")) || 0;
}

/** A timer (or, `every`, an interval) that does not keep the process alive. */
function unrefTimer(fn: () => void, ms: number, every = false): unknown {
  const timer = every ? setInterval(fn, ms) : setTimeout(fn, ms);
  if (deno) deno.unrefTimer(timer as unknown as number);
  else (timer as unknown as { unref(): void }).unref();
  return timer;
}

function errorCode(error: unknown): string | undefined {
  return (error as { code?: string } | undefined)?.code;
}

/** The text of the state file, or undefined when there is none. */
async function readState(
  path: string,
  limit: number,
): Promise<string | undefined> {
  try {
    const size = deno ? (await deno.stat(path)).size : fs().statSync(path).size;
    if (size > limit) {
      throw new Error(
        `State file ${path} is too large: ${size} bytes, at most ${limit}`,
      );
    }
    return deno
      ? await deno.readTextFile(path)
      : await fs().promises.readFile(path, "utf8");
  } catch (error) {
    if (errorCode(error) === "ENOENT") return undefined;
    if ((error as Error).message.startsWith("State file")) throw error;
    throw new Error(
      `Cannot read the state file ${path}: ${(error as Error).message}`,
    );
  }
}

const files = {
  /** Writes a new file; fails if anything, a link too, is at `path`. */
  async writeNew(path: string, text: string): Promise<void> {
    if (deno) {
      return await deno.writeTextFile(path, text, {
        createNew: true,
        mode: 0o644,
      });
    }
    const { constants, promises } = fs();
    const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL |
      (constants.O_NOFOLLOW ?? 0);
    const file = await promises.open(path, flags, 0o644);
    try {
      await file.writeFile(text);
    } finally {
      await file.close();
    }
  },
  async rename(from: string, to: string): Promise<void> {
    if (deno) await deno.rename(from, to);
    else await fs().promises.rename(from, to);
  },
  async remove(path: string): Promise<void> {
    if (deno) await deno.remove(path);
    else await fs().promises.unlink(path);
  },
  removeSync(path: string): void {
    try {
      if (deno) deno.removeSync(path);
      else fs().unlinkSync(path);
    } catch { /* gone already */ }
  },
  list(dir: string): string[] {
    try {
      return deno
        ? [...deno.readDirSync(dir)].map((entry) => entry.name)
        : fs().readdirSync(dir);
    } catch {
      return [];
    }
  },
};

/** What the listener tells the server. */
interface ListenerEvents {
  /** A new connection; returns its reader, or undefined when it was closed. */
  accept(transport: Transport): Connection | undefined;
  /** Accepting failed (out of file descriptors, say). */
  acceptFailed(error: Error): void;
}

interface Listener {
  close(): Promise<void>;
}

/** How long to stop accepting after a failure, so as not to spin. */
const ACCEPT_PAUSE_MS = 100;

function socketPath(address: string): string {
  return address.startsWith("@") ? `\0${address.slice(1)}` : address;
}

async function listenUnix(
  address: string,
  events: ListenerEvents,
  mode: number | undefined,
): Promise<Listener> {
  await prepareSocketFile(address);
  const path = socketPath(address);
  const inUse = () =>
    new Error(`Another port server is already serving on ${address}`);
  const removeFile = () => {
    if (!address.startsWith("@")) files.removeSync(address);
  };
  const setMode = () => {
    if (mode === undefined || address.startsWith("@")) return;
    if (deno) deno.chmodSync(address, mode);
    else fs().chmodSync(address, mode);
  };
  if (deno) {
    let listener: Deno.UnixListener;
    try {
      listener = deno.listen({ transport: "unix", path });
    } catch (error) {
      if (errorCode(error) === "EADDRINUSE") throw inUse();
      throw error;
    }
    setMode();
    const loop = acceptLoop(listener, events);
    return {
      close: async () => {
        listener.close();
        await loop;
        removeFile();
      },
    };
  }
  if (bun) return listenBun(bun, path, inUse, events, setMode, removeFile);
  const net = await import("node:net");
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    const connection = events.accept({
      write: (bytes) =>
        new Promise((resolve, reject) =>
          socket.write(bytes, (error) => error ? reject(error) : resolve())
        ),
      end: (bytes) => void socket.end(bytes, () => socket.destroy()),
      close: () => void socket.destroy(),
    });
    if (!connection) return;
    socket.on("data", (chunk: Uint8Array) => {
      connection.data(chunk);
      if (connection.done) socket.pause();
    });
    socket.on("end", () => connection.end());
    socket.on("error", () => connection.close());
    socket.on("close", () => connection.close());
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: Error & { code?: string }) => {
      reject(error.code === "EADDRINUSE" ? inUse() : error);
    });
    server.listen({ path, exclusive: true }, () => resolve());
  });
  setMode();
  server.on("error", (error) => events.acceptFailed(error));
  return {
    close: () =>
      new Promise((resolve) => {
        server.close(() => {
          removeFile();
          resolve();
        });
      }),
  };
}

/** What this file uses of Bun's own socket API. */
interface BunApi {
  listen(options: {
    unix: string;
    allowHalfOpen: boolean;
    socket: {
      open(socket: BunSocket): void;
      data(socket: BunSocket, chunk: Uint8Array): void;
      drain(socket: BunSocket): void;
      end(socket: BunSocket): void;
      close(socket: BunSocket): void;
      error(socket: BunSocket): void;
    };
  }): { stop(closeActive: boolean): void };
}

interface BunSocket {
  data: BunTransport | undefined;
  write(bytes: Uint8Array): number;
  end(bytes?: Uint8Array): void;
}

/** A connection's transport over a Bun socket; also the socket's `data`. */
class BunTransport implements Transport {
  connection: Connection | undefined;
  /** Wakes a write waiting for the kernel to take more. */
  drained: (() => void) | undefined;
  readonly #socket: BunSocket;

  constructor(socket: BunSocket) {
    this.#socket = socket;
  }

  async write(bytes: Uint8Array): Promise<void> {
    let n = 0;
    while (n < bytes.length) {
      const wrote = this.#socket.write(bytes.subarray(n));
      if (wrote < 0) throw new Error("the client went away");
      n += wrote;
      if (n < bytes.length) {
        await new Promise<void>((resolve) => this.drained = resolve);
      }
    }
  }

  end(bytes: Uint8Array): void {
    this.connection = undefined;
    this.#socket.end(bytes);
  }

  close(): void {
    this.connection = undefined;
    this.drained?.();
    this.#socket.end();
  }
}

/**
 * Bun's own Unix listener: several times faster than its node:net. Writes
 * that the kernel does not take at once wait for `drain`.
 */
function listenBun(
  bun: BunApi,
  path: string,
  inUse: () => Error,
  events: ListenerEvents,
  setMode: () => void,
  removeFile: () => void,
): Listener {
  const gone = (socket: BunSocket) => socket.data?.connection?.close();
  let listener;
  try {
    listener = bun.listen({
      unix: path,
      allowHalfOpen: true,
      socket: {
        open(socket) {
          const transport = new BunTransport(socket);
          socket.data = transport;
          transport.connection = events.accept(transport);
        },
        data: (socket, chunk) => socket.data?.connection?.data(chunk),
        drain: (socket) => socket.data?.drained?.(),
        end: (socket) => socket.data?.connection?.end(),
        close: gone,
        error: gone,
      },
    });
  } catch (error) {
    if (errorCode(error) === "EADDRINUSE") throw inUse();
    throw error;
  }
  setMode();
  const active = listener;
  return {
    close: () => {
      active.stop(true);
      removeFile();
      return Promise.resolve();
    },
  };
}

async function acceptLoop(
  listener: Deno.UnixListener,
  events: ListenerEvents,
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
      // Out of file descriptors, say: pause, then serve again.
      events.acceptFailed(error as Error);
      await new Promise((resolve) => setTimeout(resolve, ACCEPT_PAUSE_MS));
      continue;
    }
    serveDenoConnection(conn, events);
  }
}

async function serveDenoConnection(
  conn: Deno.UnixConn,
  events: ListenerEvents,
): Promise<void> {
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    try {
      conn.close();
    } catch { /* already closed */ }
  };
  const write = async (bytes: Uint8Array) => {
    for (let n = 0; n < bytes.length;) n += await conn.write(bytes.subarray(n));
  };
  const connection = events.accept({
    write,
    end: (bytes) => void write(bytes).then(close, close),
    close,
  });
  if (!connection) return;
  // Small: a classic request is 20 bytes; longer ones take several reads.
  const buffer = new Uint8Array(512);
  try {
    // Reading on after an answered classic request only costs a rejected read;
    // anything else is read to its end, which ends a lease.
    while (!closed && !connection.done) {
      const n = await conn.read(buffer);
      if (n === null) return connection.end();
      connection.data(buffer.slice(0, n));
    }
  } catch {
    connection.close();
  }
}

/** A live server on `path` answers a connect; a stale socket file refuses it. */
async function probe(path: string): Promise<"live" | "stale"> {
  try {
    if (deno) {
      (await deno.connect({ transport: "unix", path })).close();
      return "live";
    }
    const net = await import("node:net");
    return await new Promise((resolve) => {
      const socket = net.connect({ path });
      socket.once("connect", () => {
        socket.destroy();
        resolve("live");
      });
      socket.once("error", () => resolve("stale"));
    });
  } catch {
    return "stale";
  }
}

/** Replaces a stale socket file; refuses anything else at the address. */
async function prepareSocketFile(address: string): Promise<void> {
  if (address.startsWith("@")) return;
  let isSocket: boolean;
  try {
    isSocket = deno
      ? deno.lstatSync(address).isSocket === true
      : fs().lstatSync(address).isSocket();
  } catch {
    return;
  }
  if (!isSocket) {
    throw new Error(
      `Cannot listen on ${address}: it exists and is not a socket`,
    );
  }
  if (await probe(address) === "live") {
    throw new Error(`Another port server is already serving on ${address}`);
  }
  files.removeSync(address);
}
