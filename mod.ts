/**
 * Network ports that nobody else is using, for tests, CI farms and scripts.
 *
 * A TypeScript reimplementation of Google's Python `portpicker`, wire-compatible
 * with its `portserver`. Runs on Deno, Bun and Node.js 22 or later, with no
 * dependencies: this one file is the whole library, and can be vendored alone.
 *
 * The file reads top to bottom:
 * 1. the public API and its types;
 * 2. the wire protocol of the port server, shared with `portserver.ts`;
 * 3. the runtime adapter, the only code that touches `Deno`, `Bun` or `process`;
 * 4. port checks (binding sockets);
 * 5. per-process state (which ports this process was given);
 * 6. lock-directory claims (unique ports across processes, with no server);
 * 7. the port-server client.
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

// ===========================================================================
// 1. The public API and its types.

/** The version of this package. */
export const VERSION = "0.2.0";

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
   * Makes the error; the message names the range and what was tried.
   *
   * @param range The inclusive search range that was walked.
   * @param tried How many of its ports were tried; when several ports were
   * asked for, how many of them were found.
   * @param wanted How many ports were asked for.
   */
  constructor(range: readonly [number, number], tried: number, wanted = 1) {
    const size = range[1] - range[0] + 1;
    super(
      wanted > 1
        ? `Not enough free ports in ${range[0]}-${
          range[1]
        }: asked for ${wanted}, found ${tried} of its ${size} ports`
        : `No free port found in ${range[0]}-${
          range[1]
        }: tried ${tried} of ${size} ports`,
    );
    this.name = "NoFreePortFoundError";
    this.range = range;
    this.tried = tried;
  }
}

