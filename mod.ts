/**
 * Network ports that nobody else is using, for tests, CI farms and scripts.
 *
 * A TypeScript reimplementation of Google's Python `portpicker`, wire-compatible
 * with its `portserver`. Runs on Deno, Bun and Node.js 22 or later, with no
 * dependencies: this one file is the whole library, and can be vendored alone.
 *
 * The file reads top to bottom:
 * 1. the public API and its types;
 * 2. the wire protocol: the line framing shared with `portserver.ts`, and
 *    the client's half (requests out, replies in);
 * 3. the runtime adapter, the only code that touches `Deno`, `Bun` or
 *    `process`; what a pid is and when it is alive;
 * 4. how a port is checked: one bind per address family and protocol, with
 *    the runtime's own sockets;
 * 5. per-process state (which ports this process was given) and the picker;
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

/**
 * The version of this package.
 *
 * @example
 * ```ts
 * import { VERSION } from "@x/portpicker";
 *
 * console.log(`portpicker ${VERSION}`);
 * ```
 */
export const VERSION = "0.3.0";

/**
 * The search range when none is given: the Python original's 15000–24999.
 *
 * @example
 * ```ts
 * import { DEFAULT_RANGE, pickUnusedPort } from "@x/portpicker";
 *
 * const port = await pickUnusedPort({ range: DEFAULT_RANGE });
 * ```
 */
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
  /** How many ports of the range were tried (several asked for: found). */
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
    const [first, last] = range;
    super(
      wanted > 1
        ? `Not enough free ports in ${first}-${last}: asked for ${wanted}, found ${tried} of its ${
          last - first + 1
        } ports`
        : `No free port found in ${first}-${last}: tried ${tried} of ${
          last - first + 1
        } ports`,
    );
    this.name = "NoFreePortFoundError";
    this.range = range;
    this.tried = tried;
  }
}

/**
 * Options of {@linkcode pickUnusedPort} and the functions built on it.
 *
 * @example
 * ```ts
 * import { type PickOptions, pickUnusedPort } from "@x/portpicker";
 *
 * const options: PickOptions = { range: [20000, 20999], exclude: [20080], label: "web" };
 * const port = await pickUnusedPort(options);
 * ```
 */
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
   * returned lies in it. Without it, the kernel's own choice comes first
   * (anywhere outside Linux's reserved ports), then `[15000, 24999]`.
   */
  range?: readonly [number, number];
  /** Ports never returned: any iterable of ports. */
  exclude?: Iterable<number>;
  /**
   * A directory shared by processes that must never get the same port, with
   * no port server: each port picked here is claimed with a file in it, for
   * `pid`, until that process ends or returns the port. Defaults to the
   * `PORTPICKER_LOCK_DIR` environment variable, else to a directory of this
   * user's (`$XDG_RUNTIME_DIR/portpicker`, else `portpicker-<uid>` in the
   * temporary directory), so that one user's processes never share a port.
   * `false`, or an empty `PORTPICKER_LOCK_DIR`, makes no claims. On Deno the
   * default directory is used only with `-A` (Deno reads `/proc` only then).
   */
  lockDir?: string | false;
  /**
   * Stored with the allocation by this project's port server (shown by its
   * status request); ignored by the Python server. Printable ASCII, no
   * spaces, 1 to 100 characters.
   */
  label?: string;
}

/**
 * Options of {@linkcode returnPort}.
 *
 * @example
 * ```ts
 * import { returnPort } from "@x/portpicker";
 *
 * // A port that `portpicker --lock-dir /tmp/ports $$` claimed for this process:
 * returnPort(20000, { lockDir: "/tmp/ports" });
 * ```
 */
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
 *
 * @example
 * ```ts
 * import { reservePort } from "@x/portpicker";
 *
 * const reservation = await reservePort();
 * console.log(reservation.port);
 * await reservation.release();
 * ```
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

/**
 * Options of {@linkcode reservePort}.
 *
 * @example
 * ```ts
 * import { reservePort } from "@x/portpicker";
 *
 * await using held = await reservePort({ range: [20000, 20999], reusePort: true });
 * ```
 */
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

/**
 * Options of {@linkcode waitForPort}.
 *
 * @example
 * ```ts
 * import { waitForPort } from "@x/portpicker";
 *
 * await waitForPort(8080, { timeout: 5_000, hostname: "127.0.0.1" });
 * ```
 */
