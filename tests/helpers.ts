/**
 * Shared by the tests: real processes and real sockets, on whichever of Deno,
 * Bun or Node runs the test.
 */

import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { isPortFree } from "../mod.ts";

// deno-lint-ignore no-explicit-any
const g = globalThis as any;

/** The repository's root folder. */
export const ROOT: string = join(dirname(fileURLToPath(import.meta.url)), "..");

/** Which runtime runs this test. */
export const RUNTIME: "deno" | "bun" | "node" = g.Deno
  ? "deno"
  : g.Bun
  ? "bun"
  : "node";

/** Debian's Python port server and client: the peer the tests need. */
export const PYTHON_PORTSERVER = "/usr/bin/portserver";
/** Debian's Python, which has the portpicker module (PATH may have another). */
export const PYTHON = "/usr/bin/python3";

/** Fails loudly when Debian's python3-portpicker is missing. */
export function requirePython(): void {
  if (!existsSync(PYTHON_PORTSERVER)) {
    throw new Error(
      "Debian's python3-portpicker is not installed (apt-get install python3-portpicker): .ci/run installs it",
    );
  }
}

/**
 * How the README compiles the CLI to one binary: minified and as bytecode,
 * which halves the binary's start-up time. Append `--outfile PATH`.
 */
export const COMPILE_ARGS: readonly string[] = [
  "build",
  "--compile",
  "--minify",
  "--bytecode",
  "--format=esm",
  join(ROOT, "cli.ts"),
];

/** A tool from node_modules/.bin, else from PATH. */
export function tool(name: string): string {
  const local = join(ROOT, "node_modules", ".bin", name);
  return existsSync(local) ? local : name;
}

/** The command that runs a script of this repo on the runtime running the test. */
export function runtimeCommand(script: string): string[] {
  return scriptCommand(join(ROOT, script));
}

/** What a finished process printed, and how it ended. */
export interface RunResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end (killed after `timeoutMs`). */
export function run(
  command: string[],
  options: {
    env?: Record<string, string | undefined>;
    timeoutMs?: number;
    input?: string;
  } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command[0], command.slice(1), {
      env: { ...process.env, ...options.env } as Record<string, string>,
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (c) => stdout += c);
    child.stderr!.on("data", (c) => stderr += c);
    const timer = setTimeout(
      () => child.kill("SIGKILL"),
      options.timeoutMs ?? 60_000,
    );
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    // A child that exits before reading its input must not fail the test
    // with EPIPE: its exit code and output say what happened.
    child.stdin!.on("error", () => {});
    child.stdin!.end(options.input ?? "");
  });
}

/** Runs this repo's CLI on the runtime running the test. */
export function runCli(
  args: string[],
  options: { env?: Record<string, string | undefined>; timeoutMs?: number } =
    {},
): Promise<RunResult> {
  return run([...runtimeCommand("cli.ts"), ...args], {
    ...options,
    // No claims in the user's lock directory unless a test asks: the CLI
    // claims for its parent, this test process, which outlives the test.
    env: {
      PORTSERVER_ADDRESS: undefined,
      PORTPICKER_LOCK_DIR: "",
      ...options.env,
    },
  });
}

/**
 * Exit `code`, nothing on stdout, one line on stderr (`portpicker: …`, or
 * `portpicker COMMAND: …`), no stack trace.
 */
export function assertOneLineError(
  result: RunResult,
  code: number,
  what: string,
  command?: string,
): void {
  assert.equal(
    result.code,
    code,
    `${what}: exit ${result.code} ${result.stderr}`,
  );
  assert.equal(result.stdout, "", what);
  assert.match(
    result.stderr,
    new RegExp(`^portpicker${command ? ` ${command}` : ""}: [^\\n]+\\n$`),
    `${what}: ${result.stderr}`,
  );
  assert.doesNotMatch(result.stderr, /^\s+at /m, what);
}

