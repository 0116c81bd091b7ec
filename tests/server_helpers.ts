/**
 * Helpers of the port server tests: our server as a real process on the
 * runtime running the test, raw requests over node:net, live processes to
 * own ports, and the server's statistics as logged on SIGUSR1.
 */

import { readFileSync } from "node:fs";
import { connect } from "node:net";
import {
  freeRange,
  type Proc,
  releaseRange,
  runtimeCommand,
  start,
  uniqueName,
} from "./helpers.ts";

/**
 * A range of `size` ports of this test process's region, overlapping no
 * range given before in this process; pools of up to 100 ports are checked
 * free now.
 */
export function randomPool(size: number): Promise<[number, number]> {
  return freeRange(size);
}

/** `first-last`, as --pool takes it. */
export function poolSpec(range: readonly [number, number]): string {
  return `${range[0]}-${range[1]}`;
}

/**
 * Starts `cli.ts serve args...` on the runtime running the test and waits
 * for its "Serving on" line.
 */
export async function startServer(args: string[]): Promise<Proc> {
  const proc = start([...runtimeCommand("cli.ts"), "serve", ...args], {
    PORTSERVER_ADDRESS: undefined,
    PORTPICKER_LOCK_DIR: undefined,
  });
  try {
    await proc.waitFor(/Serving on/, 30_000);
  } catch (error) {
    await proc.stop("SIGKILL");
    throw error;
  }
  return proc;
}

/** What {@linkcode withServer} hands its body. */
export interface PoolServer {
  /** The server's pool, fresh from {@linkcode randomPool}. */
  range: [number, number];
  /** A unique abstract name (`@…`). */
  address: string;
  server: Proc;
}

/**
 * Runs `body` with our server serving a fresh pool of `size` ports on a
 * unique abstract name (`name` is its prefix), and stops the server however
 * `body` ends.
 */
export async function withServer(
  options: { size: number; name: string; args?: string[] },
  body: (started: PoolServer) => Promise<void>,
): Promise<void> {
  const range = await randomPool(options.size);
  const address = uniqueName(options.name);
  const server = await startServer([
    "--pool",
    poolSpec(range),
    "--address",
    address,
    ...(options.args ?? []),
  ]);
  try {
    await body({ range, address, server });
  } finally {
    await server.stop();
    releaseRange(range);
  }
}

/**
 * Sends `signal` with process.kill (see {@linkcode statsOnSigusr1}) and waits
 * until the process has exited and its output is all read ("close").
 */
export function signalAndWait(
  proc: Proc,
  signal: NodeJS.Signals,
  timeoutMs = 15_000,
): Promise<{ code: number | null; signal: string | null }> {
  const child = proc.child;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`still running ${timeoutMs} ms after ${signal}`));
    }, timeoutMs);
    child.once("close", (code, signalName) => {
      clearTimeout(timer);
      resolve({ code, signal: signalName });
    });
    process.kill(child.pid!, signal);
  });
}

/** Whether `proc` is still running. */
export function alive(proc: Proc): boolean {
  return proc.child.exitCode === null && proc.child.signalCode === null;
}

/** The node:net path of `@name` (abstract) or a socket file path. */
export function socketPath(address: string): string {
  return address.startsWith("@") ? `\0${address.slice(1)}` : address;
}

/** What the server did with one raw connection. */
export interface Exchange {
  /** Every byte the server wrote. */
  bytes: Buffer;
  /** Milliseconds from the connect to the close. */
  ms: number;
  /** A socket error seen on the way (ECONNRESET, EPIPE), if any. */
  error?: string;
}

/**
 * Connects to `address`, sends `payload` (a string, bytes, or timed pieces),
 * half-closes only when `end` is set, and collects what the server writes
 * until the connection closes. Rejects if it is still open after `timeoutMs`.
 */
export function exchange(
  address: string,
  payload: string | Uint8Array | { delayMs: number; pieces: string[] },
  options: { end?: boolean; timeoutMs?: number } = {},
): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    const began = performance.now();
    const chunks: Buffer[] = [];
    let error: string | undefined;
    let closed = false;
    const socket = connect({ path: socketPath(address) }, async () => {
      if (typeof payload === "string" || payload instanceof Uint8Array) {
        if (payload.length) socket.write(payload);
      } else {
        for (const piece of payload.pieces) {
          if (closed) break;
          socket.write(piece);
          await new Promise((r) => setTimeout(r, payload.delayMs));
        }
      }
      if (options.end && !closed) socket.end();
    });
    const deadline = setTimeout(() => {
      socket.destroy();
      reject(new Error(`connection still open after ${options.timeoutMs} ms`));
    }, options.timeoutMs ?? 10_000);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", (e: Error & { code?: string }) => {
      error = e.code ?? e.message;
    });
    socket.on("close", () => {
      closed = true;
      clearTimeout(deadline);
      resolve({
        bytes: Buffer.concat(chunks),
        ms: performance.now() - began,
        error,
      });
    });
  });
}