export interface WaitOptions {
  /** How long to wait, in milliseconds; default 30000. */
  timeout?: number;
  /** Where to connect; default this host, over IPv4 (127.0.0.1) or IPv6 (::1). */
  hostname?: string;
  /** Stops the wait: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

/**
 * A lease: ports held by the server for as long as its connection is open.
 *
 * @example
 * ```ts
 * import { leasePorts } from "@x/portpicker";
 *
 * const lease = await leasePorts(2);
 * console.log(lease.ports);
 * await lease.release();
 * ```
 */
export interface PortLease extends Disposable, AsyncDisposable {
  /** The leased ports. */
  readonly ports: readonly number[];
  /** Closes the connection: the server frees the ports at once. */
  release(): Promise<void>;
}

/**
 * Options of {@linkcode leasePorts}.
 *
 * @example
 * ```ts
 * import { leasePorts } from "@x/portpicker";
 *
 * await using lease = await leasePorts(1, { portserverAddress: "@ports", label: "e2e" });
 * ```
 */
export interface LeaseOptions {
  /** The server; defaults to `PORTSERVER_ADDRESS`. */
  portserverAddress?: string;
  /** Stored with the allocation, shown by the status request. */
  label?: string;
}

/**
 * One allocation in a STATUS reply.
 *
 * @example
 * ```ts
 * import { getPortServerStatus } from "@x/portpicker";
 *
 * for (const a of (await getPortServerStatus()).allocations) {
 *   console.log(a.port, a.lease ? "lease" : a.pid, a.alive ? "" : "dead");
 * }
 * ```
 */
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

/**
 * A STATUS reply: who holds which port.
 *
 * @example
 * ```ts
 * import { getPortServerStatus } from "@x/portpicker";
 *
 * const { allocated, pool } = await getPortServerStatus("@ports");
 * console.log(`${allocated} of ${pool} ports held`);
 * ```
 */
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
  return (await pickOne(plan(options), false, new Set())).port;
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
      held.push({ port, release: (await holdPort(port)) ?? NOTHING_HELD });
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
 * address of each address family, as the Python original does. A family the
 * host lacks is skipped; a port in use, or one this process may not bind, is
 * not free.
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
 * Waits until something accepts TCP connections on `port`: the server your
 * test just started is up. Polls with a back-off (10 ms, growing to 250 ms);
 * every connect is bounded by the time left and by the signal.
 *
 * @param port The port, from 1 to 65535.
 * @param options The timeout, the host, and a signal to stop waiting.
 * @throws {Error} On timeout, naming the port, the hosts and the timeout; at
 * once when the host cannot be resolved or network access is denied.
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
      `Invalid timeout ${show(timeout)}: expected milliseconds, 0 or more`,
    );
  }
  if (hostname !== undefined && (typeof hostname !== "string" || !hostname)) {
    throw new TypeError(
      `Invalid hostname ${show(hostname)}: expected a host name`,
    );
  }
  const hosts = hostname ? [hostname] : ["127.0.0.1", "::1"];
  const deadline = Date.now() + timeout;
  for (let pause = 10;; pause = Math.min(pause * 1.5, 250)) {
    signal?.throwIfAborted();
    const left = deadline - Date.now();
    const attempt = AbortSignal.any([
      AbortSignal.timeout(Math.max(left, 1)),
      ...signal ? [signal] : [],
    ]);
    const failures = await Promise.all(
      hosts.map((h) => connectTcp(h, port, attempt).then(() => null, (e) => e)),
    );
    if (failures.some((e) => e === null)) return;
    signal?.throwIfAborted();
    // Not "nothing accepts yet": say so now, not after the timeout.
    const fatal = failures.find((e) => connectError(e) !== "refused");
    if (fatal && (hosts.length === 1 || connectError(fatal) === "denied")) {
      throw new Error(
        `Cannot wait for port ${port} on ${hosts.join(" or ")}: ${
          describe(fatal)
        }`,
        { cause: fatal },
      );
    }
    if (Date.now() >= deadline) {
      throw new Error(
        `Port ${port} did not accept connections on ${
          hosts.join(" or ")
        } within ${timeout} ms`,
      );
    }
    await sleep(Math.min(pause, deadline - Date.now()), signal);
  }
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
 * @throws {Error} When a claim naming the holder cannot be removed, naming
 * the file.
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
  const own = claims.get(port);
  if (own !== undefined) {
    claims.delete(port);
    removeClaim(own, port, ownPid());
  }
  if (options.lockDir !== undefined) {
    removeClaim(checkLockDir(options.lockDir), port, pidOrOwn(options.pid));
  }
  if (randomPorts.delete(port) || !ownedPorts.delete(port)) return;
  const from = serverPorts.get(port);
  serverPorts.delete(port);
  // A server that takes ports back frees it for everybody; kept here too, it
  // could be handed out twice.
  if (from && extendedServers.get(from.address) !== false) {
    returnPortsToServer(from.address, [port], { pid: from.pid }).catch(() => {
      // The Python server keeps the port for this process: reuse it here.
      if (extendedServers.get(from.address) === false) freePorts.add(port);
    });
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
  for (const port of [...claims.keys()]) returnPort(port);
  for (const set of [freePorts, ownedPorts, randomPorts]) set.clear();
  serverPorts.clear();
  extendedServers.clear();
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
  options: { pid?: number } = {},
): Promise<number | undefined> {
  if (typeof address !== "string") {
    throw new TypeError(
      `Invalid portserverAddress ${show(address)}: expected a string`,
    );
  }
  const pid = pidOrOwn(options.pid);
  if (!address) return undefined;
  let reply: string | undefined;
  try {
    reply = await request(address, `${pid}\n`, PROTOCOL_LIMITS.reply);
  } catch (error) {
    console.error(serverErrorLine(error, address));
    return undefined;
  }
  const port = /^\d{1,5}$/.test(reply ?? "") ? Number(reply) : 0;
  if (port < 1 || port > 65535) {
    console.error(
      /^0*$/.test(reply ?? "")
        ? "Portserver failed to find a port."
        : `Portserver failed to find a port: bad reply ${
          JSON.stringify(reply!.slice(0, 40))
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
  let connection: UnixConnection | undefined;
  let ports: number[];
  try {
    connection = await connectUnix(address);
    // The sending side stays open: the lease lasts while the connection does.
    await connection.write(requestLine("LEASE", { count, label }));
    const line = await readLine(connection, PROTOCOL_LIMITS.reply, address);
    extendedServers.set(address, line !== undefined);
    if (line === undefined) {
      throw new Error(
        `The port server at ${address} cannot lease ports (a Python portserver?)`,
      );
    }
    ports = parsePorts(line, count, address, "refused the lease");
  } catch (error) {
    connection?.close();
    throw reachError(error, address);
  }
  connection.unref();
  const open = connection;
  let released: Promise<void> | undefined;
  const release = () => released ??= Promise.resolve(open.close());
  return {
    ports,
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
    requestLine("STATUS", {}),
    PROTOCOL_LIMITS.statusReply,
    "has no status request",
  );
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
  options: { pid?: number } = {},
): Promise<number[]> {
  const pid = pidOrOwn(options.pid);
  if (
    !Array.isArray(ports) || ports.length === 0 ||
    ports.length > PROTOCOL_LIMITS.ports
  ) {
    throw new TypeError(
      `Invalid ports ${
        show(ports)
      }: expected an array of 1 to ${PROTOCOL_LIMITS.ports} ports`,
    );
  }
  ports.forEach((port) => checkPort(port));
  const where = serverAddress(address);
  const line = await extendedRequest(
    where,
    requestLine("RETURN", { pid, ports: ports.join(",") }),
    PROTOCOL_LIMITS.reply,
    "cannot take ports back",
  );
  const freed = parsePorts(line, ports.length, where, "refused");
  for (const port of freed) {
    serverPorts.delete(port);
    ownedPorts.delete(port);
    freePorts.delete(port);
  }
  return freed;
}

/**
 * When a pid is alive, and which process it names: the start time of `pid`
 * (Linux: clock ticks since boot, from `/proc/<pid>/stat`), or 0 when no
 * live process has that pid (zombies count as dead; so does anything that
 * is not an integer from 1 to 2³¹−1). Elsewhere: 1 while the pid exists, so
 * pid reuse goes undetected. A pid and its start time name one process for
 * good: the port server and lock-directory claims record owners this way.
 *
 * @param pid The process.
 * @returns Its start time, or 0 for none.
 * @throws {Error} When `/proc` cannot be read (on Deno, without `-A`: Deno
 * 2.9 reads `/proc` only with `--allow-all`): that must not make every owner
 * look dead.
 *
 * @example
 * ```ts
 * import { processStartTime } from "@x/portpicker";
 *
 * console.log(processStartTime(1) > 0); // true
 * ```
 */
export function processStartTime(pid: number): number {
  if (!isPid(pid)) return 0;
  if (OS !== "linux") return processExists(pid) ? 1 : 0;
  let stat: string;
  try {
    stat = readText(`/proc/${pid}/stat`);
  } catch (error) {
    // ESRCH: the process ended between the open and the read.
    if (["ENOENT", "ESRCH"].includes(errorCode(error)!)) return 0;
    throw new Error(
      `Cannot read /proc/${pid}/stat: ${describe(error)}`,
      { cause: error },
    );
  }
  // The command name may hold spaces and parentheses: fields follow the last ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X") return 0;
  return Number(fields[19]) || 1;
}

/**
 * Linux's `ip_local_reserved_ports`: ports the kernel never hands out and
 * this picker never returns (nor the port server). Empty elsewhere, and on
 * Deno without `-A` (Deno 2.9 reads `/proc` only with `--allow-all`).
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
  let text = "";
  try {
    if (OS === "linux") {
      text = readText("/proc/sys/net/ipv4/ip_local_reserved_ports");
    }
  } catch { /* no such file, or no permission: none reserved that we know */ }
  for (const part of text.trim().split(",")) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!match) continue;
    const last = Math.min(Number(match[2] ?? match[1]), 65535);
    for (let port = Number(match[1]); port <= last; port++) reserved.add(port);
  }
  return reserved;
}

let reserved: Set<number> | undefined;

// ===========================================================================
// 2. The wire protocol. Classic (the Python server's): the client sends its
// pid in ASCII and a newline; the server writes the port and a newline, or
// closes with nothing written. Extended (this project's server): one request
// line, a verb and `key=value` words (`TAKE pid=1234 count=2 label=web`,
// `LEASE count=2`, `RETURN pid=1234 ports=15000,15001`, `STATUS`), answered
// by one line: `OK <ports>`, `ERR <why>`, or the status as JSON. The Python
// server cannot parse a verb and closes without a reply, so a client can
// tell the two servers apart. Each side owns its half, as in the Python
// original: the server parses requests and writes replies (`portserver.ts`),
// the client writes requests and parses replies (here). What both need is
// below: the framing (every message is complete only at its newline and
// never longer than its limit) and the label rule.

/**
 * Size limits of the wire protocol (bytes, newline included, unless named otherwise).
 *
 * @example
 * ```ts
 * import { LineReader, PROTOCOL_LIMITS } from "@x/portpicker";
 *
 * const reader = new LineReader(PROTOCOL_LIMITS.reply);
 * ```
 */
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
} = {
  classicRequest: 20,
  request: 8192,
  reply: 8192,
  statusReply: 16 * 1024 * 1024,
  ports: 1000,
};

/**
 * The label rule: printable ASCII without spaces, 1 to 100 characters.
 *
 * @param label The candidate.
 * @returns Whether it is a label, for the library and the server alike.
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

  /** The bytes held of a line not yet complete. */
  get pending(): Uint8Array {
    const out = new Uint8Array(this.#size);
    let offset = 0;
    for (const chunk of this.#chunks) {
      out.set(chunk, offset);
      offset += chunk.length;
    }
    return out;
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
    this.#chunks.push(newline < 0 ? chunk : chunk.subarray(0, newline));
    this.#size = newline < 0 ? size : size - 1;
    if (newline < 0) return undefined;
    const line = decoder.decode(this.pending);
    this.#chunks = [];
    this.#size = 0;
    return line;
  }
}

/** An extended request line, newline included. */
function requestLine(
  verb: string,
  words: Record<string, string | number | undefined>,
): string {
  const parts = Object.entries(words).filter(([, v]) => v !== undefined);
  return `${[verb, ...parts.map(([k, v]) => `${k}=${v}`)].join(" ")}\n`;
}

/**
 * The ports of an `OK` reply to TAKE, LEASE or RETURN: `count` distinct
 * ports of 1–65535. An `ERR` reply throws with the server's words.
 */
function parsePorts(
  line: string,
  count: number,
  address: string,
  refused: string,
): number[] {
  if (line.startsWith("ERR ")) {
    throw new Error(
      `The port server at ${address} ${refused}: ${line.slice(4)}`,
    );
  }
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
  return ports;
}

/** A STATUS reply, every field checked. */
function parseStatus(line: string, address: string): PortServerStatus {
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
      !(Number.isInteger(a?.port) && a.port >= 1 && a.port <= 65535) ||
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
// here. Deno's own sockets and files (its node: modules cost start-up time),
// Bun's own sockets for the binds of a check, node: modules elsewhere.

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
const decoder = new TextDecoder();
const encoder = new TextEncoder();
const fs = () => node!.getBuiltinModule("node:fs");
let netModule: Promise<typeof import("node:net")> | undefined;
// Loaded on first use: importing it costs start-up time.
const loadNet = () => netModule ??= import("node:net");

type Proto = "tcp" | "udp";

/** A bound socket, TCP (listening) or UDP. */
interface BoundSocket {
  readonly port: number;
  close(): Promise<void>;
}

const CLOSED: Promise<void> = Promise.resolve();

/**
 * Binds a socket (TCP listening, or UDP) on `hostname`, a wildcard address.
 * With `reusePort`, SO_REUSEPORT is set where the runtime can: on TCP
 * everywhere (Deno needs --unstable-net), on UDP on Node only.
 */
async function bindSocket(
  proto: Proto,
  hostname: string,
  port: number,
  reusePort = false,
): Promise<BoundSocket> {
  if (bun) {
    const socket = proto === "tcp"
      ? bun.listen({ hostname, port, reusePort, socket: { data() {} } })
      : await bun.udpSocket({ hostname, port });
    // A held port must not keep the caller's process alive.
    socket.unref();
    const close = "stop" in socket
      ? () => socket.stop(true)
      : () => socket.close();
    return { port: socket.port, close: () => (close(), CLOSED) };
  }
  if (deno && (proto === "tcp" || typeof deno.listenDatagram === "function")) {
    // Without --unstable-net, Deno ends the process on reusePort instead of
    // throwing; listenDatagram exists exactly when the flag is given.
    if (reusePort && typeof deno.listenDatagram !== "function") {
      throw new Error("reusePort is unstable: Deno needs --unstable-net");
    }
    const options = { hostname, port, ...reusePort ? { reusePort } : {} };
    const socket = proto === "tcp"
      ? deno.listen({ ...options, transport: "tcp" })
      : deno.listenDatagram({ ...options, transport: "udp" });
    return {
      // Asking the socket costs a system call: only for the kernel's choice.
      port: port || (socket.addr as Deno.NetAddr).port,
      close: () => (socket.close(), CLOSED),
    };
  }
  if (deno) {
    // Deno's node:dgram reports a missing permission asynchronously, out of
    // reach of any catch: ask first.
    const where = `${hostname === "::" ? "[::]" : hostname}:${port}`;
    if (!granted({ name: "net", host: where })) {
      throw Object.assign(
        new Error(
          `Requires net access to "${where}", run again with the --allow-net flag`,
        ),
        {
          name: "NotCapable",
        },
      );
    }
  }
  if (proto === "tcp") {
    const net = await loadNet();
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({
        host: hostname,
        port,
        backlog: 1,
        exclusive: true,
        ...reusePort ? { reusePort } : {},
      }, resolve);
    });
    server.unref();
    return {
      port: (server.address() as { port: number }).port,
      close: () => new Promise((done) => server.close(() => done())),
    };
  }
  const dgram = await import("node:dgram");
  const socket = dgram.createSocket({
    type: hostname.includes(":") ? "udp6" : "udp4",
    reusePort,
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("error", (error) => (socket.close(), reject(error)));
    socket.bind({ address: hostname, port, exclusive: true }, resolve);
  });
  socket.removeAllListeners("error");
  socket.unref();
  return {
    port: socket.address().port,
    close: () => new Promise((done) => socket.close(() => done())),
  };
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
  return OS === "windows" || OS === "win32"
    ? `\\\\.\\pipe\\${address.slice(1)}`
    : `\0${address.slice(1)}`;
}

async function connectUnix(address: string): Promise<UnixConnection> {
  const path = unixPath(address);
  if (deno && path.startsWith("\\")) throw new Error("no named pipes on Deno");
  if (deno) {
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
        const n = closed ? null : await conn.read(buffer);
        return n === null ? null : buffer.slice(0, n);
      },
      close: () => {
        if (!closed) conn.close();
        closed = true;
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
  socket.on("data", push);
  socket.on("close", () => push(null));
  socket.on("error", (error: Error) => (failure = error, push(null)));
  return {
    write: (text) =>
      new Promise((resolve, reject) =>
        socket.write(text, (error) => error ? reject(error) : resolve())
      ),
    closeWrite: () => new Promise((resolve) => socket.end(resolve)),
    read: async () => {
      while (chunks.length === 0) {
        await new Promise<void>((resolve) => wake = resolve);
      }
      if (chunks[0] !== null) return chunks.shift()!;
      if (failure) throw failure;
      return null;
    },
    close: () => void socket.destroy(),
    unref: () => void socket.unref(),
  };
}

/** Connects over TCP and closes at once: whether something accepts there. */
async function connectTcp(
  hostname: string,
  port: number,
  signal: AbortSignal,
): Promise<void> {
  if (deno) {
    (await deno.connect({ hostname, port, transport: "tcp", signal })).close();
    return;
  }
  const net = await loadNet();
  await new Promise<void>((resolve, reject) => {
    const socket = net.connect({ host: hostname, port, signal });
    socket.once("connect", () => (socket.destroy(), resolve()));
    socket.once("error", (error) => (socket.destroy(), reject(error)));
  });
}

/** What a failed connect says: nothing accepts yet, or a reason to stop. */
function connectError(error: unknown): "refused" | "denied" | "unknown host" {
  const { name } = (error ?? {}) as { name?: string };
  const code = errorCode(error) ?? "";
  if (name === "NotCapable") return "denied";
  if (["ENOTFOUND", "EAI_NONAME", "EAI_AGAIN"].includes(code)) {
    return "unknown host";
  }
  // Deno names a host it cannot resolve only in the message, and rejects a
  // malformed one with a URIError.
  const unknown = /failed to lookup|not known|name resolution/i;
  if (name === "URIError" || unknown.test(`${error}`)) {
    return "unknown host";
  }
  return "refused";
}

function ownPid(): number {
  return deno ? deno.pid : node!.pid;
}

/** Whether a process with this pid exists (where /proc is not there to say). */
function processExists(pid: number): boolean {
  try {
    // Deno has Node's process too; its own Deno.kill takes no signal 0.
    host.process.kill(pid, 0);
    return true;
  } catch (error) {
    return errorCode(error) === "EPERM";
  }
}

/** Whether Deno grants a permission, asked without a prompt (true elsewhere). */
function granted(descriptor: Deno.PermissionDescriptor): boolean {
  return !deno || deno.permissions.querySync(descriptor).state === "granted";
}

/**
 * An environment variable, or undefined when it is empty or unset; on Deno
 * without `--allow-env` for it, undefined too: no prompt, no warning.
 */
function readEnv(name: string): string | undefined {
  if (!deno) return node!.env[name];
  // Asked once per variable: asking costs more than a pick.
  envGranted[name] ??= granted({ name: "env", variable: name });
  return envGranted[name] ? deno.env.get(name) : undefined;
}

/**
 * This user's lock directory: `$XDG_RUNTIME_DIR/portpicker`, else
 * `portpicker-<uid>` in the temporary directory; made mode 0700. Undefined
 * where the runtime may not use it (Deno without `-A`), silently, or where
 * it is not this user's own directory, with one line on stderr.
 */
function userLockDir(): string | undefined {
  if (deno && (!granted({ name: "read" }) || !granted({ name: "write" }))) {
    return undefined;
  }
  let dir: string;
  try {
    // What claims need: a start time from /proc (Deno: -A), and a uid.
    processStartTime(ownPid());
    const uid = deno ? deno.uid() : host.process.getuid?.();
    const runtime = readEnv("XDG_RUNTIME_DIR");
    dir = runtime
      ? `${runtime}/portpicker`
      : `${deno ? readEnv("TMPDIR") || "/tmp" : tmpdir()}/portpicker-${uid}`;
    try {
      files.mkdir(dir, false, 0o700);
    } catch (error) {
      if (errorCode(error) !== "EEXIST") throw error;
    }
    const info = files.lstat(dir);
    const why = info.symlink
      ? "it is a symlink"
      : !info.directory
      ? "it is not a directory"
      : uid !== undefined && info.uid !== uid
      ? `it belongs to uid ${info.uid}, not ${uid}`
      : undefined;
    if (why === undefined) return dir;
    console.error(`portpicker: not claiming ports in ${dir}: ${why}`);
  } catch { /* no permission, no such place: picking goes on without claims */ }
  return undefined;
}

let userLockDirOnce: { dir: string | undefined } | undefined;

function tmpdir(): string {
  return host.process.getBuiltinModule("node:os").tmpdir();
}

const envGranted: Record<string, boolean> = {};

function errorCode(error: unknown): string | undefined {
  return (error as { code?: string } | undefined)?.code;
}

/** An error's message (Deno's permission errors name the flag they need). */
function describe(error: unknown): string {
  return String((error as Error)?.message ?? error);
}

function readText(path: string): string {
  return deno ? deno.readTextFileSync(path) : fs().readFileSync(path, "utf8");
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
  mkdir(path: string, recursive = false, mode = 0o777): void {
    if (deno) deno.mkdirSync(path, { recursive, mode });
    else fs().mkdirSync(path, { recursive, mode });
  },
  /** What a path is, without following a symlink. */
  lstat(path: string): { symlink: boolean; directory: boolean; uid: number } {
    if (deno) {
      const info = deno.lstatSync(path);
      return {
        symlink: info.isSymlink,
        directory: info.isDirectory,
        uid: info.uid ?? -1,
      };
    }
    const info = fs().lstatSync(path);
    return {
      symlink: info.isSymbolicLink(),
      directory: info.isDirectory(),
      uid: info.uid,
    };
  },
  /** Removes a file or an empty directory; nothing there is fine. */
  remove(path: string): void {
    try {
      if (deno) deno.removeSync(path);
      else if (path.endsWith(".takeover")) fs().rmdirSync(path);
      else fs().unlinkSync(path);
    } catch (error) {
      if (errorCode(error) !== "ENOENT") throw error;
    }
  },
  /**
   * A small regular file's text, read without following a symlink and
   * without waiting on a FIFO: undefined when nothing is there, null when
   * something else is (or it is larger than `limit` bytes).
   */
  readSmall(path: string, limit: number): string | undefined | null {
    try {
      if (deno) {
        const info = deno.lstatSync(path);
        if (!info.isFile || info.size > limit) return null;
        return deno.readTextFileSync(path);
      }
      const { constants: c, openSync, fstatSync, readSync, closeSync } = fs();
      const fd = openSync(path, c.O_RDONLY | c.O_NOFOLLOW | c.O_NONBLOCK);
      try {
        const info = fstatSync(fd);
        if (!info.isFile() || info.size > limit) return null;
        const buffer = new Uint8Array(limit);
        return decoder.decode(buffer.subarray(0, readSync(fd, buffer)));
      } finally {
        closeSync(fd);
      }
    } catch (error) {
      if (errorCode(error) === "ENOENT") return undefined;
      if (errorCode(error) === "ELOOP") return null;
      throw error;
    }
  },
  /** Milliseconds since the file (or a symlink itself) last changed. */
  age(path: string): number {
    const mtime = deno
      ? deno.lstatSync(path).mtime?.getTime() ?? 0
      : fs().lstatSync(path).mtimeMs;
    return Date.now() - mtime;
  },
};

/** Runs `fn` when the process exits normally. */
function atExit(fn: () => void): void {
  if (deno) host.addEventListener("unload", fn);
  else node!.on("exit", fn);
}

// ===========================================================================
// 4. How a port is checked. Python's `bind(port, type)`: for IPv6 and then
// IPv4, bind the wildcard address (a TCP socket listens) and close at once;
// a family the host lacks is skipped; the port is free when every bind
// succeeds. Where one bind on `::` covers IPv4 too (dual-stack, Linux's
// default), that one bind checks both families: it fails whenever an IPv4 or
// an IPv6 socket holds the port. A free port is free on TCP and on UDP.

/** Errors that say the host lacks this address family: skip the family. */
const FAMILY_MISSING = [
  "EAFNOSUPPORT",
  "EADDRNOTAVAIL",
  "EPROTONOSUPPORT",
  "AddrNotAvailable",
];
/** Errors that say the port is taken, or not ours to take. */
const PORT_TAKEN = ["EADDRINUSE", "EACCES", "EPERM", "AddrInUse"];

function classify(error: unknown): "family" | "taken" | "other" {
  const { name } = (error ?? {}) as Error;
  const code = errorCode(error);
  if ([code, name].some((c) => FAMILY_MISSING.includes(c!))) return "family";
  // Deno's own permission error is "NotCapable", and is not about the port.
  if ([code, name].some((c) => PORT_TAKEN.includes(c!))) return "taken";
  return name === "PermissionDenied" && code === undefined ? "taken" : "other";
}

function bindError(
  error: unknown,
  proto: Proto,
  hostname: string,
  port: number,
): Error {
  return new Error(
    `Cannot check port ${port} (${proto.toUpperCase()} on ${hostname}): ${
      describe(error)
    }`,
    { cause: error },
  );
}

/** Per protocol: whether a bind on `::` covers IPv4 too. Found out once. */
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
 * again. Port 0 takes the kernel's choice on the first family and then tries
 * that port on the next. Returns the port, or undefined when it is taken on
 * any family or the host has none.
 */
async function bindEachFamily(
  proto: Proto,
  port: number,
): Promise<number | undefined> {
  const hosts = (await (dualStack[proto] ??= detectDualStack(proto)))
    ? ["::"]
    : ["::", "0.0.0.0"];
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

async function isFree(port: number): Promise<boolean> {
  return (await bindEachFamily("tcp", port)) !== undefined &&
    (await bindEachFamily("udp", port)) !== undefined;
}

/**
 * Binds `port` on TCP and UDP and keeps both bound: on `::` (dual-stack, so
 * IPv4 too) where the host has IPv6, else on `0.0.0.0`. With `reusePort`,
 * the TCP socket (and the UDP one on Node) sets SO_REUSEPORT, and a second
 * such bind proves that the caller's server can share it. Returns what
 * releases the port, or undefined when it is taken.
 */
async function holdPort(
  port: number,
  reusePort = false,
): Promise<Held["release"] | undefined> {
  const held: BoundSocket[] = [];
  const release = async () =>
    void await Promise.all(held.map((s) => s.close()));
  for (const proto of ["tcp", "udp"] as const) {
    for (const hostname of ["::", "0.0.0.0"]) {
      // Set once the port is held: a failure then is the second bind's.
      let sharing = false;
      try {
        held.push(await bindSocket(proto, hostname, port, reusePort));
        sharing = reusePort && proto === "tcp";
        if (sharing) {
          await (await bindSocket(proto, hostname, port, true)).close();
        }
        break;
      } catch (error) {
        const kind = classify(error);
        if (kind === "family" && !sharing) continue;
        await release();
        if (sharing || /unstable/.test(`${error}`)) {
          const why = /unstable/.test(`${error}`)
            ? "Deno needs --unstable-net for it"
            : `this runtime or OS cannot share a port (SO_REUSEPORT): ${
              describe(error)
            }`;
          throw new Error(
            `Cannot reserve port ${port} with reusePort: ${why}`,
            { cause: error },
          );
        }
        if (kind === "taken") return undefined;
        throw bindError(error, proto, hostname, port);
      }
    }
  }
  return release;
}

// ===========================================================================
// Argument checks: each written once; a bad value is named in the error.

/** What a pid is: an integer from 1 to 2³¹−1. */
function isPid(pid: unknown): pid is number {
  return Number.isInteger(pid) && (pid as number) >= 1 &&
    (pid as number) <= 0x7fffffff;
}

function checkPort(port: unknown, what = "port"): number {
  if (!Number.isInteger(port)) {
    throw new TypeError(`Invalid ${what} ${show(port)}: expected an integer`);
  }
  if ((port as number) < 1 || (port as number) > 65535) {
    throw new RangeError(
      `Invalid ${what} ${port}: expected an integer from 1 to 65535`,
    );
  }
  return port as number;
}

/** A pid as given, checked; this process when none is given. */
function pidOrOwn(pid: unknown): number {
  if (pid === undefined) return ownPid();
  if (isPid(pid)) return pid;
  throw new (Number.isInteger(pid) ? RangeError : TypeError)(
    `Invalid pid ${show(pid)}: expected an integer from 1 to 2147483647`,
  );
}

function checkCount(count: unknown, max = Infinity): number {
  if (!Number.isInteger(count)) {
    throw new TypeError(`Invalid count ${show(count)}: expected an integer`);
  }
  if ((count as number) < 1 || (count as number) > max) {
    throw new RangeError(
      `Invalid count ${count}: expected ${
        max === Infinity ? "at least 1" : `1 to ${max}`
      }`,
    );
  }
  return count as number;
}

function checkRange(range: unknown): readonly [number, number] {
  if (!Array.isArray(range) || range.length !== 2) {
    throw new TypeError(`Invalid range ${show(range)}: expected [first, last]`);
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
  if (isLabel(label)) return label;
  throw new TypeError(
    `Invalid label ${
      show(label)
    }: expected 1 to 100 printable ASCII characters without spaces`,
  );
}

function checkLockDir(dir: unknown): string {
  if (typeof dir === "string" && dir !== "") return dir;
  throw new TypeError(`Invalid lockDir ${show(dir)}: expected a directory`);
}

/** A port, or any iterable of ports (not a string), as a list. */
function portList(value: unknown, what: string, single: boolean): number[] {
  if (value === undefined) return [];
  if (single && typeof value === "number") return [checkPort(value, what)];
  if (
    typeof (value as Iterable<unknown>)?.[Symbol.iterator] !== "function" ||
    typeof value === "string"
  ) {
    throw new TypeError(
      `Invalid ${what}s ${show(value)}: expected ${
        single ? "a port or " : ""
      }an iterable of ports`,
    );
  }
  return [...(value as Iterable<unknown>)].map((p) => checkPort(p, what));
}

/** A value as an error message shows it. */
function show(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(show).join(", ")}]`;
  if (typeof value === "object" && value !== null) {
    return value.constructor?.name ?? "object";
  }
  return String(value);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const aborted = () => (clearTimeout(timer), reject(signal!.reason));
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", aborted);
      resolve();
    }, Math.max(ms, 0));
    signal?.addEventListener("abort", aborted, { once: true });
  });
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