/** A long-running child process, started and stopped by a test. */
export interface Proc {
  child: ChildProcess;
  /** Everything it wrote to stderr so far. */
  stderr(): string;
  /** Everything it wrote to stdout so far. */
  stdout(): string;
  /** Resolves once `pattern` shows in its stdout or stderr. */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<void>;
  /** Sends `signal` and waits for the exit. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Starts a process that outlives this call. */
export function start(
  command: string[],
  env: Record<string, string | undefined> = {},
): Proc {
  const child = spawn(command[0], command.slice(1), {
    env: { ...process.env, ...env } as Record<string, string>,
    stdio: ["pipe", "pipe", "pipe"],
  });
  child.stdin!.on("error", () => {});
  let out = "";
  let err = "";
  const waiters = new Set<() => void>();
  const wake = () => waiters.forEach((w) => w());
  child.stdout!.on("data", (c) => {
    out += c;
    wake();
  });
  child.stderr!.on("data", (c) => {
    err += c;
    wake();
  });
  let closed = false;
  // "close", not "exit": by then all of its output has been read.
  const exited = new Promise<number | null>((resolve) => {
    child.on("close", (code) => {
      closed = true;
      wake();
      resolve(code);
    });
  });
  return {
    child,
    stderr: () => err,
    stdout: () => out,
    waitFor(pattern, timeoutMs = 15_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          if (pattern.test(out) || pattern.test(err)) {
            done();
            resolve();
          } else if (closed) {
            done();
            reject(new Error(`exited before ${pattern}: ${err}${out}`));
          }
        };
        const timer = setTimeout(() => {
          done();
          reject(new Error(`timed out waiting for ${pattern}; stderr: ${err}`));
        }, timeoutMs);
        const done = () => {
          clearTimeout(timer);
          waiters.delete(check);
        };
        waiters.add(check);
        check();
      });
    },
    async stop(signal = "SIGTERM") {
      // process.kill, not child.kill: Deno's node:child_process marks the
      // child as dead of any signal sent that way, even one it survives.
      if (!closed) {
        try {
          process.kill(child.pid!, signal);
        } catch { /* exited meanwhile */ }
      }
      return await exited;
    },
  };
}

/**
 * Resolves with the exit code once `proc` has exited (its "exit", not its
 * "close": a detached child it started may still hold its output pipes);
 * fails after `timeoutMs`.
 */
export function exitCodeOf(
  proc: Proc,
  timeoutMs: number,
): Promise<number | null> {
  const child = proc.child;
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve(child.exitCode);
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`still running after ${timeoutMs} ms`)),
      timeoutMs,
    );
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

/** Kinds of socket that a test can hold a port with, from a Python process. */
export type HoldKind = "tcp4" | "tcp6only" | "udp4" | "udp6only" | "dual";

/**
 * Python lines that make \`s\`, an unbound socket of the \`kind\` in
 * argv[1], for the \`port\` in argv[2].
 */
const PYTHON_SOCKET_OF_KIND = `
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET if kind in ("tcp4", "udp4") else socket.AF_INET6
typ = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
s = socket.socket(fam, typ)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if kind.endswith("6only") else 0)
`;

/**
 * Holds `port` (0: a port of the kernel's choice) with a socket of `kind`
 * in a separate Python process, until `release()`.
 */
export async function holdWithPython(
  kind: HoldKind,
  port = 0,
): Promise<{ port: number; release(): Promise<void> }> {
  const script = `${PYTHON_SOCKET_OF_KIND}
s.bind(("", port))
if typ == socket.SOCK_STREAM:
    s.listen(1)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
`;
  const proc = start([PYTHON, "-c", script, kind, String(port)]);
  await proc.waitFor(/^\d+\n/);
  return {
    port: Number(proc.stdout().trim()),
    release: async () => void await proc.stop("SIGKILL"),
  };
}

/**
 * Holds many ports at once from one Python process (TCP and UDP, dual-stack).
 */
export async function holdManyWithPython(
  ports: number[],
): Promise<{ release(): Promise<void> }> {
  const script = `
import socket, sys
held = []
for p in map(int, sys.argv[1:]):
    for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, typ)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("", p))
        if typ == socket.SOCK_STREAM:
            s.listen(1)
        held.append(s)
print("held", flush=True)
sys.stdin.read()
`;
  const proc = start([PYTHON, "-c", script, ...ports.map(String)]);
  await proc.waitFor(/held/);
  return { release: async () => void await proc.stop("SIGKILL") };
}

/**
 * A port of the kernel's choice whose only socket is a connection in
 * TIME_WAIT (the server closed first), made by Python: a bind without
 * SO_REUSEADDR fails there, one with it succeeds (Python checks both). The
 * kernel's choice lies outside every test's region, so the 60 s of
 * TIME_WAIT never get in another test's way.
 */
