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