/**
 * Asks the server at `address` for a port for `pid`, as the Python client
 * does (`pid\n`, no half-close). The reply must be empty or exactly a port
 * and a newline; returns the port, or undefined for an empty reply.
 */
export async function askPort(
  address: string,
  pid: number,
): Promise<number | undefined> {
  const { bytes, error } = await exchange(address, `${pid}\n`);
  const text = bytes.toString("latin1");
  if (text === "") return undefined;
  if (!/^\d+\n$/.test(text)) {
    throw new Error(`bad reply ${JSON.stringify(text)} (${error})`);
  }
  return Number(text.trim());
}

/** Asks for ports for `pid` until the server gives none; the ports given. */
export async function drain(address: string, pid: number): Promise<number[]> {
  const ports: number[] = [];
  for (let i = 0; i < 100_000; i++) {
    const port = await askPort(address, pid);
    if (port === undefined) return ports;
    ports.push(port);
  }
  throw new Error("the server never ran out of ports");
}

/** A live process that owns nothing and waits to be killed. */
export function sleeper(): Proc {
  return start(["sleep", "600"]);
}

/**
 * The start time of `pid` from /proc/<pid>/stat (field 22, clock ticks since
 * boot), read here independently of the server's code.
 */
export function startTimeOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[19]);
}

/** The server's statistics, as logged on SIGUSR1 or on stop. */
export interface LoggedStats {
  "client-request-errors": number;
  "denied-allocations": number;
  "num-ports-managed": number;
  "num-ports-checked-for-last-request": number;
  "total-allocations": number;
  "num-ports-allocated": number;
}

/** Every statistics block the server has logged so far, oldest first. */
export function loggedStats(proc: Proc): LoggedStats[] {
  const blocks = proc.stderr().split(/Dumping statistics:\n/).slice(1);
  return blocks.map((block) => {
    const stats: Record<string, number> = {};
    for (const m of block.matchAll(/portserver\] ([a-z-]+) (\d+)$/gm)) {
      stats[m[1]] ??= Number(m[2]);
    }
    return stats as unknown as LoggedStats;
  });
}

/** Sends SIGUSR1 and returns the statistics block it made the server log. */
export async function statsOnSigusr1(proc: Proc): Promise<LoggedStats> {
  const before = loggedStats(proc).length;
  // Not proc.child.kill: Deno's node:child_process then sets signalCode as
  // if the child had died of SIGUSR1, and Proc.stop() would no longer kill it.
  process.kill(proc.child.pid!, "SIGUSR1");
  const began = Date.now();
  while (Date.now() - began < 10_000) {
    const blocks = loggedStats(proc);
    if (blocks.length > before && "num-ports-allocated" in blocks[before]) {
      return blocks[before];
    }
    await delay(20);
  }
  throw new Error(`no statistics after SIGUSR1; stderr: ${proc.stderr()}`);
}

/** Resolves after `ms`; a shorthand. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------
// In-process servers (startPortServer), the two kinds of address, and raw
// extended requests.

import { join as joinPath } from "node:path";
import {
  type PortServer,
  type PortServerOptions,
  startPortServer,
} from "../portserver.ts";
import { tempDir as makeTempDir } from "./helpers.ts";

/** The two kinds of address a server listens on, for tests run on each. */
export const ADDRESS_KINDS = ["abstract name", "socket file"] as const;

/** One of {@linkcode ADDRESS_KINDS}. */
export type AddressKind = typeof ADDRESS_KINDS[number];

/**
 * A fresh address of `kind` (`name` is its prefix): a unique `@name`, or a
 * socket file in a new folder that `remove()` deletes.
 */
export function freshAddress(
  kind: AddressKind,
  name: string,
): { address: string; remove(): void } {
  if (kind === "abstract name") {
    return { address: uniqueName(name), remove: () => {} };
  }
  const dir = makeTempDir();
  return { address: joinPath(dir.path, `${name}.sock`), remove: dir.remove };
}

/** What {@linkcode withInProcessServer} hands its body. */
export interface InProcessServer {
  server: PortServer;
  /** The server's pool, fresh from {@linkcode randomPool}. */
  range: [number, number];
  address: string;
  /** Every line the server has logged so far. */
  log: string[];
  /** Resolves with the first logged line that matches `pattern`. */
  waitForLog(pattern: RegExp, timeoutMs?: number): Promise<string>;
}

/**
 * Runs `body` with {@linkcode startPortServer} serving, in this process, a
 * fresh pool of `size` ports on a fresh address of `kind` (default an
 * abstract name; `name` is its prefix), its log kept instead of printed;
 * stops the server however `body` ends. `options` go to startPortServer.
 */