/** A port picked by this call, maybe held bound until `release()`. */
interface Held {
  port: number;
  release(): Promise<void>;
}

const NOTHING_HELD: Held["release"] = () => CLOSED;

/** The options of one call, checked. */
interface Plan {
  pid: number | undefined;
  serverAddress: string | undefined;
  preferred: number[];
  range: readonly [number, number];
  rangeGiven: boolean;
  exclude: Set<number>;
  lockDir: string | undefined;
  /** Whether the lock directory was asked for (else it is the user's). */
  lockDirAsked: boolean;
  label: string | undefined;
  reusePort: boolean;
}

function plan(options: ReserveOptions | undefined): Plan {
  if (options !== undefined && (typeof options !== "object" || !options)) {
    throw new TypeError(`Invalid options ${show(options)}: expected an object`);
  }
  const o = options ?? {};
  if (
    o.portserverAddress !== undefined && typeof o.portserverAddress !== "string"
  ) {
    throw new TypeError(
      `Invalid portserverAddress ${
        show(o.portserverAddress)
      }: expected a string`,
    );
  }
  if (o.reusePort !== undefined && typeof o.reusePort !== "boolean") {
    throw new TypeError(
      `Invalid reusePort ${show(o.reusePort)}: expected true or false`,
    );
  }
  return {
    pid: o.pid === undefined ? undefined : pidOrOwn(o.pid),
    serverAddress: o.portserverAddress || readEnv("PORTSERVER_ADDRESS"),
    preferred: portList(o.ports, "port", true),
    range: o.range === undefined ? DEFAULT_RANGE : checkRange(o.range),
    rangeGiven: o.range !== undefined,
    exclude: new Set(portList(o.exclude, "excluded port", false)),
    ...lockDirOf(o.lockDir),
    label: o.label === undefined ? undefined : checkLabel(o.label),
    reusePort: o.reusePort ?? false,
  };
}

