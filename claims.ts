/**
 * Who owns a port: process start times (to tell a live owner from a dead or
 * reused pid), and claims in a lock directory, which keep ports unique across
 * processes without a daemon.
 *
 * @module
 */

// deno-lint-ignore no-explicit-any
const runtime = globalThis as any;
const deno: typeof Deno | undefined = runtime.Deno;

/** Whether this runs on Linux, where `/proc/<pid>/stat` tells start times. */
export const isLinux: boolean = deno
  ? deno.build.os === "linux"
  : runtime.process?.platform === "linux";

type Fs = typeof import("node:fs");
let fsModule: Fs | undefined;
/** node:fs, loaded synchronously (every supported runtime has this call). */
function fs(): Fs {
  return fsModule ??= runtime.process.getBuiltinModule("node:fs") as Fs;
}

function errorCode(error: unknown): string | undefined {
  return (error as { code?: string } | undefined)?.code;
}

/**
 * The start time of `pid` (Linux: clock ticks since boot, from
 * `/proc/<pid>/stat`), or 0 when no live process has that pid. Zombies count
 * as dead. Elsewhere: 1 while the pid exists, so reuse goes undetected.
 *
 * @param pid The process.
 * @returns Its start time, or 0 for none.
 * @throws {Error} When `/proc` cannot be read (say, no Deno permission):
 * that must not make every owner look dead.
 *
 * @example
 * ```ts
 * import { processStartTime } from "@x/portpicker/claims";
 *
 * console.log(processStartTime(1) > 0); // true
 * ```
 */
export function processStartTime(pid: number): number {
  if (!Number.isInteger(pid) || pid <= 0) return 0;
  if (!isLinux) {
    try {
      runtime.process.kill(pid, 0);
      return 1;
    } catch (error) {
      return errorCode(error) === "EPERM" ? 1 : 0;
    }
  }
  let stat: string;
  try {
    // Deno's own call is the faster of the two there.
    stat = deno
      ? deno.readTextFileSync(`/proc/${pid}/stat`)
      : fs().readFileSync(`/proc/${pid}/stat`, "utf8");
  } catch (error) {
    const code = errorCode(error);
    if (code === "ENOENT" || code === "ESRCH") return 0;
    throw error;
  }
  // The command name may hold spaces and parentheses: fields follow the last ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  if (fields[0] === "Z" || fields[0] === "X") return 0;
  return Number(fields[19]) || 1;
}

let ownStart: number | undefined;
function ownPid(): number {
  return deno ? deno.pid : runtime.process.pid;
}

/** The text a claim file holds: the owner's pid and start time. */
function claimText(): string {
  ownStart ??= processStartTime(ownPid());
  return `${ownPid()} ${ownStart}\n`;
}

/** Whether the claim text names a process that is still alive. */
function ownerAlive(text: string): boolean {
  const match = /^(\d+) (\d+)\n$/.exec(text);
  // Unreadable: never judge a claim we do not understand as stale.
  if (!match) return true;
  return processStartTime(Number(match[1])) === Number(match[2]);
}

/** Claims this process holds: port → claim file. */
const held = new Map<number, string>();
let exitHookInstalled = false;

function claimPath(dir: string, port: number): string {
  return `${dir}/${port}.claim`;
}

function readOrUndefined(path: string): string | undefined {
  try {
    return fs().readFileSync(path, "utf8");
  } catch (error) {
    if (errorCode(error) === "ENOENT") return undefined;
    throw error;
  }
}

/**
 * Claims `port` in `dir` for this process: a file made with all its content
 * at once (written aside, then hard-linked into place, which fails if the
 * file exists). A claim whose owner has died is reclaimed.
 *
 * @param dir The lock directory, made if missing.
 * @param port The port.
 * @returns Whether this process now holds the claim.
 *
 * @example
 * ```ts
 * import { claimPort, releaseClaim } from "@x/portpicker/claims";
 *
 * if (claimPort("/tmp/ports", 20000)) releaseClaim(20000);
 * ```
 */