export async function timeWaitWithPython(): Promise<number> {
  const script = `
import errno, socket
l = socket.socket(socket.AF_INET6)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("::", 0)); l.listen(1)
port = l.getsockname()[1]
c = socket.create_connection(("::1", port)); s, _ = l.accept()
s.close(); c.recv(1); c.close(); l.close()
plain = socket.socket(socket.AF_INET6)
try:
    plain.bind(("::", port)); raise SystemExit("no TIME_WAIT on %d" % port)
except OSError as e:
    if e.errno != errno.EADDRINUSE: raise
reuse = socket.socket(socket.AF_INET6)
reuse.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
reuse.bind(("::", port)); reuse.listen(1); reuse.close()
print(port)
`;
  const result = await run([PYTHON, "-c", script]);
  if (result.code !== 0) throw new Error(`TIME_WAIT: ${result.stderr}`);
  return Number(result.stdout.trim());
}

/** A unique abstract socket name for one test. */
/** A unique abstract socket name for one test. */
export function uniqueName(prefix: string): string {
  return `@${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 10)}`;
}

/** Starts Debian's Python port server on `address` with `pool`. */
export async function startPythonPortserver(
  address: string,
  pool: string,
): Promise<Proc> {
  requirePython();
  const proc = start([
    PYTHON,
    PYTHON_PORTSERVER,
    `--portserver_address=${address}`,
    `--portserver_static_pool=${pool}`,
  ]);
  await proc.waitFor(/Serving on/);
  return proc;
}

/** The pid of the detached process that holds `port` for `seconds`. */
export function holderOf(port: number, seconds: number): number | undefined {
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let args: string[];
    try {
      args = readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0");
    } catch {
      continue;
    }
    const at = args.indexOf("__portpicker_hold__");
    if (
      at >= 0 && args[at + 1] === String(seconds) &&
      args[at + 2] === String(port)
    ) {
      return Number(name);
    }
  }
  return undefined;
}