/** The lock directory of a call: the option, the variable, or the user's. */
function lockDirOf(
  option: string | false | undefined,
): { lockDir: string | undefined; lockDirAsked: boolean } {
  if (option === false) return { lockDir: undefined, lockDirAsked: true };
  if (option !== undefined) {
    return { lockDir: checkLockDir(option), lockDirAsked: true };
  }
  const env = readEnv("PORTPICKER_LOCK_DIR");
  if (env !== undefined) {
    return { lockDir: env || undefined, lockDirAsked: true };
  }
  userLockDirOnce ??= { dir: userLockDir() };
  return { lockDir: userLockDirOnce.dir, lockDirAsked: false };
}

/** Whether `port` may be handed out by this call (ignoring what is given). */
function allowed(port: number, p: Plan, taken: Set<number>): boolean {
  return !p.exclude.has(port) && !taken.has(port) &&
    !reservedPorts().has(port) &&
    (!p.rangeGiven || (port >= p.range[0] && port <= p.range[1]));
}

/** Whether this process was given `port` and has not returned it. */
function given(port: number): boolean {
  return randomPorts.has(port) || ownedPorts.has(port);
}

/** Hands out a port this process holds already (free set, server): unchecked. */
async function handOut(port: number, hold: boolean, p: Plan): Promise<Held> {
  const release = hold ? await holdPort(port, p.reusePort) : undefined;
  return { port, release: release ?? NOTHING_HELD };
}