export function claimPort(dir: string, port: number): boolean {
  const f = fs();
  const path = claimPath(dir, port);
  const mine = claimText();
  const draft = `${dir}/.draft-${ownPid()}-${port}-${
    Math.random().toString(36).slice(2)
  }`;
  try {
    f.writeFileSync(draft, mine);
  } catch (error) {
    if (errorCode(error) !== "ENOENT") throw error;
    f.mkdirSync(dir, { recursive: true });
    f.writeFileSync(draft, mine);
  }
  installExitHook();
  try {
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        f.linkSync(draft, path);
        held.set(port, path);
        return true;
      } catch (error) {
        if (errorCode(error) !== "EEXIST") throw error;
      }
      const seen = readOrUndefined(path);
      if (seen === undefined) continue;
      if (ownerAlive(seen)) return false;
      // Stale: take it over under a per-port lock, after a second look, by
      // renaming the draft over it, so the claim file never goes missing.
      const lock = `${path}.takeover`;
      if (!lockTakeover(lock)) return false;
      try {
        const again = readOrUndefined(path);
        if (again === undefined) continue; // released meanwhile: link again
        if (ownerAlive(again)) return false;
        f.renameSync(draft, path);
        held.set(port, path);
        return true;
      } finally {
        f.rmSync(lock, { recursive: true, force: true });
      }
    }
    return false;
  } finally {
    f.rmSync(draft, { force: true });
  }
}

/** A takeover lock older than this was left by a process that died in it. */
const TAKEOVER_TIMEOUT_MS = 10_000;

/** Takes the takeover lock of a claim; false while another process has it. */
function lockTakeover(lock: string): boolean {
  const f = fs();
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      f.mkdirSync(lock);
      return true;
    } catch (error) {
      if (errorCode(error) !== "EEXIST") throw error;
    }
    try {
      if (Date.now() - f.statSync(lock).mtimeMs < TAKEOVER_TIMEOUT_MS) {
        return false;
      }
      f.rmSync(lock, { recursive: true, force: true });
    } catch { /* gone meanwhile: try again */ }
  }
  return false;
}

/**
 * Removes this process's claim on `port`, if it has one and the file is still
 * its own.
 *
 * @param port The port.
 *
 * @example
 * ```ts
 * import { releaseClaim } from "@x/portpicker/claims";
 *
 * releaseClaim(20000);
 * ```
 */
export function releaseClaim(port: number): void {
  const path = held.get(port);
  if (path === undefined) return;
  held.delete(port);
  try {
    if (fs().readFileSync(path, "utf8") === claimText()) fs().unlinkSync(path);
  } catch { /* gone already, or not ours to remove */ }
}

/** Claims are removed at a normal exit; after a crash they go stale. */
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  const releaseAll = () => {
    for (const port of [...held.keys()]) releaseClaim(port);
  };
  if (deno) globalThis.addEventListener("unload", releaseAll);
  else runtime.process.on("exit", releaseAll);
}

let reserved: Set<number> | undefined;

/**
 * Linux's `ip_local_reserved_ports`: ports the kernel never hands out and
 * this picker never returns. Empty elsewhere, and on Deno without read access
 * to that file.
 *
 * @returns The reserved ports, read once.
 *
 * @example
 * ```ts
 * import { reservedPorts } from "@x/portpicker/claims";
 *
 * console.log(reservedPorts().has(8080));
 * ```
 */
export function reservedPorts(): Set<number> {
  if (reserved) return reserved;
  reserved = new Set();
  const path = "/proc/sys/net/ipv4/ip_local_reserved_ports";
  if (!isLinux) return reserved;
  if (
    deno &&
    deno.permissions.querySync({ name: "read", path }).state !== "granted"
  ) {
    return reserved;
  }
  let text = "";
  try {
    text = deno ? deno.readTextFileSync(path) : fs().readFileSync(path, "utf8");
  } catch {
    return reserved;
  }
  for (const [first, last] of parseRangeList(text)) {
    for (let port = first; port <= last; port++) reserved.add(port);
  }
  return reserved;
}

/**
 * The kernel's ephemeral range (`ip_local_port_range`), or undefined where it
 * cannot be read.
 *
 * @returns `[first, last]`, inclusive.
 *
 * @example
 * ```ts
 * import { ephemeralRange } from "@x/portpicker/claims";
 *
 * console.log(ephemeralRange()); // [32768, 60999] on most Linux hosts
 * ```
 */
export function ephemeralRange(): [number, number] | undefined {
  if (!isLinux) return undefined;
  try {
    const text = fs().readFileSync(
      "/proc/sys/net/ipv4/ip_local_port_range",
      "utf8",
    );
    const [first, last] = text.trim().split(/\s+/).map(Number);
    return Number.isInteger(first) && Number.isInteger(last)
      ? [first, last]
      : undefined;
  } catch {
    return undefined;
  }
}

/** Parses the kernel's `8080,9000-9100` lists. */
function parseRangeList(text: string): [number, number][] {
  const out: [number, number][] = [];
  for (const part of text.trim().split(",")) {
    const match = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (match) out.push([Number(match[1]), Number(match[2] ?? match[1])]);
  }
  return out;
}