export async function withInProcessServer(
  setup: {
    size: number;
    name: string;
    kind?: AddressKind;
    options?: Omit<PortServerOptions, "address" | "pool" | "log">;
  },
  body: (started: InProcessServer) => Promise<void>,
): Promise<void> {
  const range = await randomPool(setup.size);
  const where = freshAddress(setup.kind ?? "abstract name", setup.name);
  const log: string[] = [];
  const waiters = new Set<() => void>();
  let server: PortServer | undefined;
  try {
    server = await startPortServer({
      ...setup.options,
      address: where.address,
      pool: [range],
      log: (line) => {
        log.push(line);
        for (const wake of waiters) wake();
      },
    });
    const waitForLog = (pattern: RegExp, timeoutMs = 15_000) =>
      new Promise<string>((resolve, reject) => {
        const check = () => {
          const line = log.find((l) => pattern.test(l));
          if (line === undefined) return;
          done();
          resolve(line);
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`no log line ${pattern}; log:\n${log.join("\n")}`));
        }, timeoutMs);
        const done = () => {
          clearTimeout(timer);
          waiters.delete(check);
        };
        waiters.add(check);
        check();
      });
    await body({ server, range, address: where.address, log, waitForLog });
  } finally {
    await server?.stop();
    where.remove();
    releaseRange(range);
  }
}

/**
 * Sends one request line (newline included) as is, without half-closing,
 * and returns all the server wrote until it closed, as text.
 */
export async function sendRequest(
  address: string,
  request: string | { delayMs: number; pieces: string[] },
): Promise<string> {
  const { bytes } = await exchange(address, request);
  return bytes.toString("latin1");
}

/** The ports of an `OK p1 p2 ...\n` reply; fails on anything else. */
export function okPorts(reply: string): number[] {
  if (!/^OK \d+( \d+)*\n$/.test(reply)) {
    throw new Error(`not an OK reply: ${JSON.stringify(reply)}`);
  }
  return reply.trim().split(" ").slice(1).map(Number);
}

/** A connection kept open after its first reply line: a lease. */
export interface OpenConnection {
  /** The first line the server wrote, newline included. */
  reply: string;
  /** Closes the connection, and resolves once it is closed. */
  close(): Promise<void>;
}

/** Sends `request` and keeps the connection open once a line has come back. */
export function openConnection(
  address: string,
  request: string,
): Promise<OpenConnection> {
  return new Promise((resolve, reject) => {
    let got = "";
    const socket = connect(
      { path: socketPath(address) },
      () => socket.write(request),
    );
    const closed = new Promise<void>((r) => socket.once("close", () => r()));
    socket.on("data", (chunk: Buffer) => {
      got += chunk.toString("latin1");
      if (!got.includes("\n")) return;
      resolve({
        reply: got,
        close: () => (socket.destroy(), closed),
      });
    });
    socket.on("error", reject);
    socket.once("close", () => reject(new Error(`closed after ${got}`)));
  });
}

/**
 * Asks for the statistics (SIGUSR1) until `predicate` holds for them; the
 * block that made it hold. For a server process still busy with clients.
 */
export async function statsWhen(
  proc: Proc,
  predicate: (stats: LoggedStats) => boolean,
  timeoutMs = 15_000,
): Promise<LoggedStats> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const stats = await statsOnSigusr1(proc);
    if (predicate(stats)) return stats;
    if (Date.now() > deadline) {
      throw new Error(`statistics never matched: ${JSON.stringify(stats)}`);
    }
  }
}

// ---------------------------------------------------------------------------
// A server that must not start, and the server's rate-limited warnings.

import type { RunResult } from "./helpers.ts";

/**
 * Runs `cli.ts serve args...` as {@linkcode startServer} does, for a start
 * that must fail: resolves with how it exited and what it printed. Rejects
 * at once if it logs "Serving on", or if it still runs after `timeoutMs`.
 */
export function serveFailure(
  args: string[],
  timeoutMs = 15_000,
): Promise<RunResult> {
  const proc = start([...runtimeCommand("cli.ts"), "serve", ...args], {
    PORTSERVER_ADDRESS: undefined,
    PORTPICKER_LOCK_DIR: undefined,
  });
  const what = `serve ${args.join(" ")}`.slice(0, 300);
  return new Promise((resolve, reject) => {
    const fail = (why: string) => {
      clearTimeout(timer);
      void proc.stop("SIGKILL");
      reject(new Error(`${what}: ${why}; stderr: ${proc.stderr()}`));
    };
    const timer = setTimeout(
      () => fail(`still running after ${timeoutMs} ms`),
      timeoutMs,
    );
    proc.waitFor(/Serving on/, timeoutMs).then(
      () => fail("it started serving"),
      () => {/* exited first, or the timer above fails it */},
    );
    proc.child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
      });
    });
  });
}

/**
 * The server's warning lines in `log` (its stderr, or a part of it) whose
 * message matches `message`, and how many events they stand for: a
 * warning is logged once, and its repeats within the interval once, as
 * `<message> (and N more like it in the last 10 s)`.
 */
export function warningsLogged(
  log: string,
  message: RegExp,
): { lines: string[]; count: number } {
  const lines = log.split("\n").filter((line) =>
    /^W\d{4} [\d:.]+ \d+ portserver\] /.test(line) && message.test(line)
  );
  const count = lines.reduce((sum, line) => {
    const more = /\(and (\d+) more like it in the last \d+ s\)$/.exec(line);
    return sum + (more ? Number(more[1]) : 1);
  }, 0);
  return { lines, count };
}