/** Kills the process that holds `port` for `seconds`, if any. */
export function killHolder(port: number, seconds: number): void {
  const pid = holderOf(port, seconds);
  if (pid) process.kill(pid, "SIGKILL");
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** mod.ts as a file URL, for scripts written by the tests. */
export const MOD_URL: string = pathToFileURL(join(ROOT, "mod.ts")).href;

/** Makes a fresh temporary folder; `remove()` deletes it and what it holds. */
export function tempDir(
  prefix = "portpicker-test-",
): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** The command that runs a script at an absolute path on the runtime running the test. */
export function scriptCommand(path: string): string[] {
  if (RUNTIME === "deno") {
    // The suite without --unstable-net is what `deno test --allow-net` gives.
    const flags = process.env.PORTPICKER_TEST_NO_UNSTABLE
      ? []
      : ["--unstable-net"];
    return [g.Deno.execPath(), "run", "-A", "--no-config", ...flags, path];
  }
  return [process.execPath, path];
}

/**
 * Writes `code` to a temporary module and runs it to its end, on the runtime
 * running the test (or with `command`, given the script's path). The code can
 * import the library from {@linkcode MOD_URL}.
 */
export async function runScript(
  code: string,
  options: {
    env?: Record<string, string | undefined>;
    timeoutMs?: number;
    command?: (path: string) => string[];
  } = {},
): Promise<RunResult> {
  const dir = tempDir("portpicker-script-");
  try {
    const path = join(dir.path, "script.mts");
    writeFileSync(path, code);
    const command = (options.command ?? scriptCommand)(path);
    return await run(command, {
      timeoutMs: options.timeoutMs,
      env: { PORTSERVER_ADDRESS: undefined, ...options.env },
    });
  } finally {
    dir.remove();
  }
}

/**
 * The ports this test process may use for ranges and pools: `npm test` runs
 * the runtimes side by side, each in its own region (PORTPICKER_TEST_SLOT),
 * so that one runtime's tests never take another's ports. All lie below the
 * kernel's ephemeral range (32768 and up). 5000–14999 is left for the one
 * test that needs a 10,000-port pool (see {@linkcode exclusive}).
 */
export const TEST_PORTS: readonly [number, number] = ([
  [15000, 19999],
  [20000, 20499],
  [20500, 28999],
  [29000, 32767],
] as const)[Number(process.env.PORTPICKER_TEST_SLOT ?? 0) % 4];

/** The ranges handed out by {@linkcode freeRange} in this process. */
const usedRanges: [number, number][] = [];

/**
 * An inclusive range of `size` ports of {@linkcode TEST_PORTS}, overlapping
 * no range given before in this process (whose ports this process may still
 * hold). Ranges of up to 100 ports are also checked free now.
 */
export async function freeRange(size: number): Promise<[number, number]> {
  const [low, high] = TEST_PORTS;
  // First fit: Bun runs every test file in one process, and the large pools
  // need the room that ranges scattered at random would leave in pieces.
  let first = low;
  for (let attempt = 0; attempt < 400 && first + size - 1 <= high;) {
    const last = first + size - 1;
    const overlap = usedRanges.find(([a, b]) => first <= b && a <= last);
    if (overlap) {
      first = overlap[1] + 1;
      continue;
    }
    attempt++;
    let busy: number | undefined;
    for (let port = first; size <= 100 && port <= last; port++) {
      if (!(await isPortFree(port))) {
        busy = port;
        break;
      }
    }
    if (busy !== undefined) {
      first = busy + 1;
      continue;
    }
    usedRanges.push([first, last]);
    return [first, last];
  }
  throw new Error(`no free range of ${size} ports found in ${low}-${high}`);
}

/** Gives back a range of {@linkcode freeRange} whose ports are all let go. */
export function releaseRange(range: readonly [number, number]): void {
  const i = usedRanges.findIndex(([a, b]) => a === range[0] && b === range[1]);
  if (i >= 0) usedRanges.splice(i, 1);
}

/**
 * Runs `body` while no other test process runs a body under the same
 * `name`: for tests that need ports outside {@linkcode TEST_PORTS}. The lock
 * is a directory; one left by a killed process is taken over.
 */
export async function exclusive<T>(
  name: string,
  body: () => Promise<T>,
): Promise<T> {
  const lock = join(tmpdir(), `portpicker-test-${name}.lock`);
  while (true) {
    try {
      mkdirSync(lock);
      writeFileSync(join(lock, "pid"), String(process.pid));
      break;
    } catch (error) {
      if ((error as { code?: string }).code !== "EEXIST") throw error;
    }
    let owner = 0;
    try {
      owner = Number(readFileSync(join(lock, "pid"), "utf8"));
      process.kill(owner, 0);
    } catch {
      // No owner yet (being made), or a dead one: take over a dead one's.
      if (owner > 0) rmSync(lock, { recursive: true, force: true });
    }
    await sleep(50);
  }
  try {
    return await body();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

/** The ports from `range[0]` to `range[1]`. */
export function portsOf(range: readonly [number, number]): number[] {
  const out: number[] = [];
  for (let port = range[0]; port <= range[1]; port++) out.push(port);
  return out;
}

/**
 * Binds `port` at once on TCP (listening) and UDP, on IPv4 and IPv6-only,
 * from a Python process, then lets go. Resolves to null when all four binds
 * succeeded, else to the error Python reported.
 */
export async function bindAllFamiliesWithPython(
  port: number,
): Promise<string | null> {
  const script = `
import socket, sys
port = int(sys.argv[1])
held = []
try:
    for fam in (socket.AF_INET, socket.AF_INET6):
        for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(fam, typ)
            held.append(s)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("", port))
            if typ == socket.SOCK_STREAM:
                s.listen(1)
except OSError as e:
    print(f"{fam.name} {typ.name}: {e}")
    sys.exit(1)
print("ok")
`;
  const result = await run([PYTHON, "-c", script, String(port)]);
  return result.code === 0 && result.stdout === "ok\n"
    ? null
    : result.stdout + result.stderr;
}

/**
 * Whether a Python process can bind `port` with one socket of `kind` (TCP
 * sockets also listen); the socket is closed at once.
 */
export async function canBindWithPython(
  kind: HoldKind,
  port: number,
): Promise<boolean> {
  const script = `${PYTHON_SOCKET_OF_KIND}
try:
    s.bind(("", port))
    if typ == socket.SOCK_STREAM:
        s.listen(1)
except OSError as e:
    print(e)
    sys.exit(3)
print("bound")
`;
  const result = await run([PYTHON, "-c", script, kind, String(port)]);
  if (result.code === 0 && result.stdout === "bound\n") return true;
  if (result.code === 3) return false;
  throw new Error(
    `python bind check failed: exit ${result.code} ${result.stderr}`,
  );
}

/** The kinds of socket of {@linkcode HoldKind}, all of them. */
export const HOLD_KINDS: readonly HoldKind[] = [
  "tcp4",
  "tcp6only",
  "udp4",
  "udp6only",
  "dual",
];

/**
 * Resolves once `check()` is true, checking again on each turn of the event
 * loop: for a state that no event announces (a socket closed in the
 * background, say). Fails naming `what` after `timeoutMs`, a bound meant
 * only for a state that never comes.
 */
export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 15_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
}

/** {@linkcode assertOneLineError} for a subcommand: `portpicker COMMAND: …`. */
export function assertSubcommandError(
  result: RunResult,
  code: number,
  command: string,
  what: string,
): void {
  assertOneLineError(result, code, what, command);
}

/**
 * As {@linkcode scriptCommand}, but Deno gets only `denoFlags` (such as
 * `--allow-net`) where scriptCommand gives `-A`: the permissions a user
 * would give. Bun and Node have no permissions: there the flags are unused.
 */
export function scriptCommandAllowing(
  denoFlags: readonly string[],
  path: string,
): string[] {
  if (RUNTIME !== "deno") return [process.execPath, path];
  const flags = process.env.PORTPICKER_TEST_NO_UNSTABLE
    ? []
    : ["--unstable-net"];
  return [
    g.Deno.execPath(),
    "run",
    ...denoFlags,
    "--no-prompt",
    "--no-config",
    ...flags,
    path,
  ];
}

/** This repo's CLI with only `denoFlags` on Deno (see {@linkcode scriptCommandAllowing}). */
export function cliCommandAllowing(denoFlags: readonly string[]): string[] {
  return scriptCommandAllowing(denoFlags, join(ROOT, "cli.ts"));
}

/** As {@linkcode runCli}, with only `denoFlags` on Deno instead of `-A`. */
export function runCliAllowing(
  denoFlags: readonly string[],
  args: string[],
  options: { env?: Record<string, string | undefined>; timeoutMs?: number } =
    {},
): Promise<RunResult> {
  return run([...cliCommandAllowing(denoFlags), ...args], {
    ...options,
    env: {
      PORTSERVER_ADDRESS: undefined,
      PORTPICKER_LOCK_DIR: "",
      ...options.env,
    },
  });
}

/** A private network namespace, from {@linkcode privateNetwork}. */
export interface PrivateNetwork {
  /** Put before a command to run it in the namespace (`nsenter …`). */
  enter: string[];
  /** Ends the namespace's holding process. */
  close(): Promise<void>;
}

/**
 * A private network namespace (`unshare -n`: needs root, as CI has) whose
 * `ip_local_reserved_ports` is `reserved` (as `20000-20002,20005`). Ports
 * and abstract socket names in it are its own: no other test sees them.
 * Fails, naming the cause, where the namespace cannot be made.
 */
export async function privateNetwork(
  reserved: string,
): Promise<PrivateNetwork> {
  // unshare and sh exec in place: the pid stays that of the namespace's holder.
  const holder = start([
    "unshare",
    "--net",
    "sh",
    "-c",
    'printf %s "$1" > /proc/sys/net/ipv4/ip_local_reserved_ports && echo ready && exec sleep 3600',
    "sh",
    reserved,
  ]);
  try {
    await holder.waitFor(/^ready\n/, 10_000);
  } catch (error) {
    await holder.stop("SIGKILL");
    throw new Error(
      `cannot make a private network namespace (unshare --net needs root): ${
        (error as Error).message
      }`,
    );
  }
  return {
    enter: ["nsenter", `--net=/proc/${holder.child.pid}/ns/net`, "--"],
    close: async () => void await holder.stop("SIGKILL"),
  };
}

/**
 * A small tmpfs of `size` (as "16k") on a fresh folder: needs root. `fill()`
 * fills it to its last byte, after `dirs` (paths inside it) are made;
 * `remove()` unmounts and deletes it.
 */
export function tmpfs(
  size: string,
): { path: string; fill(...dirs: string[]): void; remove(): void } {
  const dir = tempDir();
  const mounted = spawnSync("mount", [
    "-t",
    "tmpfs",
    "-o",
    `size=${size}`,
    "tmpfs",
    dir.path,
  ]);
  assert.equal(
    mounted.status,
    0,
    `mount -t tmpfs (needs root): ${mounted.stderr}`,
  );
  return {
    path: dir.path,
    fill(...dirs) {
      for (const d of dirs) mkdirSync(d, { recursive: true, mode: 0o700 });
      const fill = join(dir.path, "fill");
      spawnSync("sh", [
        "-c",
        `dd if=/dev/zero of='${fill}' bs=1k 2>/dev/null; true`,
      ]);
    },
    remove() {
      spawnSync("umount", ["-l", dir.path]);
      dir.remove();
    },
  };
}