/**
 * Takes a port this process found itself, if it is free: held when `hold`,
 * claimed in the lock directory (another process may have it), and
 * remembered as given. Undefined when it is not free or claimed elsewhere.
 */
async function take(
  port: number,
  hold: boolean,
  p: Plan,
  checked = false,
): Promise<Held | undefined> {
  if (!checked && !(await isFree(port))) return undefined;
  const release = hold ? await holdPort(port, p.reusePort) : NOTHING_HELD;
  if (!release) return undefined;
  if (p.lockDir !== undefined && !claimFor(p, port)) {
    await release();
    return undefined;
  }
  randomPorts.add(port);
  return { port, release };
}

/**
 * Claims `port` for the call. In the user's own directory, which nobody
 * asked for, a failure (a full disk, say) is said once and claims stop:
 * picking goes on as without them.
 */
function claimFor(p: Plan, port: number): boolean {
  try {
    return claimPort(p.lockDir!, port, p.pid ?? ownPid(), p.lockDirAsked);
  } catch (error) {
    if (p.lockDirAsked) throw error;
    console.error(
      `portpicker: not claiming ports in ${p.lockDir}: ${
        (error as Error).message
      }`,
    );
    userLockDirOnce = { dir: p.lockDir = undefined };
    return true;
  }
}

