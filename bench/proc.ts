/**
 * Child processes for the bench: every process started here is tracked, so
 * that a failed or interrupted run still kills all of them (`killAll`).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

/** The repository's root folder. */
export const ROOT: string = join(
  dirname(fileURLToPath(import.meta.url)),
  "..",
);

/** Debian's Python, the one with the portpicker module. */
export const PYTHON = "/usr/bin/python3";
/** Debian's Python port server. */
export const PYTHON_PORTSERVER = "/usr/bin/portserver";

/** A tool pinned in node_modules/.bin, else the one on PATH. */
export function tool(name: string): string {
  const local = join(ROOT, "node_modules", ".bin", name);
  return existsSync(local) ? local : name;
}

/**
 * The environment for every child: without PORTSERVER_ADDRESS, so that no
 * picker asks a port server the bench did not start.
 */
function childEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (value !== undefined && key !== "PORTSERVER_ADDRESS") env[key] = value;
  }
  return env;
}

const live = new Set<ChildProcess>();

/** Kills every child still running (SIGKILL: the bench needs nothing back). */
export function killAll(): void {
  for (const child of live) {
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }
  live.clear();
}

/** How a finished process ended and what it printed. */
export interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  /** Wall time from spawn to exit, in milliseconds. */
  wallMs: number;
}

/** Options of {@linkcode run}. */
export interface RunOptions {
  /** Killed after this long; default 10 minutes. */
  timeoutMs?: number;
  /** Default: the repository's root. */
  cwd?: string;
  /**
   * Called when the process prints `warm` on a line of its own; then it is
   * sent a line on stdin, its go-ahead (see load.ts's `--handshake`).
   */
  onWarm?: () => void;
  /** Written to its stdin, then closed. */
  input?: string;
}

/** Runs a command to its end. */
export function run(
  command: string[],
  options: RunOptions = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const began = performance.now();
    const child = spawn(command[0], command.slice(1), {
      cwd: options.cwd ?? ROOT,
      env: childEnv(),
      stdio: [
        options.onWarm || options.input !== undefined ? "pipe" : "ignore",
        "pipe",
        "pipe",
      ],
    });
    live.add(child);
    if (options.input !== undefined) child.stdin!.end(options.input);
    let stdout = "";
    let stderr = "";
    let warm = false;
    child.stdout!.on("data", (chunk) => {
      stdout += chunk;
      if (!warm && options.onWarm && /^warm$/m.test(stdout)) {
        warm = true;
        options.onWarm();
        child.stdin!.end("go\n");
      }
    });
    child.stderr!.on("data", (chunk) => stderr += chunk);
    const timer = setTimeout(
      () => child.kill("SIGKILL"),
      options.timeoutMs ?? 600_000,
    );
    child.on("error", (error) => {
      clearTimeout(timer);
      live.delete(child);
      reject(error);
    });
    child.on("close", (code, signal) => {
      const wallMs = performance.now() - began;
      clearTimeout(timer);
      live.delete(child);
      resolve({ code, signal, stdout, stderr, wallMs });
    });
  });
}

/** Runs a command that prints one JSON object; throws unless it exits 0. */
export async function runJson<T>(
  command: string[],
  options: RunOptions = {},
): Promise<T> {
  const result = await run(command, options);
  if (result.code !== 0) {
    throw new Error(
      `${command.join(" ")} exited ${result.code ?? result.signal}: ${
        lastLines(result.stderr + result.stdout)
      }`,
    );
  }
  try {
    return JSON.parse(result.stdout.trim().split("\n").at(-1)!) as T;
  } catch {
    throw new Error(
      `${command.join(" ")} printed no JSON: ${lastLines(result.stdout)}`,
    );
  }
}

/** The last few lines of a process's output, for an error message. */
export function lastLines(text: string, count = 5): string {
  return text.trim().split("\n").slice(-count).join(" | ");
}

/** A process that outlives the call that started it. */
export interface Background {
  readonly pid: number;
  /** Resolves once it has exited and been reaped. */
  readonly exited: Promise<void>;
  /** Sends `signal` and waits until it is reaped. */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts a background process. Its stderr and stdout go to `logFile` (when
 * given), not through a pipe: a server that logs each request must not cost
 * the bench's own process any CPU time while it is being measured.
 */
export function startBackground(
  command: string[],
  logFile?: string,
): Background {
  const fd = logFile === undefined ? "ignore" : openSync(logFile, "a");
  const child = spawn(command[0], command.slice(1), {
    cwd: ROOT,
    env: childEnv(),
    stdio: ["ignore", fd, fd],
  });
  if (typeof fd === "number") closeSync(fd);
  live.add(child);
  const exited = new Promise<void>((resolve) => {
    child.on("error", () => resolve());
    child.on("exit", () => {
      live.delete(child);
      resolve();
    });
  });
  if (child.pid === undefined) throw new Error(`cannot start ${command[0]}`);
  return {
    pid: child.pid,
    exited,
    async stop(signal: NodeJS.Signals = "SIGKILL") {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill(signal);
      }
      await exited;
    },
  };
}

/** A process that sleeps for ten minutes: a live pid to hold ports for. */
export function startSleeper(): Background {
  return startBackground(["sleep", "600"]);
}

/**
 * Waits until `pattern` appears in `logFile`, or fails when the process
 * exits first or `timeoutMs` passes.
 */
export async function waitForLog(
  proc: Background,
  logFile: string,
  pattern: RegExp,
  timeoutMs = 30_000,
): Promise<void> {
  let exited = false;
  proc.exited.then(() => exited = true);
  const deadline = performance.now() + timeoutMs;
  while (true) {
    const text = existsSync(logFile) ? readFileSync(logFile, "utf8") : "";
    if (pattern.test(text)) return;
    if (exited || performance.now() > deadline) {
      throw new Error(
        `${exited ? "exited" : "timed out"} before logging ${pattern}: ${
          lastLines(text)
        }`,
      );
    }
    await sleep(10);
  }
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The peak resident set size of a live process (VmHWM), in KiB. */
export function peakRssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const match = /^VmHWM:\s+(\d+) kB$/m.exec(status);
  if (!match) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(match[1]);
}

/**
 * The CPU time a live process has used so far (user and system), in clock
 * ticks (see `getconf CLK_TCK`).
 */
export function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields after the command name, which may hold spaces: state is field 3,
  // utime and stime are fields 14 and 15.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}