/** Options of {@linkcode pickUnusedPort} and the functions built on it. */
export interface PickOptions {
  /**
   * The process the port is for: told to the port server, and named in
   * lock-directory claims (a claim for another process outlives this one
   * and goes stale when that process dies). Defaults to this process.
   */
  pid?: number;
  /**
   * The port server to ask first: a Unix socket path, or `@name` for the
   * Linux abstract namespace. Defaults to the `PORTSERVER_ADDRESS`
   * environment variable; without either, no server is asked.
   */
  portserverAddress?: string;
  /** Preferred ports, tried first and in this order: a port or an iterable. */
  ports?: number | Iterable<number>;
  /**
   * The inclusive search range `[first, last]`. When given, every port
   * returned lies in it and the kernel is not asked for a port of its own
   * choosing. Defaults to `[15000, 24999]`, searched after the kernel's pick.
   */
  range?: readonly [number, number];
  /** Ports never returned: any iterable of ports. */
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

/** Options of the functions that talk to a port server for a process. */
export interface ServerRequestOptions {
  /** The process the ports are for. Defaults to this process. */
  pid?: number;
}

/** Options of {@linkcode returnPort}. */
export interface ReturnOptions {
  /**
   * A lock directory whose claim on the port is removed, when it names
   * `pid`: for a port picked by another process for this one (the CLI's
   * `--lock-dir`). Claims this process made itself are always removed.
   */
  lockDir?: string;
  /** The holder named in that claim. Defaults to this process. */
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

/** Options of {@linkcode reservePort}. */
export interface ReserveOptions extends PickOptions {
  /**
   * Hold the port with SO_REUSEPORT, so that the caller's own server can
   * bind it with `reusePort: true` while the reservation still holds it: no
   * moment in which another process can take it. TCP on Deno (with
   * `--unstable-net`), Bun and Node 22.12+; UDP too on Node (on Deno and Bun
   * the UDP socket is held plainly until `release()`). Where the port cannot
   * be shared, `reservePort` throws an error that names the option.
   */
  reusePort?: boolean;
}

/** Options of {@linkcode waitForPort}. */
export interface WaitOptions {
  /** How long to wait, in milliseconds; default 30000. */
  timeout?: number;
  /** Where to connect; default this host, over IPv4 (127.0.0.1) or IPv6 (::1). */
  hostname?: string;
  /** Stops the wait: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
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
 * of them are held bound until the last is found, then released. When the
 * ports cannot all be had, the ones found are given back.
 *
 * @param count How many ports, at least 1.
 * @param options See {@linkcode PickOptions}.
 * @returns The ports, in the order they were picked.
 * @throws {NoFreePortFoundError} When there are not enough free ports.
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
  let done = false;
  try {
    for (const port of await bulkFromServer(p, count)) {
      held.push(await tryHold(port, true));
      taken.add(port);
    }
    while (held.length < count) {
      const one = await pickOne(p, true, taken);
      held.push(one);
      taken.add(one.port);
    }
    done = true;
  } catch (error) {
    if (error instanceof NoFreePortFoundError && count > 1) {
      throw new NoFreePortFoundError(p.range, held.length, count);
    }
    throw error;
  } finally {
    await Promise.all(held.map((h) => h.release()));
    if (!done) { for (const h of held) giveBack(h.port, p); }
  }
  return held.map((h) => h.port);
}

/**
 * Picks a port as {@linkcode pickUnusedPort} does and keeps it bound on TCP
 * and UDP until `release()`, so that nothing else can take it meanwhile.
 * Released right before your server binds it, a short window remains; with
 * `reusePort: true` your server binds it while the reservation still holds
 * it, and no window remains (see {@linkcode ReserveOptions}).
 *
 * @param options See {@linkcode ReserveOptions}.
 * @returns The reservation.
 * @throws {Error} With `reusePort`, where the port cannot be shared.
 *
 * @example
 * ```ts
 * import { reservePort } from "@x/portpicker";
 *
 * await using reservation = await reservePort({ reusePort: true });
 * // Deno needs --unstable-net for reusePort.
 * Deno.serve({ port: reservation.port, reusePort: true }, () => new Response("hi"));
 * await reservation.release(); // the server alone holds the port now
 * ```
 */
export async function reservePort(
  options?: ReserveOptions,
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

/**
 * {@linkcode isPortFree} without waiting, where the runtime can bind
 * synchronously: through the C library, on Linux (x64 and arm64, glibc), on
 * Bun, and on Deno with `--allow-ffi` (`-A` has it). The binds are the same.
 * Elsewhere (Node.js, other systems, Deno without the permission), and when
 * a bind fails in a way that only the runtime's own sockets can name, it
 * returns undefined: ask `isPortFree` then.
 *
 * @param port The port, from 1 to 65535.
 * @returns Whether the port is free; undefined when it cannot tell at once.
 *
 * @example
 * ```ts
 * import { isPortFree, isPortFreeSync } from "@x/portpicker";
 *
 * const free = isPortFreeSync(8080) ?? await isPortFree(8080);
 * console.log(free);
 * ```
 */
export function isPortFreeSync(port: number): boolean | undefined {
  checkPort(port);
  return freeNow(port);
}

/**
 * Waits until something accepts TCP connections on `port`: the server your
 * test just started is up. Polls with a back-off (10 ms, growing to 250 ms),
 * never a busy loop.
 *
 * @param port The port, from 1 to 65535.
 * @param options The timeout, the host, and a signal to stop waiting.
 * @throws {Error} On timeout, naming the port, the hosts and the timeout.
 *
 * @example
 * ```ts
 * import { pickUnusedPort, waitForPort } from "@x/portpicker";
 *
 * const port = await pickUnusedPort();
 * new Deno.Command("my-server", { args: [`--port=${port}`] }).spawn();
 * await waitForPort(port, { timeout: 10_000 });
 * ```
 */
export async function waitForPort(
  port: number,
  options: WaitOptions = {},
): Promise<void> {
  checkPort(port);
  const { timeout = 30_000, hostname, signal } = options;
  if (typeof timeout !== "number" || !(timeout >= 0)) {
    throw new TypeError(
      `Invalid timeout ${
        formatValue(timeout)
      }: expected milliseconds, 0 or more`,
    );
  }
  if (hostname !== undefined && (typeof hostname !== "string" || !hostname)) {
    throw new TypeError(
      `Invalid hostname ${formatValue(hostname)}: expected a host name`,
    );
  }
  const hosts = hostname ? [hostname] : ["127.0.0.1", "::1"];
  await waitUntilAccepting(port, hosts, timeout, signal);
}

/**
 * Python's `bind(port, socket_type)`: binds `port` on the wildcard address of
 * every address family the host has, one protocol, and closes the sockets at
 * once. Port 0 takes the kernel's choice (then tried on the other family).
 *
 * @param port The port, from 0 to 65535.
 * @param protocol `"tcp"` (the socket listens) or `"udp"`.
 * @returns The port when every bind succeeded, else undefined.
 *
 * @example
 * ```ts
 * import { bind } from "@x/portpicker";
 *
 * const port = await bind(0, "tcp"); // a port the kernel chose, free on TCP
 * ```
 */
export async function bind(
  port: number,
  protocol: "tcp" | "udp",
): Promise<number | undefined> {
  if (port !== 0) checkPort(port);
  if (protocol !== "tcp" && protocol !== "udp") {
    throw new TypeError(
      `Invalid protocol ${formatValue(protocol)}: expected "tcp" or "udp"`,
    );
  }
  return await bindEachFamily(protocol, port);
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
 * @param options A lock directory and the holder whose claim to remove.
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
export function returnPort(port: number, options: ReturnOptions = {}): void {
  checkPort(port);
  releaseClaim(port);
  if (options.lockDir !== undefined) {
    removeClaimOf(
      checkLockDir(options.lockDir),
      port,
      options.pid === undefined ? ownPid() : checkPid(options.pid),
    );
  }
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
 * Forgets every port this process was given, reserved or returned, as
 * get-port's `clearLockedPorts`: they may all be picked again. This
 * process's lock-directory claims are removed; ports from a port server are
 * not returned to it (use {@linkcode returnPort} for that).
 *
 * @example
 * ```ts
 * import { forgetPorts, pickUnusedPort } from "@x/portpicker";
 *
 * await pickUnusedPort();
 * forgetPorts(); // a fresh start, as in a new process
 * ```
 */
export function forgetPorts(): void {
  freePorts.clear();
  ownedPorts.clear();
  randomPorts.clear();
  serverPorts.clear();
  extendedServers.clear();
  releaseAllClaims();
}

/**
 * Asks a port server for a port, with the Python client's wire protocol: the
 * pid in ASCII and a newline; the reply's line is the port. On an empty, zero
 * or malformed reply, prints one line on stderr (`Portserver failed to find a
 * port.` as the Python client); on a connection error, prints it. Both return
 * undefined.
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
  options: ServerRequestOptions = {},
): Promise<number | undefined> {
  if (typeof address !== "string") {
    throw new TypeError(
      `Invalid port server address ${formatValue(address)}: expected a string`,
    );
  }
  const pid = options.pid === undefined ? ownPid() : checkPid(options.pid);
  if (!address) return undefined;
  let reply: string | undefined;
  try {
    reply = await request(address, `${pid}\n`, PROTOCOL_LIMITS.reply);
  } catch (error) {
    console.error(socketErrorLine(error));
    return undefined;
  }
  const port = reply === undefined ? undefined : parseClassicReply(reply);
  if (port === undefined) {
    console.error(
      reply === undefined || /^0*$/.test(reply)
        ? "Portserver failed to find a port."
        : `Portserver failed to find a port: bad reply ${
          JSON.stringify(reply.slice(0, 40))
        } from ${address}.`,
    );
    return undefined;
  }
  ownedPorts.add(port);
  serverPorts.set(port, { address, pid });
  return port;
}

/**
 * Leases `count` distinct ports from this project's port server: they stay
 * held for exactly as long as this connection is open, whatever happens to
 * the process; for containers and other places where the server cannot see
 * the client's pid. The open connection does not keep the process alive.
 *
 * @param count How many ports, 1 to 1000.
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
  checkCount(count, PROTOCOL_LIMITS.ports);
  const label = options.label === undefined
    ? undefined
    : checkLabel(options.label);
  const address = serverAddress(options.portserverAddress);
  const connection = await reach(address, () => connectUnix(address));
  let reply: PortsReply | undefined;
  try {
    // The sending side stays open: the lease lasts while the connection does.
    await connection.write(formatRequest({ verb: "LEASE", count, label }));
    const line = await readLine(connection, PROTOCOL_LIMITS.reply, address);
    extendedServers.set(address, line !== undefined);
    reply = line === undefined ? undefined : parseReply(line, count, address);
  } catch (error) {
    connection.close();
    throw error;
  }
  if (!reply?.ok) {
    connection.close();
    throw new Error(
      reply
        ? `The port server at ${address} refused the lease: ${reply.error}`
        : `The port server at ${address} cannot lease ports (a Python portserver?)`,
    );
  }
  connection.unref();
  let released: Promise<void> | undefined;
  const release = () => released ??= Promise.resolve(connection.close());
  return {
    ports: reply.ports,
    release,
    [Symbol.dispose]: () => void release(),
    [Symbol.asyncDispose]: release,
  };
}

/**
 * Asks this project's port server who holds which port.
 *
 * @param address The server; defaults to `PORTSERVER_ADDRESS`.
 * @returns The server's answer, checked against {@linkcode PortServerStatus}.
 * @throws {Error} With no server, on a malformed reply, or when it does not
 * speak the extended protocol (the Python server).
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
  const where = serverAddress(address);
  const line = await extendedRequest(
    where,
    formatRequest({ verb: "STATUS" }),
    PROTOCOL_LIMITS.statusReply,
  );
  if (line === undefined) {
    throw new Error(
      `The port server at ${where} has no status request (a Python portserver?)`,
    );
  }
  return parseStatus(line, where);
}

/**
 * Gives ports back to this project's port server, which frees them at once;
 * all of them, or none when one is not held by that pid.
 *
 * @param address The server's address.
 * @param ports The ports, held by `options.pid`; 1 to 1000 of them.
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
  ports: readonly number[],
  options: ServerRequestOptions = {},
): Promise<number[]> {
  const pid = options.pid === undefined ? ownPid() : checkPid(options.pid);
  if (
    !Array.isArray(ports) || ports.length === 0 ||
    ports.length > PROTOCOL_LIMITS.ports
  ) {
    throw new TypeError(
      `Invalid ports ${
        formatValue(ports)
      }: expected an array of 1 to ${PROTOCOL_LIMITS.ports} ports`,
    );
  }
  ports.forEach((port) => checkPort(port));
  const line = await extendedRequest(
    address,
    formatRequest({ verb: "RETURN", pid, ports: [...ports] }),
    PROTOCOL_LIMITS.reply,
  );
  if (line === undefined) {
    throw new Error(
      `The port server at ${address} cannot take ports back (a Python portserver?)`,
    );
  }
  const reply = parseReply(line, ports.length, address);
  if (!reply.ok) {
    throw new Error(`The port server at ${address} refused: ${reply.error}`);
  }
  for (const port of reply.ports) {
    serverPorts.delete(port);
    ownedPorts.delete(port);
    freePorts.delete(port);
  }
  return reply.ports;
}

/**
 * The start time of `pid` (Linux: clock ticks since boot, from
 * `/proc/<pid>/stat`), or 0 when no live process has that pid. Zombies count
 * as dead. Elsewhere: 1 while the pid exists, so pid reuse goes undetected.
 * A pid and its start time name one process for good: the port server and
 * lock-directory claims record owners this way.
 *
 * @param pid The process.
 * @returns Its start time, or 0 for none.
 * @throws {Error} When `/proc` cannot be read (say, no Deno permission):
 * that must not make every owner look dead.
 *
 * @example
 * ```ts
 * import { processStartTime } from "@x/portpicker";
 *
 * console.log(processStartTime(1) > 0); // true
 * ```
 */
export function processStartTime(pid: number): number {
  if (!Number.isInteger(pid) || pid <= 0 || pid > MAX_PID) return 0;
  if (!IS_LINUX) return processExists(pid) ? 1 : 0;
  const stat = readProcStat(pid);
  if (stat === undefined) return 0;
  // The command name may hold spaces and parentheses: fields follow the last ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X") return 0;
  return Number(fields[19]) || 1;
}

/**
 * Linux's `ip_local_reserved_ports`: ports the kernel never hands out and
 * this picker never returns (nor the port server). Empty elsewhere, and on
 * Deno without read access to that file.
 *
 * @returns The reserved ports, read once.
 *
 * @example
 * ```ts
 * import { reservedPorts } from "@x/portpicker";
 *
 * console.log(reservedPorts().has(8080));
 * ```
 */
export function reservedPorts(): ReadonlySet<number> {
  if (reserved) return reserved;
  reserved = new Set();
  const path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
  if (!IS_LINUX || !mayRead(path)) return reserved;
  let text: string | undefined;
  try {
    text = readTextOrUndefined(path);
  } catch {
    return reserved;
  }
  for (const part of (text ?? "").trim().split(",")) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!match) continue;
    const last = Math.min(Number(match[2] ?? match[1]), 65535);
    for (let port = Number(match[1]); port <= last; port++) reserved.add(port);
  }
  return reserved;
}

let reserved: Set<number> | undefined;

// ===========================================================================
// 2. The wire protocol, used by the client here and by `portserver.ts`.
//
// Classic (the Python server's): the client sends its pid in ASCII and a
// newline; the server writes the port and a newline, or closes with nothing
// written. Extended (this project's server): one request line, a verb and
// `key=value` words, answered by one line: `OK <ports>`, `ERR <why>`, or the
// status as JSON. The Python server cannot parse a verb and closes without a
// reply, so a client can tell the two servers apart. Every message is
// complete only at its newline and never longer than its limit.

/** Size limits of the wire protocol (bytes, newline included, unless named otherwise). */
export const PROTOCOL_LIMITS: {
  /** A classic request: the Python server rejects longer ones. */
  readonly classicRequest: number;
  /** An extended request: fits a RETURN of 1000 ports by the largest pid. */
  readonly request: number;
  /** An `OK` or `ERR` reply: fits 1000 ports. */
  readonly reply: number;
  /** A STATUS reply: fits every port of 1–65535 held with a 100-character label. */
  readonly statusReply: number;
  /** Ports in one TAKE, LEASE or RETURN. */
  readonly ports: number;
  /** Characters in a label. */
  readonly label: number;
} = {
  classicRequest: 20,
  request: 8192,
  reply: 8192,
  statusReply: 16 * 1024 * 1024,
  ports: 1000,
  label: 100,
};

/** An extended request, as {@linkcode parseRequest} reads it. */
export type ServerRequest =
  | { verb: "TAKE"; pid: number; count: number; label?: string }
  | { verb: "LEASE"; count: number; label?: string }
  | { verb: "RETURN"; pid: number; ports: number[] }
  | { verb: "STATUS" };

/** One allocation in a STATUS reply. */
export interface AllocationStatus {
  /** The port. */
  port: number;
  /** The owner process, or null for a lease. */
  pid: number | null;
  /** Whether a lease (a connection kept open) holds it. */
  lease: boolean;
  /**
   * Whether its holder still lives; false when the process died or its pid
   * now names another process: the port is reclaimed when the server next
   * runs out of free ports.
   */
  alive: boolean;
  /** When it was handed out, as an ISO 8601 time. */
  since: string;
  /** The label given with the request, or null. */
  label: string | null;
}

/** A STATUS reply: who holds which port. */
export interface PortServerStatus {
  /** The server's address. */
  address: string;
  /** How many ports it manages. */
  pool: number;
  /** How many are held now, by live holders or dead ones. */
  allocated: number;
  /** How many of those are held by holders that died (see `alive`). */
  reclaimable: number;
  /** Who holds which port, since when, with which label; by port. */
  allocations: AllocationStatus[];
}

/** A reply to TAKE, LEASE or RETURN: ports, or the server's refusal. */
export type PortsReply =
  | { ok: true; ports: number[] }
  | { ok: false; error: string };

const VERBS: Record<ServerRequest["verb"], readonly string[]> = {
  TAKE: ["pid", "count", "label"],
  LEASE: ["count", "label"],
  RETURN: ["pid", "ports"],
  STATUS: [],
};

/**
 * The label rule: printable ASCII without spaces, 1 to 100 characters.
 *
 * @param label The candidate.
 * @returns Whether the server takes it as a label.
 *
 * @example
 * ```ts
 * import { isLabel } from "@x/portpicker";
 *
 * isLabel("e2e-web"); // true
 * isLabel("two words"); // false
 * ```
 */
export function isLabel(label: unknown): label is string {
  return typeof label === "string" && /^[\x21-\x7e]{1,100}$/.test(label);
}

/**
 * Collects bytes until a newline, as every message of the protocol ends.
 * Lines are split at the first newline; a line longer than `limit` is an
 * error before it is complete, never a prefix taken for the whole.
 *
 * @example
 * ```ts
 * import { LineReader } from "@x/portpicker";
 *
 * const reader = new LineReader(100);
 * reader.push(new TextEncoder().encode("OK 150")); // undefined: not complete
 * reader.push(new TextEncoder().encode("00\n")); // "OK 15000"
 * ```
 */
export class LineReader {
  /** The most bytes a line may have, its newline included. */
  readonly limit: number;
  #chunks: Uint8Array[] = [];
  #size = 0;

  /**
   * Makes a reader of lines of at most `limit` bytes.
   *
   * @param limit The most bytes a line may have, its newline included.
   */
  constructor(limit: number) {
    this.limit = limit;
  }

  /** How many bytes it holds of a line not yet complete. */
  get size(): number {
    return this.#size;
  }

  /** The bytes of the line not yet complete. */
  bytes(): Uint8Array {
    return concat(this.#chunks, this.#size);
  }

  /**
   * Adds bytes read off a connection.
   *
   * @param chunk The bytes.
   * @returns The line, without its newline, once it is complete; bytes after
   * the newline are dropped. Undefined while it is not complete.
   * @throws {RangeError} When the line is longer than the limit.
   */
  push(chunk: Uint8Array): string | undefined {
    const newline = chunk.indexOf(10);
    const size = this.#size + (newline < 0 ? chunk.length : newline + 1);
    if (size > this.limit) {
      throw new RangeError(
        `a line longer than ${this.limit} bytes${
          newline < 0 ? " and no newline yet" : ""
        }`,
      );
    }
    if (newline < 0) {
      this.#chunks.push(chunk);
      this.#size = size;
      return undefined;
    }
    const line = this.#chunks.length === 0
      ? chunk.subarray(0, newline)
      : concat([...this.#chunks, chunk.subarray(0, newline)], size - 1);
    this.#chunks = [];
    this.#size = 0;
    return decoder.decode(line);
  }
}

/**
 * Whether a request is an extended one: it starts with one of the verbs.
 * Anything else, garbage that starts with a letter too, is a classic request.
 *
 * @param bytes The request's first bytes.
 * @returns Whether it starts with `TAKE`, `LEASE`, `RETURN` or `STATUS`.
 *
 * @example
 * ```ts
 * import { isExtendedRequest } from "@x/portpicker";
 *
 * isExtendedRequest(new TextEncoder().encode("STATUS\n")); // true
 * ```
 */
export function isExtendedRequest(bytes: Uint8Array): boolean {
  // Every verb starts with L, R, S or T; a classic request never does.
  const first = bytes[0];
  if (first !== 76 && first !== 82 && first !== 83 && first !== 84) {
    return false;
  }
  const head = String.fromCharCode(...bytes.subarray(0, 7));
  return /^(TAKE|LEASE|RETURN|STATUS)([ \r\n]|$)/.test(head);
}

/**
 * The pid of a classic request, parsed as the Python server does (Python's
 * `int()`: white space around, a sign, digit groups with `_`), or undefined
 * for one it rejects: empty, over 20 bytes, or not a number.
 *
 * @param bytes The request.
 * @returns The pid (maybe 0 or negative), or undefined.
 *
 * @example
 * ```ts
 * import { parseClassicRequest } from "@x/portpicker";
 *
 * parseClassicRequest(new TextEncoder().encode("1234\n")); // 1234
 * ```
 */
export function parseClassicRequest(bytes: Uint8Array): number | undefined {
  if (bytes.length > PROTOCOL_LIMITS.classicRequest || bytes.length === 0) {
    return undefined;
  }
  // The usual form, digits and a newline, without a string (at most 15
  // digits: exact as a double, as Number() of the text would be).
  let digits = 0;
  let pid = 0;
  for (; digits < bytes.length && bytes[digits] - 48 >>> 0 < 10; digits++) {
    pid = pid * 10 + bytes[digits] - 48;
  }
  if (
    digits > 0 && digits <= 15 &&
    (digits === bytes.length ||
      digits === bytes.length - 1 && bytes[digits] === 10)
  ) {
    return pid;
  }
  let text = "";
  for (const b of bytes) {
    if (b > 0x7f) return undefined;
    text += String.fromCharCode(b);
  }
  const match = /^[ \t\n\r\f\v]*([+-]?\d+(?:_\d+)*)[ \t\n\r\f\v]*$/.exec(text);
  return match ? Number(match[1].replaceAll("_", "")) : undefined;
}

/**
 * Parses an extended request line, as `TAKE pid=1234 count=3 label=web`.
 * Unknown and repeated keys are refused.
 *
 * @param line The request, without its newline.
 * @returns The request, or `{ error }` naming what is wrong.
 *
 * @example
 * ```ts
 * import { parseRequest } from "@x/portpicker";
 *
 * parseRequest("TAKE pid=1234 count=2"); // { verb: "TAKE", pid: 1234, count: 2 }
 * ```
 */
export function parseRequest(line: string): ServerRequest | { error: string } {
  line = line.endsWith("\r") ? line.slice(0, -1) : line;
  if (!/^[\x20-\x7e]*$/.test(line)) {
    return { error: "not one line of printable ASCII" };
  }
  const [verb, ...words] = line.split(" ").filter((t) => t !== "");
  if (!Object.hasOwn(VERBS, verb ?? "")) {
    return { error: `unknown request ${JSON.stringify(verb ?? "")}` };
  }
  const known = VERBS[verb as ServerRequest["verb"]];
  const values = new Map<string, string>();
  for (const word of words) {
    const eq = word.indexOf("=");
    const key = word.slice(0, Math.max(eq, 0));
    if (eq <= 0 || !known.includes(key)) {
      return { error: `unexpected ${JSON.stringify(word)} in ${verb}` };
    }
    if (values.has(key)) {
      return { error: `duplicate key ${JSON.stringify(key)} in ${verb}` };
    }
    values.set(key, word.slice(eq + 1));
  }
  const number = (key: string, digits: number, min: number, max: number) => {
    const text = values.get(key)!;
    const n = Number(text);
    if (!new RegExp(`^\\d{1,${digits}}$`).test(text) || n < min || n > max) {
      throw `invalid ${key} ${JSON.stringify(text)}: expected ${min} to ${max}`;
    }
    return n;
  };
  try {
    const limit = PROTOCOL_LIMITS.ports;
    const count = values.has("count") ? number("count", 4, 1, limit) : 1;
    const label = values.get("label");
    if (label !== undefined && !isLabel(label)) {
      return { error: "a label has 1 to 100 printable characters" };
    }
    for (const key of ["pid", "ports"]) {
      if (known.includes(key) && !values.has(key)) {
        return { error: `${verb} needs ${key}=` };
      }
    }
    switch (verb) {
      case "STATUS":
        return { verb };
      case "LEASE":
        return label === undefined ? { verb, count } : { verb, count, label };
      case "TAKE": {
        const pid = number("pid", 10, 0, MAX_PID);
        return label === undefined
          ? { verb, pid, count }
          : { verb, pid, count, label };
      }
      default: {
        const pid = number("pid", 10, 0, MAX_PID);
        const list = values.get("ports")!.split(",");
        if (list.length > limit) {
          return { error: `more than ${limit} ports in RETURN` };
        }
        const ports: number[] = [];
        const seen = new Set<number>();
        for (const text of list) {
          const port = Number(text);
          if (!/^\d{1,5}$/.test(text) || port < 1 || port > 65535) {
            return { error: `invalid port ${JSON.stringify(text)}` };
          }
          if (seen.has(port)) return { error: `port ${port} named twice` };
          seen.add(port);
          ports.push(port);
        }
        return { verb: "RETURN", pid, ports };
      }
    }
  } catch (error) {
    return { error: String(error) };
  }
}

/**
 * Writes an extended request as its line, newline included.
 *
 * @param request The request; its values are not checked again here.
 * @returns The line.
 *
 * @example
 * ```ts
 * import { formatRequest } from "@x/portpicker";
 *
 * formatRequest({ verb: "TAKE", pid: 1234, count: 2 }); // "TAKE pid=1234 count=2\n"
 * ```
 */
export function formatRequest(request: ServerRequest): string {
  switch (request.verb) {
    case "STATUS":
      return "STATUS\n";
    case "RETURN":
      return `RETURN pid=${request.pid} ports=${request.ports.join(",")}\n`;
    default: {
      const pid = request.verb === "TAKE" ? ` pid=${request.pid}` : "";
      const label = request.label ? ` label=${request.label}` : "";
      return `${request.verb}${pid} count=${request.count}${label}\n`;
    }
  }
}

/**
 * Writes the reply of TAKE, LEASE or RETURN.
 *
 * @param reply The ports given or freed, or the refusal.
 * @returns The line, newline included.
 *
 * @example
 * ```ts
 * import { formatReply } from "@x/portpicker";
 *
 * formatReply({ ok: true, ports: [15000, 15001] }); // "OK 15000 15001\n"
 * ```
 */
export function formatReply(reply: PortsReply): string {
  return reply.ok
    ? `OK ${reply.ports.join(" ")}\n`
    : `ERR ${reply.error.replace(/[^\x20-\x7e]/g, "?")}\n`;
}

/**
 * Reads the reply of TAKE, LEASE or RETURN. Every port must lie in 1–65535,
 * appear once, and be as many as `count`.
 *
 * @param line The reply, without its newline.
 * @param count How many ports the request asked for.
 * @param address The server, named in the error.
 * @returns The ports, or the server's refusal.
 * @throws {Error} On a malformed reply, naming it and the server.
 *
 * @example
 * ```ts
 * import { parseReply } from "@x/portpicker";
 *
 * parseReply("OK 15000 15001", 2); // { ok: true, ports: [15000, 15001] }
 * ```
 */
export function parseReply(
  line: string,
  count: number,
  address = "the port server",
): PortsReply {
  if (line.startsWith("ERR ")) return { ok: false, error: line.slice(4) };
  const words = line.split(" ");
  const ports = words.slice(1).map((w) => /^\d{1,5}$/.test(w) ? Number(w) : 0);
  if (
    words[0] !== "OK" || ports.length !== count ||
    ports.some((p) => p < 1 || p > 65535) || new Set(ports).size !== count
  ) {
    throw new Error(
      `Bad reply from the port server at ${address}: ${
        JSON.stringify(line.slice(0, 60))
      } (expected OK and ${count} distinct ports)`,
    );
  }
  return { ok: true, ports };
}

/**
 * The port in a classic reply, or undefined for none: empty, `0`, or not a
 * port (a Python client would fail on it too).
 *
 * @param line The reply, without its newline.
 * @returns The port, 1 to 65535, or undefined.
 *
 * @example
 * ```ts
 * import { parseClassicReply } from "@x/portpicker";
 *
 * parseClassicReply("15000"); // 15000
 * ```
 */
export function parseClassicReply(line: string): number | undefined {
  if (!/^\d{1,5}$/.test(line)) return undefined;
  const port = Number(line);
  return port >= 1 && port <= 65535 ? port : undefined;
}

/**
 * Reads a STATUS reply, checking every field.
 *
 * @param line The reply, without its newline.
 * @param address The server, named in the error.
 * @returns The status.
 * @throws {Error} When it is not a status as {@linkcode PortServerStatus} says.
 *
 * @example
 * ```ts
 * import { parseStatus } from "@x/portpicker";
 *
 * parseStatus('{"address":"@x","pool":1,"allocated":0,"reclaimable":0,"allocations":[]}');
 * ```
 */
export function parseStatus(
  line: string,
  address = "the port server",
): PortServerStatus {
  const bad = (why: string) =>
    new Error(`Bad status from the port server at ${address}: ${why}`);
  let data: PortServerStatus;
  try {
    data = JSON.parse(line);
  } catch {
    throw bad("not JSON");
  }
  const count = (n: unknown) => Number.isSafeInteger(n) && (n as number) >= 0;
  if (
    typeof data?.address !== "string" || !count(data.pool) ||
    !count(data.allocated) || !count(data.reclaimable) ||
    !Array.isArray(data.allocations)
  ) {
    throw bad("missing or invalid address, pool, allocated or allocations");
  }
  for (const a of data.allocations) {
    if (
      !(a?.port >= 1 && a.port <= 65535 && Number.isInteger(a.port)) ||
      !(a.pid === null || count(a.pid)) || typeof a.lease !== "boolean" ||
      typeof a.alive !== "boolean" || typeof a.since !== "string" ||
      !(a.label === null || typeof a.label === "string")
    ) {
      throw bad(`invalid allocation ${JSON.stringify(a).slice(0, 80)}`);
    }
  }
  return data;
}

// ===========================================================================
// 3. The runtime adapter: every difference between Deno, Bun and Node lives
// here, behind typed functions. Deno's own sockets and files where it has
// them (its node: modules cost start-up time and are several times slower),
// Bun's own sockets on Bun, node: modules on Node; and for the short-lived
// binds of a check, on Linux, the C library by FFI (Bun; Deno with
// --allow-ffi), which costs half as much as any runtime's sockets.

/** What this file uses of Bun's own socket API. */
interface BunApi {
  listen(options: {
    hostname: string;
    port: number;
    reusePort: boolean;
    socket: { data(): void };
  }): { port: number; unref(): void; stop(closeActive: boolean): void };
  udpSocket(options: { hostname: string; port: number }): Promise<{
    port: number;
    unref(): void;
    close(): void;
  }>;
}

/** What this file uses of Node's `process` (Bun has it too). */
interface NodeProcess {
  pid: number;
  platform: string;
  env: Record<string, string | undefined>;
  kill(pid: number, signal: number): void;
  on(event: "exit", listener: () => void): void;
  getBuiltinModule(name: "node:fs"): typeof import("node:fs");
}

// deno-lint-ignore no-explicit-any
const host = globalThis as any;
const deno: typeof Deno | undefined = host.Deno;
const bun: BunApi | undefined = deno ? undefined : host.Bun;
const node: NodeProcess | undefined = deno ? undefined : host.process;
const OS: string = deno ? deno.build.os : node!.platform;
const IS_LINUX = OS === "linux";
const IS_WINDOWS = OS === "windows" || OS === "win32";
const MAX_PID = 0x7fffffff;
const decoder = new TextDecoder();
const encoder = new TextEncoder();

type Proto = "tcp" | "udp";

/** A bound socket, TCP (listening) or UDP. */
interface BoundSocket {
  readonly port: number;
  close(): Promise<void>;
}

/** An error as the runtimes throw them: a code, a name, a message. */
interface ErrorWithCode {
  code?: unknown;
  name?: unknown;
  message?: unknown;
}

let netModule: Promise<typeof import("node:net")> | undefined;
let dgramModule: Promise<typeof import("node:dgram")> | undefined;
// Loaded on first use: importing them costs start-up time.
const loadNet = () => netModule ??= import("node:net");
const loadDgram = () => dgramModule ??= import("node:dgram");
const fs = () => node!.getBuiltinModule("node:fs");

const CLOSED: Promise<void> = Promise.resolve();

/**
 * Binds a socket (TCP listening, or UDP). With `reusePort`, SO_REUSEPORT is
 * set where the runtime can: on TCP everywhere (Deno needs --unstable-net),
 * on UDP on Node only; elsewhere the UDP socket is bound plainly.
 */
async function bindSocket(
  proto: Proto,
  hostname: string,
  port: number,
  reusePort = false,
): Promise<BoundSocket> {
  if (proto === "tcp" && bun) {
    const listener = bun.listen({
      hostname,
      port,
      reusePort,
      socket: { data() {} },
    });
    // A held port must not keep the caller's process alive.
    listener.unref();
    return { port: listener.port, close: () => (listener.stop(true), CLOSED) };
  }
  if (proto === "udp" && bun) {
    const socket = await bun.udpSocket({ hostname, port });
    socket.unref();
    return { port: socket.port, close: () => (socket.close(), CLOSED) };
  }
  if (proto === "tcp" && deno) {
    // Without --unstable-net, Deno ends the process on reusePort instead of
    // throwing; listenDatagram exists exactly when the flag is given.
    if (reusePort && typeof deno.listenDatagram !== "function") {
      throw new Error("reusePort is unstable: Deno needs --unstable-net");
    }
    const listener = deno.listen(
      reusePort
        ? { hostname, port, transport: "tcp", reusePort }
        : { hostname, port, transport: "tcp" },
    );
    return {
      // Asking the socket costs a system call: only for the kernel's choice.
      port: port || (listener.addr as Deno.NetAddr).port,
      close: () => (listener.close(), CLOSED),
    };
  }
  // Deno.listenDatagram exists only with --unstable-net.
  if (proto === "udp" && deno && typeof deno.listenDatagram === "function") {
    const conn = deno.listenDatagram({ hostname, port, transport: "udp" });
    return {
      port: port || (conn.addr as Deno.NetAddr).port,
      close: () => (conn.close(), CLOSED),
    };
  }
  if (deno) {
    // Deno's node:dgram reports a missing permission asynchronously, out of
    // reach of any catch: ask first.
    const where = `${hostname === "::" ? "[::]" : hostname}:${port}`;
    if (
      deno.permissions.querySync({ name: "net", host: where }).state !==
        "granted"
    ) {
      throw Object.assign(new Error(`Requires net access to "${where}"`), {
        name: "NotCapable",
      });
    }
  }
  if (proto === "tcp") {
    const net = await loadNet();
    return await new Promise((resolve, reject) => {
      const server = net.createServer();
      server.once("error", reject);
      const options = { host: hostname, port, backlog: 1, exclusive: true };
      server.listen(
        reusePort ? { ...options, reusePort } : options,
        () => {
          server.off("error", reject);
          server.unref();
          resolve({
            port: (server.address() as { port: number }).port,
            close: () => new Promise((done) => server.close(() => done())),
          });
        },
      );
    });
  }
  const dgram = await loadDgram();
  return await new Promise((resolve, reject) => {
    const socket = dgram.createSocket({
      type: hostname.includes(":") ? "udp6" : "udp4",
      reuseAddr: false,
      reusePort,
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

/**
 * Binds through the C library, by the runtime's FFI (Bun, and Deno with
 * --allow-ffi), on Linux on x64 and arm64 with glibc. The same binds as
 * `bindSocket` on `::`, dual-stack (TCP with SO_REUSEADDR and listening,
 * UDP plain), and closed at once, but synchronous and without the event
 * loop: each of the runtime's own sockets is also registered with the event
 * loop and unregistered, and awaited. A check costs about half as much.
 */
interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  setsockopt(
    fd: number,
    level: number,
    name: number,
    value: Int32Array,
    length: number,
  ): number;
  bind(fd: number, address: Uint8Array, length: number): number;
  listen(fd: number, backlog: number): number;
  getsockname(fd: number, address: Uint8Array, length: Int32Array): number;
  close(fd: number): number;
  /** The calling thread's errno, read after a failed call. */
  errno(): number;
}

/** Linux's values on x64 and arm64 (some other architectures differ). */
const LINUX = {
  AF_INET6: 10,
  SOCK_STREAM: 1,
  SOCK_DGRAM: 2,
  SOCK_CLOEXEC: 0o2000000,
  SOL_SOCKET: 1,
  SO_REUSEADDR: 2,
  IPPROTO_IPV6: 41,
  IPV6_V6ONLY: 26,
  EPERM: 1,
  EACCES: 13,
  EADDRINUSE: 98,
} as const;

/** The C library's functions, or null where they cannot be had; opened on first use. */
let libc: Libc | null | undefined;

function openLibc(): Libc | null {
  const arch = deno ? deno.build.arch : host.process?.arch;
  if (!IS_LINUX || !["x86_64", "x64", "aarch64", "arm64"].includes(arch)) {
    return null;
  }
  const signatures: Record<string, [string[], string]> = {
    socket: [["i32", "i32", "i32"], "i32"],
    setsockopt: [["i32", "i32", "i32", "buffer", "i32"], "i32"],
    bind: [["i32", "buffer", "i32"], "i32"],
    listen: [["i32", "i32"], "i32"],
    getsockname: [["i32", "buffer", "buffer"], "i32"],
    close: [["i32"], "i32"],
    __errno_location: [[], "pointer"],
  };
  // Never a permission prompt: only when already granted.
  const allowed = deno
    ? typeof deno.dlopen === "function" &&
      deno.permissions.querySync({ name: "ffi" }).state === "granted"
    : bun !== undefined;
  // PORTPICKER_NO_FFI: the way out, should a runtime's FFI ever misbehave.
  if (!allowed || readEnv("PORTPICKER_NO_FFI")) return null;
  try {
    if (deno) {
      const symbols = Object.fromEntries(
        Object.entries(signatures).map(([name, [parameters, result]]) => [
          name,
          { parameters, result },
        ]),
      );
      // deno-lint-ignore no-explicit-any
      const lib = deno.dlopen("libc.so.6", symbols as any).symbols as any;
      // errno is per thread, and this module lives on one thread.
      const errno = new deno.UnsafePointerView(lib.__errno_location());
      return Object.assign(lib, { errno: () => errno.getInt32() });
    }
    if (bun) {
      // deno-lint-ignore no-explicit-any
      const ffi = (import.meta as any).require("bun:ffi");
      const type = (t: string) =>
        t === "buffer" ? "ptr" : t === "pointer" ? "ptr" : t;
      const symbols = Object.fromEntries(
        Object.entries(signatures).map(([name, [args, returns]]) => [name, {
          args: args.map(type),
          returns: type(returns),
        }]),
      );
      const lib = ffi.dlopen("libc.so.6", symbols).symbols;
      const where = lib.__errno_location();
      return Object.assign(lib, { errno: () => ffi.read.i32(where, 0) });
    }
  } catch {
    // No glibc (musl, say), or no FFI: the runtime's own sockets do.
  }
  return null;
}

/** sockaddr_in6 for [::], its port set per call; the rest, allocated once. */
const socketAddress = new Uint8Array(28);
const socketAddressView = new DataView(socketAddress.buffer);
socketAddressView.setUint16(0, LINUX.AF_INET6, true);
const addressLength = new Int32Array(1);
const ONE = new Int32Array([1]);
const ZERO = new Int32Array([0]);

/**
 * Binds `port` (0: the kernel's choice) on `proto` through the C library,
 * dual-stack, and closes it again. Returns the port; undefined when it is
 * taken (EADDRINUSE, EACCES, EPERM: what `classify` calls taken); null when
 * the C library is not there or fails otherwise, for the runtime's own
 * sockets to do it and name the error.
 */
function bindNow(proto: Proto, port: number): number | undefined | null {
  const c = libc === undefined ? (libc = openLibc()) : libc;
  if (!c) return null;
  const tcp = proto === "tcp";
  const fd = c.socket(
    LINUX.AF_INET6,
    (tcp ? LINUX.SOCK_STREAM : LINUX.SOCK_DGRAM) | LINUX.SOCK_CLOEXEC,
    0,
  );
  if (fd < 0) return null;
  try {
    socketAddressView.setUint16(2, port, false);
    addressLength[0] = 28;
    const dual =
      c.setsockopt(fd, LINUX.IPPROTO_IPV6, LINUX.IPV6_V6ONLY, ZERO, 4) === 0;
    // A TCP port that nothing at all is bound to binds without SO_REUSEADDR,
    // and then a listen cannot fail: that stronger bind saves two calls and
    // a listening socket. Only when it fails (a connection in TIME_WAIT,
    // say) does the same socket go on to the binds of `bindSocket`.
    if (dual && tcp && port !== 0 && c.bind(fd, socketAddress, 28) === 0) {
      return port;
    }
    const bound = dual &&
      (!tcp ||
        c.setsockopt(fd, LINUX.SOL_SOCKET, LINUX.SO_REUSEADDR, ONE, 4) ===
          0) &&
      c.bind(fd, socketAddress, 28) === 0 &&
      (!tcp || c.listen(fd, 1) === 0) &&
      (port !== 0 || c.getsockname(fd, socketAddress, addressLength) === 0);
    if (bound) return port || socketAddressView.getUint16(2, false);
    const errno = c.errno();
    return errno === LINUX.EADDRINUSE || errno === LINUX.EACCES ||
        errno === LINUX.EPERM
      ? undefined
      : null;
  } finally {
    c.close(fd);
  }
}

/** A Unix stream connection, the same on every runtime. */
interface UnixConnection {
  /** Sends all of `text`. */
  write(text: string): Promise<void>;
  /** Closes the sending side: the server sees the end of the request. */
  closeWrite(): Promise<void>;
  /** The next chunk, or null at the end. */
  read(): Promise<Uint8Array | null>;
  close(): void;
  /** Lets the process exit while the connection stays open. */
  unref(): void;
}

/** `@name` is the Linux abstract namespace; on Windows, a named pipe. */
function unixPath(address: string): string {
  if (!address.startsWith("@")) return address;
  return IS_WINDOWS
    ? `\\\\.\\pipe\\${address.slice(1)}`
    : `\0${address.slice(1)}`;
}

async function connectUnix(address: string): Promise<UnixConnection> {
  const path = unixPath(address);
  if (deno && !IS_WINDOWS) {
    const conn = await deno.connect({ transport: "unix", path });
    const buffer = new Uint8Array(16384);
    let closed = false;
    return {
      write: async (text) => {
        const bytes = encoder.encode(text);
        for (let n = 0; n < bytes.length;) {
          n += await conn.write(bytes.subarray(n));
        }
      },
      closeWrite: () => conn.closeWrite(),
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
  const done =
    (resolve: () => void, reject: (e: Error) => void) =>
    (error?: Error | null) => error ? reject(error) : resolve();
  return {
    write: (text) =>
      new Promise((resolve, reject) =>
        socket.write(text, done(resolve, reject))
      ),
    closeWrite: () => new Promise((resolve) => socket.end(resolve)),
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

/** Connects over TCP and closes at once: whether something accepts there. */
async function connectTcp(hostname: string, port: number): Promise<void> {
  if (deno) {
    (await deno.connect({ hostname, port, transport: "tcp" })).close();
    return;
  }
  const net = await loadNet();
  await new Promise<void>((resolve, reject) => {
    const socket = net.connect({ host: hostname, port });
    socket.once("connect", () => {
      socket.destroy();
      resolve();
    });
    socket.once("error", (error) => {
      socket.destroy();
      reject(error);
    });
  });
}

function ownPid(): number {
  return deno ? deno.pid : node!.pid;
}

/** Whether a process with this pid exists (where /proc is not there to say). */
function processExists(pid: number): boolean {
  try {
    // Deno has Node's process too; its own Deno.kill takes no signal 0.
    (node ?? host.process as NodeProcess).kill(pid, 0);
    return true;
  } catch (error) {
    return errorCode(error) === "EPERM";
  }
}

let envWarned = false;
const envAccess: Record<string, Deno.PermissionState> = {};

/**
 * Reads an environment variable; on Deno without `--allow-env` for it, says
 * so once on stderr and treats it as unset (no prompt, no crash).
 */
function readEnv(name: string): string | undefined {
  if (!deno) return node!.env[name];
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

/** Whether this process may read `path` (Deno's permissions; true elsewhere). */
function mayRead(path: string): boolean {
  return !deno ||
    deno.permissions.querySync({ name: "read", path }).state === "granted";
}

function errorCode(error: unknown): string | undefined {
  return (error as { code?: string } | undefined)?.code;
}

/** A file's text, or undefined when it does not exist. */
function readTextOrUndefined(path: string): string | undefined {
  try {
    return deno ? deno.readTextFileSync(path) : fs().readFileSync(path, "utf8");
  } catch (error) {
    const code = errorCode(error);
    if (code === "ENOENT" || code === "ESRCH") return undefined;
    throw error;
  }
}

const statBuffer = new Uint8Array(1024);

/**
 * `/proc/<pid>/stat`, or undefined when no such process: read into one
 * buffer on Deno (three system calls, where reading a text file takes six).
 */
function readProcStat(pid: number): string | undefined {
  const path = `/proc/${pid}/stat`;
  if (!deno) return readTextOrUndefined(path);
  let file: Deno.FsFile;
  try {
    file = deno.openSync(path);
  } catch (error) {
    if (errorCode(error) === "ENOENT") return undefined;
    throw error;
  }
  try {
    const n = file.readSync(statBuffer);
    return n === null ? "" : decoder.decode(statBuffer.subarray(0, n));
  } catch (error) {
    // The process ended between the open and the read.
    if (errorCode(error) === "ESRCH") return undefined;
    throw error;
  } finally {
    file.close();
  }
}

/** The file operations of lock-directory claims, synchronous. */
const files = {
  /** Makes a file that must not exist yet, with all its text at once. */
  create(path: string, text: string): void {
    if (deno) deno.writeTextFileSync(path, text, { createNew: true });
    else fs().writeFileSync(path, text, { flag: "wx" });
  },
  link(from: string, to: string): void {
    if (deno) deno.linkSync(from, to);
    else fs().linkSync(from, to);
  },
  rename(from: string, to: string): void {
    if (deno) deno.renameSync(from, to);
    else fs().renameSync(from, to);
  },
  mkdir(path: string, recursive = false): void {
    if (deno) deno.mkdirSync(path, { recursive });
    else fs().mkdirSync(path, { recursive });
  },
  /** Removes a file or a directory tree; nothing there is fine. */
  remove(path: string): void {
    try {
      if (deno) deno.removeSync(path, { recursive: true });
      else fs().rmSync(path, { recursive: true, force: true });
    } catch (error) {
      if (errorCode(error) !== "ENOENT") throw error;
    }
  },
  /** Milliseconds since the file last changed. */
  age(path: string): number {
    const mtime = deno
      ? deno.statSync(path).mtime?.getTime() ?? 0
      : fs().statSync(path).mtimeMs;
    return Date.now() - mtime;
  },
};

/** Runs `fn` when the process exits normally. */
function atExit(fn: () => void): void {
  if (deno) host.addEventListener("unload", fn);
  else node!.on("exit", fn);
}

// ===========================================================================
// 4. Port checks.

/** Errors that say the host lacks this address family: skip the family. */
const FAMILY_MISSING = new Set([
  "EAFNOSUPPORT",
  "EADDRNOTAVAIL",
  "EPROTONOSUPPORT",
  "AddrNotAvailable",
]);
/** Errors that say the port is taken, or not ours to take. */
const PORT_TAKEN = new Set(["EADDRINUSE", "EACCES", "EPERM", "AddrInUse"]);

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
const DUAL = ["::"] as const;

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
    v6 = await bindSocket(proto, "::", 0);
  } catch {
    return false;
  }
  try {
    await (await bindSocket(proto, "0.0.0.0", v6.port)).close();
    return false;
  } catch (error) {
    return classify(error) === "taken";
  } finally {
    await v6.close();
  }
}

/**
 * Binds `port` on each family the host has, one at a time, and closes it
 * again. Port 0 takes the kernel's choice on IPv6 and then tries that port
 * on IPv4. Returns the port, or undefined when it is taken on any family or
 * the host has none: at once where the C library can tell, else a promise.
 */
function bindEachFamily(
  proto: Proto,
  port: number,
): number | undefined | Promise<number | undefined> {
  const now = bindNow(proto, port);
  return now !== null ? now : bindWithSockets(proto, port);
}

/** {@linkcode bindEachFamily} through the runtime's own sockets. */
async function bindWithSockets(
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
      socket = await bindSocket(proto, hostname, port);
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

/** Whether `port` is free, if the C library can tell at once; else undefined. */
function freeNow(port: number): boolean | undefined {
  const tcp = bindNow("tcp", port);
  if (tcp === null) return undefined;
  if (tcp === undefined) return false;
  const udp = bindNow("udp", port);
  return udp === null ? undefined : udp !== undefined;
}

async function isFree(port: number): Promise<boolean> {
  return freeNow(port) ??
    ((await bindWithSockets("tcp", port)) !== undefined &&
      (await bindWithSockets("udp", port)) !== undefined);
}

/**
 * Binds `port` on TCP and UDP on the wildcard address and keeps both bound:
 * IPv6 (dual-stack, so IPv4 too) where the host has it, else IPv4. With
 * `reusePort`, the TCP socket (and the UDP one on Node) sets SO_REUSEPORT,
 * and a second such bind proves that the caller's server can share it.
 */
async function holdPort(
  port: number,
  reusePort = false,
): Promise<BoundSocket[] | undefined> {
  const held: BoundSocket[] = [];
  for (const proto of ["tcp", "udp"] as const) {
    for (const hostname of WILDCARDS) {
      try {
        held.push(await bindSocket(proto, hostname, port, reusePort));
      } catch (error) {
        const kind = classify(error);
        if (kind === "family") continue;
        await Promise.all(held.map((s) => s.close()));
        if (kind === "taken") return undefined;
        if (reusePort && /unstable/i.test(String((error as Error).message))) {
          throw reusePortError(port, error);
        }
        throw bindError(error, proto, hostname, port);
      }
      if (reusePort && proto === "tcp") {
        try {
          await (await bindSocket(proto, hostname, port, true)).close();
        } catch (error) {
          await Promise.all(held.map((s) => s.close()));
          throw reusePortError(port, error);
        }
      }
      break;
    }
  }
  return held;
}

function reusePortError(port: number, error: unknown): Error {
  const { message } = (error ?? {}) as ErrorWithCode;
  const why = /unstable/i.test(String(message))
    ? "Deno needs --unstable-net for it"
    : `this runtime or OS cannot share a port (SO_REUSEPORT): ${message}`;
  return new Error(`Cannot reserve port ${port} with reusePort: ${why}`, {
    cause: error,
  });
}

/**
 * Waits until something accepts TCP connections on `port` at one of
 * `hostnames`, polling with a back-off (10 ms, growing to 250 ms).
 */
async function waitUntilAccepting(
  port: number,
  hostnames: readonly string[],
  timeout: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  const deadline = Date.now() + timeout;
  let pause = 10;
  while (true) {
    signal?.throwIfAborted();
    try {
      await Promise.any(hostnames.map((h) => connectTcp(h, port)));
      return;
    } catch { /* nothing accepts yet */ }
    const left = deadline - Date.now();
    if (left <= 0) {
      throw new Error(
        `Port ${port} did not accept connections on ${
          hostnames.join(" or ")
        } within ${timeout} ms`,
      );
    }
    await new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", aborted);
      };
      const aborted = () => {
        done();
        reject(signal!.reason);
      };
      const timer = setTimeout(() => {
        done();
        resolve();
      }, Math.min(pause, left));
      signal?.addEventListener("abort", aborted, { once: true });
    });
    pause = Math.min(pause * 1.5, 250);
  }
}

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
  if (pid < 1 || pid > MAX_PID) {
    throw new RangeError(`Invalid pid ${pid}: expected a positive integer`);
  }
  return pid;
}

function checkCount(count: unknown, max = Infinity): number {
  if (typeof count !== "number" || !Number.isInteger(count)) {
    throw new TypeError(
      `Invalid count ${formatValue(count)}: expected an integer`,
    );
  }
  if (count < 1 || count > max) {
    throw new RangeError(
      `Invalid count ${count}: expected ${
        max === Infinity ? "at least 1" : `1 to ${max}`
      }`,
    );
  }
  return count;
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

function checkLabel(label: unknown): string {
  if (!isLabel(label)) {
    throw new TypeError(
      `Invalid label ${
        formatValue(label)
      }: expected 1 to 100 printable characters without spaces`,
    );
  }
  return label;
}

function checkLockDir(dir: unknown): string {
  if (typeof dir !== "string" || dir === "") {
    throw new TypeError(
      `Invalid lockDir ${formatValue(dir)}: expected a directory path`,
    );
  }
  return dir;
}

/** A port, or any iterable of ports (not a string), as a list. */
function portList(value: unknown, what: string, single: boolean): number[] {
  if (value === undefined) return [];
  if (single && typeof value === "number") return [checkPort(value, what)];
  const iterable = typeof value === "object" && value !== null &&
    typeof (value as Iterable<unknown>)[Symbol.iterator] === "function";
  if (!iterable) {
    throw new TypeError(
      `Invalid ${what}s ${formatValue(value)}: expected ${
        single ? "a port or " : ""
      }an iterable of ports`,
    );
  }
  return [...(value as Iterable<unknown>)].map((p) => checkPort(p, what));
}

function formatValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(formatValue).join(", ")}]`;
  if (typeof value === "object" && value !== null) {
    return value.constructor?.name ?? "object";
  }
  return String(value);
}

// ===========================================================================
// 5. Per-process state, as in the Python original, and the picker.

/** Reserved or returned ports: handed out first, without a check. */
const freePorts = new Set<number>();
/** Ports that came from the port server or from the free set. */
const ownedPorts = new Set<number>();
/** Ports this process found itself and has not returned. */
const randomPorts = new Set<number>();
/** Ports from a port server: who asked for them, and where. */
const serverPorts = new Map<number, { address: string; pid: number }>();
/** Per server address: whether it speaks the extended protocol. */
const extendedServers = new Map<string, boolean>();

/** Whether this process was given `port` and has not returned it. */
function given(port: number): boolean {
  return randomPorts.has(port) || ownedPorts.has(port);
}

/** A port picked by this call, maybe held bound until `release()`. */
interface Held {
  port: number;
  release(): Promise<void>;
}

/** The options of one call, checked. */
interface Plan {
  pid: number | undefined;
  serverAddress: string | undefined;
  preferred: number[];
  range: readonly [number, number];
  rangeGiven: boolean;
  exclude: Set<number>;
  lockDir: string | undefined;
  label: string | undefined;
  reusePort: boolean;
}

function plan(options: ReserveOptions | undefined): Plan {
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
  return {
    pid: opts.pid === undefined ? undefined : checkPid(opts.pid),
    serverAddress: address || readEnv("PORTSERVER_ADDRESS") || undefined,
    preferred: portList(opts.ports, "port", true),
    range: opts.range === undefined ? DEFAULT_RANGE : checkRange(opts.range),
    rangeGiven: opts.range !== undefined,
    exclude: new Set(portList(opts.exclude, "excluded port", false)),
    lockDir: opts.lockDir !== undefined
      ? checkLockDir(opts.lockDir)
      : readEnv("PORTPICKER_LOCK_DIR") || undefined,
    label: opts.label === undefined ? undefined : checkLabel(opts.label),
    reusePort: checkBoolean(opts.reusePort, "reusePort"),
  };
}

function checkBoolean(value: unknown, what: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== "boolean") {
    throw new TypeError(
      `Invalid ${what} ${formatValue(value)}: expected true or false`,
    );
  }
  return value;
}

function allowed(port: number, p: Plan, taken: Set<number>): boolean {
  if (p.exclude.has(port) || taken.has(port)) return false;
  if (reservedPorts().has(port)) return false;
  return !p.rangeGiven || (port >= p.range[0] && port <= p.range[1]);
}

const NOTHING_HELD: Held["release"] = () => CLOSED;

/** What releases the sockets that hold a port. */
function closing(sockets: BoundSocket[]): Held["release"] {
  return async () => void await Promise.all(sockets.map((s) => s.close()));
}

/** Holds a port that was checked elsewhere; if it cannot, hands it out unheld. */
async function tryHold(port: number, hold: boolean, p?: Plan): Promise<Held> {
  const sockets = hold ? await holdPort(port, p?.reusePort) : undefined;
  return { port, release: sockets ? closing(sockets) : NOTHING_HELD };
}

/**
 * Checks that `port` is free and, when `hold`, keeps it bound. Undefined if
 * it is not free.
 */
async function check(
  port: number,
  hold: boolean,
  p?: Plan,
): Promise<Held | undefined> {
  if (!(await isFree(port))) return undefined;
  if (!hold) return { port, release: NOTHING_HELD };
  const sockets = await holdPort(port, p?.reusePort);
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
  if (p.lockDir !== undefined && !claimPort(p.lockDir, held.port, p.pid)) {
    await held.release();
    return undefined;
  }
  randomPorts.add(held.port);
  return held;
}

/** Gives back a port of a call that failed. */
function giveBack(port: number, p: Plan): void {
  returnPort(port, p.lockDir ? { lockDir: p.lockDir, pid: p.pid } : {});
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
    if (!allowed(port, p, taken) || given(port)) continue;
    if (freePorts.delete(port)) {
      ownedPorts.add(port);
      return await tryHold(port, hold, p);
    }
    const held = await take(await check(port, hold, p), p);
    if (held) return held;
  }

  for (const port of freePorts) {
    if (!allowed(port, p, taken)) continue;
    freePorts.delete(port);
    ownedPorts.add(port);
    return await tryHold(port, hold, p);
  }

  if (p.serverAddress) {
    const [port] = await fromServer(p, 1, taken);
    if (port !== undefined) return await tryHold(port, hold, p);
  }

  if (!p.rangeGiven) {
    // The kernel's choice: on Linux, UDP's port 0 is random while TCP's often
    // repeats the port just closed (which this process was just given), so
    // UDP first; every other try TCP first, for kernels where UDP repeats.
    for (let i = 0; i < 10; i++) {
      const [first, second] = i % 2 === 0 ? UDP_FIRST : TCP_FIRST;
      // Awaited only when it is a promise: most picks need no turn at all.
      let port = bindEachFamily(first, 0);
      if (port instanceof Promise) port = await port;
      if (port === undefined) continue;
      if (!allowed(port, p, taken) || given(port)) continue;
      let again = bindEachFamily(second, port);
      if (again instanceof Promise) again = await again;
      if (again === undefined) continue;
      const held = await take(
        hold ? await check(port, true, p) : { port, release: NOTHING_HELD },
        p,
      );
      if (held) return held;
    }
  }

  // Every port of the range, in random order, before giving up.
  const [first, last] = p.range;
  const candidates: number[] = [];
  for (let port = first; port <= last; port++) {
    if (allowed(port, p, taken) && !given(port)) candidates.push(port);
  }
  let tried = 0;
  while (candidates.length > 0) {
    const i = Math.floor(Math.random() * candidates.length);
    const port = candidates[i];
    candidates[i] = candidates[candidates.length - 1];
    candidates.pop();
    tried++;
    const held = await take(await check(port, hold, p), p);
    if (held) return held;
  }
  throw new NoFreePortFoundError(p.range, tried);
}

/**
 * Several ports in one request to the port server, when nothing comes before
 * the server in the order of {@linkcode pickOne}.
 */
async function bulkFromServer(p: Plan, count: number): Promise<number[]> {
  if (count < 2 || p.preferred.length > 0 || !p.serverAddress) return [];
  for (const port of freePorts) if (allowed(port, p, new Set())) return [];
  return await fromServer(p, Math.min(count, PROTOCOL_LIMITS.ports), new Set());
}

/**
 * Ports from the plan's server, all usable or none: ports that are excluded
 * or outside the range go back to the server, with a line on stderr.
 */
async function fromServer(
  p: Plan,
  count: number,
  taken: Set<number>,
): Promise<number[]> {
  const address = p.serverAddress!;
  const pid = p.pid ?? ownPid();
  const ports = await takeFromServer(address, pid, count, p.label);
  // No port, a bad reply or no server: as if no server had answered, and
  // not asked again in this call (one line on stderr, not one a port).
  if (ports.length === 0) p.serverAddress = undefined;
  const unusable = ports.filter((port) => !allowed(port, p, taken));
  if (unusable.length === 0) return ports;
  console.error(
    `portpicker: ports ${
      unusable.join(", ")
    } from the port server are excluded or outside the range; picking locally`,
  );
  p.serverAddress = undefined;
  for (const port of ports) {
    ownedPorts.delete(port);
    serverPorts.delete(port);
  }
  if (extendedServers.get(address)) {
    await returnPortsToServer(address, ports, { pid }).catch(() => {});
  }
  return [];
}

// ===========================================================================
// 6. Lock-directory claims: a file `<dir>/<port>.claim` holding the owner's
// pid and start time, made exclusively. A claim whose owner died, or whose
// pid now names another process, is stale and taken over.

/** Claims this process made for itself: port → claim file. */
const claims = new Map<number, string>();
let exitHookInstalled = false;
/** A takeover lock older than this was left by a process that died in it. */
const TAKEOVER_TIMEOUT_MS = 10_000;
/** An unreadable claim younger than this may be a claim being written. */
const GARBAGE_GRACE_MS = 10_000;

function claimPath(dir: string, port: number): string {
  return `${dir}/${port}.claim`;
}

/** The text of a claim for `pid`: its pid and start time. */
function claimText(pid: number): string {
  return `${pid} ${processStartTime(pid)}\n`;
}

/** Whether a claim is stale: its owner is gone, or it is old garbage. */
function stale(path: string, text: string): boolean {
  const match = /^(\d+) (\d+)\n$/.exec(text);
  if (match) return processStartTime(Number(match[1])) !== Number(match[2]);
  try {
    return files.age(path) > GARBAGE_GRACE_MS;
  } catch {
    return false;
  }
}

/**
 * Claims `port` in `dir` for `pid` (default this process): a file made with
 * all its content at once (written aside, then hard-linked into place, which
 * fails if the file exists). A stale claim is taken over under a per-port
 * lock, by renaming over it, so that a live claim is never lost.
 */
function claimPort(dir: string, port: number, pid = ownPid()): boolean {
  const path = claimPath(dir, port);
  const mine = claimText(pid);
  const draft = `${dir}/.draft-${ownPid()}-${port}-${
    Math.random().toString(36).slice(2)
  }`;
  try {
    files.create(draft, mine);
  } catch (error) {
    if (errorCode(error) !== "ENOENT") throw error;
    files.mkdir(dir, true);
    files.create(draft, mine);
  }
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        files.link(draft, path);
        return claimed(port, path, pid);
      } catch (error) {
        if (errorCode(error) !== "EEXIST") throw error;
      }
      const seen = readTextOrUndefined(path);
      if (seen === undefined) continue;
      if (!stale(path, seen)) return false;
      const lock = `${path}.takeover`;
      if (!lockTakeover(lock)) return false;
      try {
        // A second look under the lock: released or renewed meanwhile?
        const again = readTextOrUndefined(path);
        if (again === undefined) continue;
        if (!stale(path, again)) return false;
        files.rename(draft, path);
        return claimed(port, path, pid);
      } finally {
        files.remove(lock);
      }
    }
    return false;
  } finally {
    files.remove(draft);
  }
}

/** Records a claim; one for this process is removed at its exit. */
function claimed(port: number, path: string, pid: number): true {
  if (pid !== ownPid()) return true;
  claims.set(port, path);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    atExit(releaseAllClaims);
  }
  return true;
}

/** Takes the takeover lock of a claim; false while another process has it. */
function lockTakeover(lock: string): boolean {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      files.mkdir(lock);
      return true;
    } catch (error) {
      if (errorCode(error) !== "EEXIST") throw error;
    }
    try {
      if (files.age(lock) < TAKEOVER_TIMEOUT_MS) return false;
      files.remove(lock);
    } catch { /* gone meanwhile: try again */ }
  }
  return false;
}

/** Removes this process's own claim on `port`, if it has one. */
function releaseClaim(port: number): void {
  const path = claims.get(port);
  if (path === undefined) return;
  claims.delete(port);
  removeClaimOf(path.slice(0, path.lastIndexOf("/")), port, ownPid());
}

/** Removes the claim on `port` in `dir` if it names `pid`. */
function removeClaimOf(dir: string, port: number, pid: number): void {
  const path = claimPath(dir, port);
  try {
    const text = readTextOrUndefined(path);
    if (text?.startsWith(`${pid} `)) files.remove(path);
  } catch { /* not ours to remove */ }
}

function releaseAllClaims(): void {
  for (const port of [...claims.keys()]) releaseClaim(port);
}

// ===========================================================================
// 7. The port-server client.

const SERVER_TIMEOUT_MS = 10_000;

/** The server to use: the one given, else `PORTSERVER_ADDRESS`. */
function serverAddress(address: string | undefined): string {
  if (address !== undefined && typeof address !== "string") {
    throw new TypeError(
      `Invalid port server address ${formatValue(address)}: expected a string`,
    );
  }
  const where = address || readEnv("PORTSERVER_ADDRESS");
  if (!where) {
    throw new Error(
      "No port server: pass an address or set PORTSERVER_ADDRESS",
    );
  }
  return where;
}

/**
 * Reads one line of at most `limit` bytes. Undefined when the server closed
 * without writing anything (the Python server refusing).
 */
async function readLine(
  connection: UnixConnection,
  limit: number,
  address: string,
): Promise<string | undefined> {
  const reader = new LineReader(limit);
  while (true) {
    const chunk = await connection.read();
    if (chunk === null) break;
    let line: string | undefined;
    try {
      line = reader.push(chunk);
    } catch (error) {
      throw new Error(
        `Bad reply from the port server at ${address}: ${
          (error as Error).message
        }`,
      );
    }
    if (line !== undefined) return line;
  }
  if (reader.size === 0) return undefined;
  throw new Error(
    `Bad reply from the port server at ${address}: ${
      JSON.stringify(decoder.decode(reader.bytes()).slice(0, 60))
    } has no newline`,
  );
}

/**
 * Sends one request, half-closes, and reads the reply's line; undefined
 * when the server closed with nothing written. Connection errors and
 * malformed replies throw.
 */
async function request(
  address: string,
  text: string,
  limit: number,
): Promise<string | undefined> {
  const connection = await connectUnix(address);
  const timer = setTimeout(() => connection.close(), SERVER_TIMEOUT_MS);
  try {
    await connection.write(text);
    await connection.closeWrite();
    return await readLine(connection, limit, address);
  } finally {
    clearTimeout(timer);
    connection.close();
  }
}

/** Runs `talk`; a connection error names the server it could not reach. */
async function reach<T>(address: string, talk: () => Promise<T>): Promise<T> {
  try {
    return await talk();
  } catch (error) {
    if ((error as Error).message?.startsWith("Bad ")) throw error;
    const { message } = (error ?? {}) as ErrorWithCode;
    throw new Error(
      `Cannot reach the port server at ${address}: ${message ?? error}`,
      { cause: error },
    );
  }
}

function socketErrorLine(error: unknown): string {
  const { message } = ((error as Error)?.cause ?? error ?? {}) as ErrorWithCode;
  return (error as Error)?.message?.startsWith("Bad ")
    ? `${(error as Error).message}; picking without it`
    : `Socket error when connecting to portserver: ${message ?? error}`;
}

/**
 * Sends an extended request. Returns the reply line, or undefined when the
 * server closed without one (the Python server).
 */
async function extendedRequest(
  address: string,
  text: string,
  limit: number,
): Promise<string | undefined> {
  const line = await reach(address, () => request(address, text, limit));
  extendedServers.set(address, line !== undefined);
  return line;
}

/**
 * Takes `count` ports for `pid` in one request, with a label. On the Python
 * server, which closes without a reply, falls back to one classic request a
 * port (the label is then lost) and remembers to ask classically from then
 * on. A bad reply counts as no reply: one line on stderr, no port.
 */
async function takeFromServer(
  address: string,
  pid: number,
  count: number,
  label: string | undefined,
): Promise<number[]> {
  if (extendedServers.get(address) !== false) {
    let line: string | undefined;
    let reply: PortsReply;
    try {
      line = await extendedRequest(
        address,
        formatRequest({ verb: "TAKE", pid, count, label }),
        PROTOCOL_LIMITS.reply,
      );
      if (line === undefined) return await takeClassic(address, pid, count);
      reply = parseReply(line, count, address);
    } catch (error) {
      console.error(socketErrorLine(error));
      return [];
    }
    if (!reply.ok) {
      console.error("Portserver failed to find a port.");
      return [];
    }
    for (const port of reply.ports) {
      ownedPorts.add(port);
      serverPorts.set(port, { address, pid });
    }
    return reply.ports;
  }
  return await takeClassic(address, pid, count);
}

async function takeClassic(
  address: string,
  pid: number,
  count: number,
): Promise<number[]> {
  const ports: number[] = [];
  while (ports.length < count) {
    const port = await getPortFromPortServer(address, { pid });
    if (port === undefined) break;
    ports.push(port);
  }
  return ports;
}

/** Tells the server a port came back; on the Python server, keeps it locally. */
function returnToServer(port: number, address: string, pid: number): void {
  returnPortsToServer(address, [port], { pid }).catch(() => {
    // The Python server keeps the port for this process: reuse it here.
    if (extendedServers.get(address) === false) freePorts.add(port);
  });
}

function concat(chunks: Uint8Array[], size: number): Uint8Array {
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}