/** Gives back a port of a call that failed. */
function giveBack(port: number, p: Plan): void {
  returnPort(port, p.lockDir ? { lockDir: p.lockDir, pid: p.pid } : {});
}

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
      return await handOut(port, hold, p);
    }
    const held = await take(port, hold, p);
    if (held) return held;
  }

  for (const port of freePorts) {
    if (!allowed(port, p, taken)) continue;
    freePorts.delete(port);
    ownedPorts.add(port);
    return await handOut(port, hold, p);
  }

  if (p.serverAddress) {
    const [port] = await fromServer(p, 1, taken);
    if (port !== undefined) return await handOut(port, hold, p);
  }

  if (!p.rangeGiven) {
    // The kernel's choice: on Linux, UDP's port 0 is random while TCP's often
    // repeats the port just closed (which this process was just given), so
    // UDP first; every other try TCP first, for kernels where UDP repeats.
    for (let i = 0; i < 10; i++) {
      const [first, second]: Proto[] = i % 2 ? ["tcp", "udp"] : ["udp", "tcp"];
      const port = await bindEachFamily(first, 0);
      if (port === undefined || !allowed(port, p, taken) || given(port)) {
        continue;
      }
      if ((await bindEachFamily(second, port)) === undefined) continue;
      const held = await take(port, hold, p, true);
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
    const held = await take(port, hold, p);
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
 * or outside the range go back to the server, with a line on stderr. No
 * port, a bad reply or no server: as if no server had answered, and not
 * asked again in this call (one line on stderr, not one a port).
 */
async function fromServer(
  p: Plan,
  count: number,
  taken: Set<number>,
): Promise<number[]> {
  const address = p.serverAddress!;
  const pid = p.pid ?? ownPid();
  const ports = await takeFromServer(address, pid, count, p.label);
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
// pid and start time, made exclusively. A claim whose owner is not alive, or
// whose pid now names another process, is stale and taken over. Anything
// else at that name (garbage, a symlink, a FIFO, a large file) is stale once
// it is older than a claim being written could be.

/** Claims this process made for itself: port → directory. */
const claims = new Map<number, string>();
let exitHookInstalled = false;
/** A takeover lock older than this was left by a process that died in it. */
const TAKEOVER_TIMEOUT_MS = 10_000;
/** An unreadable claim younger than this may be a claim being written. */
const GARBAGE_GRACE_MS = 10_000;
/** The longest claim: two numbers, a space and a newline. */
const CLAIM_BYTES = 64;

/** Whether a claim is stale: its owner is gone, or it is old garbage. */
function stale(path: string, text: string | null): boolean {
  const match = /^(\d+) (\d+)\n$/.exec(text ?? "");
  if (match) {
    const startTime = processStartTime(Number(match[1]));
    return startTime === 0 || startTime !== Number(match[2]);
  }
  try {
    return files.age(path) > GARBAGE_GRACE_MS;
  } catch {
    return false;
  }
}

/** Runs `f`; a file error names the file and says what was being done. */
function onFile<T>(doing: string, path: string, f: () => T): T {
  try {
    return f();
  } catch (error) {
    throw new Error(`Cannot ${doing} ${path}: ${describe(error)}`, {
      cause: error,
    });
  }
}

/**
 * Claims `port` in `dir` for `pid` (default this process): a file made with
 * all its content at once (written aside, then hard-linked into place, which
 * fails if the file exists). A stale claim is taken over under a per-port
 * lock, by renaming over it, so that a live claim is never lost.
 */
function claimPort(
  dir: string,
  port: number,
  pid: number,
  asked: boolean,
): boolean {
  const startTime = processStartTime(pid);
  // In the user's own directory, nobody asked: a dead pid just gets none.
  if (startTime === 0 && !asked) return true;
  if (startTime === 0) {
    throw new Error(
      `Cannot claim port ${port} for pid ${pid}: no such process`,
    );
  }
  const path = `${dir}/${port}.claim`;
  const draft = `${dir}/.draft-${ownPid()}-${port}-${
    Math.random().toString(36).slice(2)
  }`;
  try {
    onFile("write the claim", draft, () => {
      try {
        files.create(draft, `${pid} ${startTime}\n`);
      } catch (error) {
        if (errorCode(error) !== "ENOENT") throw error;
        files.mkdir(dir, true);
        files.create(draft, `${pid} ${startTime}\n`);
      }
    });
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        files.link(draft, path);
        return claimed(port, dir, pid);
      } catch (error) {
        if (errorCode(error) !== "EEXIST") {
          throw new Error(`Cannot claim ${path}: ${describe(error)}`);
        }
      }
      const seen = onFile(
        "read",
        path,
        () => files.readSmall(path, CLAIM_BYTES),
      );
      if (seen === undefined) continue;
      if (!stale(path, seen)) return false;
      const lock = `${path}.takeover`;
      if (!lockTakeover(lock)) return false;
      try {
        // A second look under the lock: released or renewed meanwhile?
        const again = files.readSmall(path, CLAIM_BYTES);
        if (again === undefined) continue;
        if (!stale(path, again)) return false;
        files.rename(draft, path);
        return claimed(port, dir, pid);
      } finally {
        files.remove(lock);
      }
    }
    return false;
  } finally {
    // On every path, a full disk's empty draft too.
    try {
      files.remove(draft);
    } catch { /* the error that matters was thrown above */ }
  }
}

/** Records a claim; one for this process is removed at its exit. */
function claimed(port: number, dir: string, pid: number): true {
  if (pid !== ownPid()) return true;
  claims.set(port, dir);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    atExit(() => {
      for (const [port, dir] of claims) {
        try {
          removeClaim(dir, port, ownPid());
        } catch { /* exiting: nothing to tell */ }
      }
    });
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

/** Removes the claim on `port` in `dir` if it names `pid`. */
function removeClaim(dir: string, port: number, pid: number): void {
  const path = `${dir}/${port}.claim`;
  const text = onFile("read", path, () => files.readSmall(path, CLAIM_BYTES));
  if (!text?.startsWith(`${pid} `)) return;
  onFile("remove", path, () => files.remove(path));
}

// ===========================================================================
// 7. The port-server client.

const SERVER_TIMEOUT_MS = 10_000;

/** The server to use: the one given, else `PORTSERVER_ADDRESS`. */
function serverAddress(address: string | undefined): string {
  if (address !== undefined && typeof address !== "string") {
    throw new TypeError(
      `Invalid portserverAddress ${show(address)}: expected a string`,
    );
  }
  const where = address || readEnv("PORTSERVER_ADDRESS");
  if (where) return where;
  const env = granted({ name: "env", variable: "PORTSERVER_ADDRESS" })
    ? ""
    : " (Deno needs --allow-env to read it)";
  // A missing argument, as the CLI's usage errors.
  throw new TypeError(
    `No port server: pass an address or set PORTSERVER_ADDRESS${env}`,
  );
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
  for (let chunk; (chunk = await connection.read()) !== null;) {
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
  const rest = reader.pending;
  if (rest.length === 0) return undefined;
  throw new Error(
    `Bad reply from the port server at ${address}: ${
      JSON.stringify(decoder.decode(rest).slice(0, 60))
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

/** A connection error, naming the server as the user wrote it. */
function reachError(error: unknown, address: string): Error {
  if (/^(Bad |The port server|Cannot reach)/.test((error as Error)?.message)) {
    return error as Error;
  }
  // The runtimes name an abstract address with its NUL byte.
  const why = describe(error).replaceAll("\0", "@");
  return new Error(`Cannot reach the port server at ${address}: ${why}`, {
    cause: error,
  });
}

/** The one line the classic client prints when a server cannot help. */
function serverErrorLine(error: unknown, address: string): string {
  const { message } = reachError(error, address);
  return message.startsWith("Bad ")
    ? `${message}; picking without it`
    : `Socket error when connecting to portserver: ${message}`;
}

/**
 * Sends an extended request and returns the reply line; a server that
 * closes without one (the Python server) cannot do `what`.
 */
async function extendedRequest(
  address: string,
  text: string,
  limit: number,
  what: string,
): Promise<string> {
  let line: string | undefined;
  try {
    line = await request(address, text, limit);
  } catch (error) {
    throw reachError(error, address);
  }
  extendedServers.set(address, line !== undefined);
  if (line !== undefined) return line;
  throw new Error(
    `The port server at ${address} ${what} (a Python portserver?)`,
  );
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
  const ports: number[] = [];
  if (extendedServers.get(address) !== false) {
    try {
      const line = await extendedRequest(
        address,
        requestLine("TAKE", { pid, count, label }),
        PROTOCOL_LIMITS.reply,
        "",
      );
      ports.push(...parsePorts(line, count, address, "refused"));
    } catch (error) {
      const { message } = error as Error;
      if (extendedServers.get(address) !== false) {
        console.error(
          message.startsWith("The port server")
            ? "Portserver failed to find a port."
            : serverErrorLine(error, address),
        );
        return [];
      }
    }
    for (const port of ports) {
      ownedPorts.add(port);
      serverPorts.set(port, { address, pid });
    }
  }
  while (ports.length < count) {
    const port = await getPortFromPortServer(address, { pid });
    if (port === undefined) break;
    ports.push(port);
  }
  return ports;
}
