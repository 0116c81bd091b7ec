/**
 * The command line: `portpicker [pid] [hold_seconds]` prints a free port;
 * `serve` runs the port server, `status` and `return` talk to it. Every
 * flag of every command is parsed here; the work is done by `mod.ts` and
 * `portserver.ts`. The runtime adapter at the end is the only code here that
 * touches `Deno`, `Bun` or `process`.
 *
 * @example
 * ```sh
 * deno run -A jsr:@x/portpicker/cli $$
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  getPortServerStatus,
  isLabel,
  type PickOptions,
  pickUnusedPorts,
  reservePort,
  returnPort,
  returnPortsToServer,
  VERSION,
  waitForPort,
} from "./mod.ts";
import type { PortServerOptions } from "./portserver.ts";

/** Exit codes: 0 done, 1 no port (or another failure), 2 usage error. */
const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;
const NAME = "portpicker";
const MAX_PID = 0x7fffffff;

const USAGE = `Usage: ${NAME} [options] [pid] [hold_seconds]
       ${NAME} serve [server options]     (${NAME} serve --help)
       ${NAME} status [--json] [--portserver ADDR]
       ${NAME} return PORT... [--pid PID] [--portserver ADDR] [--lock-dir DIR]
       ${NAME} wait PORT [--timeout SECONDS] [--host HOST]

Prints a port that is free on TCP and UDP, IPv4 and IPv6, and a newline.

Arguments:
  pid            the process the port is for, told to the port server and
                 named in lock-directory claims (default: the parent process,
                 the shell's $$)
  hold_seconds   keep the port bound and listening for this many seconds
                 after printing it, in a detached process, so that nothing
                 else takes it meanwhile (default: 0)

Options:
  -n, --count N          print N distinct ports, one a line
      --range A-B        search only ports A to B, inclusive
      --exclude P[,P]    never print these ports
      --portserver ADDR  ask this port server first: a Unix socket path, or
                         @name for the abstract namespace
                         (default: $PORTSERVER_ADDRESS)
      --label TEXT       store TEXT with the allocation on the port server
      --lock-dir DIR     claim each port for pid with a file in DIR, so that
                         processes sharing DIR never get the same port, with
                         no server; the claim lasts until pid exits or
                         '${NAME} return PORT' (default: $PORTPICKER_LOCK_DIR)
      --json             print {"ports":[...]} instead of lines
  -h, --help             print this help
  -V, --version          print the version

status: who holds which port on the port server (this project's server only);
        ports of holders that died are marked reclaimable.
return: give ports back: the port server frees them at once, and their claims
        in the lock directory are removed; --pid is their holder (default:
        the parent process).
wait:   wait until something accepts TCP connections on PORT (default: on
        127.0.0.1 or ::1; --host HOST), for at most --timeout SECONDS
        (default: 30); exit 1 with one line when it does not.

Exit status: 0 done, 1 no free port (or the server refused, or the wait timed
out), 2 usage error.
`;

const SERVE_USAGE = `Usage: ${NAME} serve [options]

Runs the port server: hands each process unique ports over a Unix socket and
takes them back when the process dies. Wire-compatible with Python's portserver.

Options:
      --portserver_static_pool, --pool N-P[,N-P]
                         the ports to hand out, inclusive (default: 15000-24999)
      --portserver_address, --portserver_unix_socket_address, --address ADDR
                         where to listen: @name for the Linux abstract
                         namespace, else a socket file
                         (default: @unittest-portserver)
      --mode OCTAL       permissions of the socket file, as 0660 (default:
                         what the umask leaves)
      --state FILE       keep allocations in FILE across restarts
      --timeout SECONDS  how long a client may take to send its request, and
                         then to take a long reply, before it is dropped
                         (checked every tenth of it, at most 100 ms;
                         default: 2)
      --verbose          log every request
      --debug            log every request (as --verbose)
  -h, --help             print this help

Signals: SIGUSR1 logs statistics; SIGINT and SIGTERM stop it cleanly.
Exit status: 0 stopped, 1 could not serve, 2 usage error.
`;

/**
 * Runs the command line with `args` (without the program name) and returns
 * the exit status. Errors are printed as one line on stderr.
 *
 * @param args The arguments, as `Deno.args` or `process.argv.slice(2)`.
 * @returns 0, 1 (no port or another failure) or 2 (usage error).
 *
 * @example
 * ```ts
 * import { main } from "@x/portpicker/cli";
 *
 * const status = await main(["--count", "2"]);
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  const prefix = command === "serve" ? `${NAME} serve` : NAME;
  try {
    switch (command) {
      case HOLD_MARKER:
        return await holdCommand(rest);
      case "serve":
        return await serveCommand(rest);
      case "status":
        return await statusCommand(rest);
      case "return":
        return await returnCommand(rest);
      case "wait":
        return await waitCommand(rest);
      default:
        return await pickCommand(args);
    }
  } catch (error) {
    const usage = error instanceof UsageError ||
      (error as { code?: string }).code?.startsWith("ERR_PARSE_ARGS");
    const message = (error as Error).message ?? String(error);
    // One line, never a stack trace.
    const line = usage ? `${message.split(". ")[0]} (see --help)` : message;
    console.error(`${prefix}: ${line.replaceAll("\n", " ")}`);
    return usage ? EXIT_USAGE : EXIT_FAILURE;
  }
}

// ---------------------------------------------------------------------------
// Picking.

async function pickCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      count: { type: "string", short: "n" },
      range: { type: "string" },
      exclude: { type: "string" },
      portserver: { type: "string" },
      label: { type: "string" },
      "lock-dir": { type: "string" },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
      version: { type: "boolean", short: "V" },
    },
  });
  if (values.help) return print(USAGE);
  if (values.version) return print(`${NAME} ${VERSION}`);
  if (positionals.length > 2) {
    throw new UsageError(
      `too many arguments: ${
        positionals.slice(2).join(" ")
      } (expected [pid] [hold_seconds])`,
    );
  }
  const [pidText, holdText] = positionals;
  const options: PickOptions = {
    pid: pidText === undefined
      ? parentPid()
      : parseInteger(pidText, "pid", 1, MAX_PID),
    portserverAddress: parseAddress(values.portserver),
    lockDir: parseDirectory(values["lock-dir"]),
  };
  const holdSeconds = holdText === undefined
    ? 0
    : parseSeconds(holdText, "hold_seconds", 0, 2_000_000);
  if (values.range !== undefined) options.range = parseRange(values.range);
  if (values.exclude !== undefined) {
    options.exclude = values.exclude.split(",").map((p) =>
      parseInteger(p.trim(), "excluded port", 1, 65535)
    );
  }
  if (values.label !== undefined) options.label = parseLabel(values.label);
  const count = values.count === undefined
    ? 1
    : parseInteger(values.count, "count", 1, 65535);
  const ports = await pickUnusedPorts(count, options);
  if (holdSeconds > 0) await holdInChild(ports, holdSeconds);
  return print(values.json ? JSON.stringify({ ports }) : ports.join("\n"));
}

/** The first argument of the detached process that holds ports. */
const HOLD_MARKER = "__portpicker_hold__";

/**
 * Starts a detached copy of this program that binds `ports` and keeps them
 * listening for `seconds`; resolves once they are bound.
 */
async function holdInChild(ports: number[], seconds: number): Promise<void> {
  const [command, ...args] = selfCommand();
  args.push(HOLD_MARKER, String(seconds), ...ports.map(String));
  // The parent holds any claims and server allocations: the child only binds.
  const answer = await spawnDetached(command, args, {
    PORTPICKER_LOCK_DIR: "",
    PORTSERVER_ADDRESS: "",
  });
  if (!answer.startsWith("ready")) {
    throw new Error(
      `cannot hold the port: ${answer.replace(/^error /, "").trim()}`,
    );
  }
}

/** The detached child of {@linkcode holdInChild}. */
async function holdCommand(args: string[]): Promise<number> {
  const seconds = Number(args[0]);
  try {
    for (const text of args.slice(1)) {
      const port = Number(text);
      await reservePort({ ports: port, range: [port, port] });
    }
  } catch (error) {
    return print(`error ${(error as Error).message}`, EXIT_FAILURE);
  }
  print("ready");
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  return 0;
}

// ---------------------------------------------------------------------------
// Talking to the port server.

/** `portpicker status`: who holds which port on the server. */
async function statusCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { json: { type: "boolean" }, portserver: { type: "string" } },
  });
  if (positionals.length > 0) {
    throw new UsageError(
      `unexpected argument ${JSON.stringify(positionals[0])}`,
    );
  }
  const address = parseAddress(values.portserver) ??
    env("PORTSERVER_ADDRESS");
  if (!address) {
    throw new UsageError(
      "status needs a port server: --portserver or PORTSERVER_ADDRESS",
    );
  }
  const status = await getPortServerStatus(address);
  if (values.json) return print(JSON.stringify(status));
  const dead = status.reclaimable
    ? `, ${status.reclaimable} of them by holders that died (reclaimable)`
    : "";
  print(
    `${status.allocated} of ${status.pool} ports held on ${status.address}${dead}`,
  );
  if (status.allocations.length === 0) return 0;
  const rows = [["PORT", "PID", "SINCE", "LABEL", ""]];
  for (const a of status.allocations) {
    rows.push([
      String(a.port),
      a.lease ? "lease" : String(a.pid),
      a.since,
      a.label ?? "",
      a.alive ? "" : "dead, reclaimable",
    ]);
  }
  const widths = rows[0].map((_, i) =>
    Math.max(...rows.map((r) => r[i].length))
  );
  for (const row of rows) {
    print(row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd());
  }
  return 0;
}

/** `portpicker return PORT...`: the server frees them, and their claims go. */
async function returnCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      pid: { type: "string" },
      portserver: { type: "string" },
      "lock-dir": { type: "string" },
    },
  });
  if (positionals.length === 0) {
    throw new UsageError("return needs at least one PORT");
  }
  const ports = positionals.flatMap((p) => p.split(",")).map((p) =>
    parseInteger(p, "port", 1, 65535)
  );
  const pid = values.pid === undefined
    ? parentPid()
    : parseInteger(values.pid, "pid", 1, MAX_PID);
  const address = parseAddress(values.portserver) ??
    env("PORTSERVER_ADDRESS");
  const lockDir = parseDirectory(values["lock-dir"]) ??
    env("PORTPICKER_LOCK_DIR");
  if (!address && !lockDir) {
    throw new UsageError(
      "return needs a port server (--portserver, PORTSERVER_ADDRESS) or a lock directory (--lock-dir, PORTPICKER_LOCK_DIR)",
    );
  }
  if (lockDir) { for (const port of ports) returnPort(port, { lockDir, pid }); }
  if (address) await returnPortsToServer(address, ports, { pid });
  return 0;
}

/** `portpicker wait PORT`: until something accepts connections there. */
async function waitCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { timeout: { type: "string" }, host: { type: "string" } },
  });
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "wait needs a PORT"
        : `unexpected argument ${JSON.stringify(positionals[1])}`,
    );
  }
  const port = parseInteger(positionals[0], "port", 1, 65535);
  const timeout = values.timeout === undefined
    ? 30
    : parseSeconds(values.timeout, "--timeout", 0, 86400);
  if (values.host === "") throw new UsageError("--host needs a host name");
  await waitForPort(port, { timeout: timeout * 1000, hostname: values.host });
  return 0;
}

// ---------------------------------------------------------------------------
// The port server.

/** `portpicker serve`: runs the server until SIGINT or SIGTERM. */
async function serveCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      portserver_static_pool: { type: "string" },
      pool: { type: "string" },
      portserver_address: { type: "string" },
      portserver_unix_socket_address: { type: "string" },
      address: { type: "string" },
      mode: { type: "string" },
      state: { type: "string" },
      timeout: { type: "string" },
      verbose: { type: "boolean" },
      debug: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return print(SERVE_USAGE);
  const address = values.address ?? values.portserver_address ??
    values.portserver_unix_socket_address ?? "@unittest-portserver";
  if (!address || address === "@") {
    throw new UsageError(`invalid address ${JSON.stringify(address)}`);
  }
  const options: PortServerOptions = {
    address,
    statePath: values.state,
    verbose: values.verbose || values.debug,
  };
  if (values.state === "") throw new UsageError("--state needs a file");
  if (values.mode !== undefined) {
    if (address.startsWith("@")) {
      throw new UsageError(
        `--mode needs a socket file address, not the abstract ${address}`,
      );
    }
    if (!/^0?[0-7]{3}$/.test(values.mode)) {
      throw new UsageError(
        `invalid --mode ${
          JSON.stringify(values.mode)
        }: expected octal permissions, as 0660`,
      );
    }
    options.socketMode = parseInt(values.mode, 8);
  }
  if (values.timeout !== undefined) {
    options.timeoutMs = 1000 *
      parseSeconds(values.timeout, "--timeout", 0.001, 3600);
  }
  const { DEFAULT_POOL, logLine, startPortServer } = await import(
    "./portserver.ts"
  );
  const log = (line: string) => console.error(line);
  // The flag the user typed names the pool in messages.
  const [flag, spec] = values.pool !== undefined
    ? ["--pool", values.pool]
    : values.portserver_static_pool !== undefined
    ? ["--portserver_static_pool", values.portserver_static_pool]
    : [undefined, undefined];
  if (spec !== undefined) {
    const pool = parsePool(spec, (m) => log(logLine("E", m)));
    options.pool = pool;
    if (!pool.some(([first, last]) => first <= last)) {
      log(logLine("E", `No ports. Invalid port ranges in ${flag}?`));
      return EXIT_FAILURE;
    }
  } else {
    options.pool = DEFAULT_POOL;
  }
  // Listening before "Serving on" is logged: a signal right after it must
  // stop the server cleanly, not kill it.
  let server: Awaited<ReturnType<typeof startPortServer>> | undefined;
  const stopping = untilSignal(() => server?.logStats());
  try {
    server = await startPortServer({ ...options, log });
  } catch (error) {
    log(logLine("E", (error as Error).message));
    stopping.cancel();
    return EXIT_FAILURE;
  }
  const stopSignal = await stopping;
  log(logLine("I", `Stopping on ${stopSignal}.`));
  await server.stop();
  server.logStats();
  log(logLine("I", "Goodbye."));
  return 0;
}

/**
 * Parses `N-P[,N-P...]` as the Python server does: a range that cannot be
 * parsed, or lies outside 1–65535, is skipped and reported to `onError`.
 */
function parsePool(
  spec: string,
  onError: (message: string) => void,
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

// ---------------------------------------------------------------------------
// Arguments: a bad value is one line that names it, exit 2.

/** A bad command line: printed as one line, exit 2. */
class UsageError extends Error {}

function parseInteger(
  text: string,
  what: string,
  min: number,
  max: number,
): number {
  if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new UsageError(
      `invalid ${what} ${
        JSON.stringify(text)
      }: expected an integer from ${min} to ${max}`,
    );
  }
  return Number(text);
}

function parseSeconds(
  text: string,
  what: string,
  min: number,
  max: number,
): number {
  const seconds = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text) || seconds < min || seconds > max) {
    throw new UsageError(
      `invalid ${what} ${
        JSON.stringify(text)
      }: expected a number of seconds from ${min} to ${max}`,
    );
  }
  return seconds;
}

/** Parses `A-B` (inclusive) into a range. */
function parseRange(text: string): [number, number] {
  const match = /^(\d+)-(\d+)$/.exec(text);
  if (!match) {
    throw new UsageError(
      `invalid range ${JSON.stringify(text)}: expected A-B, as 15000-24999`,
    );
  }
  const first = parseInteger(match[1], "range start", 1, 65535);
  const last = parseInteger(match[2], "range end", 1, 65535);
  if (first > last) {
    throw new UsageError(
      `invalid range ${JSON.stringify(text)}: ${first} is after ${last}`,
    );
  }
  return [first, last];
}

function parseAddress(text: string | undefined): string | undefined {
  if (text === "") throw new UsageError("--portserver needs an address");
  return text;
}

function parseDirectory(text: string | undefined): string | undefined {
  if (text === "") throw new UsageError("--lock-dir needs a directory");
  return text;
}

function parseLabel(text: string): string {
  if (!isLabel(text)) {
    throw new UsageError(
      `invalid label ${
        JSON.stringify(text)
      }: expected 1 to 100 printable characters without spaces`,
    );
  }
  return text;
}

// ---------------------------------------------------------------------------
// The runtime adapter.

/** What this file uses of Node's `process` (Bun has it too). */
interface NodeProcess {
  argv: string[];
  getBuiltinModule(name: "node:fs"): typeof import("node:fs");
  execArgv: string[];
  execPath: string;
  ppid: number;
  env: Record<string, string | undefined>;
  exit(code: number): never;
  on(signal: string, handler: () => void): void;
  off(signal: string, handler: () => void): void;
}

// deno-lint-ignore no-explicit-any
const host = globalThis as any;
const deno: typeof Deno | undefined = host.Deno;
const node: NodeProcess | undefined = deno ? undefined : host.process;

function print(text: string, status = 0): number {
  console.log(text);
  return status;
}

function parentPid(): number {
  return deno ? deno.ppid : node!.ppid;
}

/**
 * An environment variable; on Deno without `--allow-env` for it, unset (no
 * prompt), as the library reads it.
 */
function env(name: string): string | undefined {
  if (!deno) return node!.env[name] || undefined;
  const { state } = deno.permissions.querySync({ name: "env", variable: name });
  return state === "granted" ? deno.env.get(name) || undefined : undefined;
}

function exit(code: number): void {
  if (deno) deno.exit(code);
  node!.exit(code);
}

/**
 * Resolves with the name of the first SIGINT or SIGTERM; SIGUSR1 calls
 * `onUsr1`. `cancel()` removes the listeners without waiting.
 */
function untilSignal(
  onUsr1: () => void,
): Promise<string> & { cancel(): void } {
  const handlers: [Deno.Signal, () => void][] = [["SIGUSR1", onUsr1]];
  let cancel = () => {};
  const signalled = new Promise<string>((resolve) => {
    for (const signal of ["SIGINT", "SIGTERM"] as const) {
      handlers.push([signal, () => resolve(signal)]);
    }
    for (const [signal, handler] of handlers) {
      if (deno) deno.addSignalListener(signal, handler);
      else node!.on(signal, handler);
    }
    cancel = () => resolve("");
  }).finally(() => {
    // Deno's signal listeners would keep the process alive.
    for (const [signal, handler] of handlers) {
      if (deno) deno.removeSignalListener(signal, handler);
      else node!.off(signal, handler);
    }
  });
  return Object.assign(signalled, { cancel });
}

/**
 * Whether this module is the program: `import.meta.main`, which Node has
 * only since 22.18; before, whether argv[1] names this file.
 */
function isMain(): boolean {
  if (typeof import.meta.main === "boolean") return import.meta.main;
  let script = node?.argv[1];
  if (!script) return false;
  try {
    // npm's bin links point at the file; the module's URL is the file's own.
    script = node!.getBuiltinModule("node:fs").realpathSync(script);
  } catch { /* as given */ }
  const here = decodeURIComponent(new URL(import.meta.url).pathname);
  return here === script || here.replace(/\.[cm]?[jt]s$/, "") === script;
}

/** How to start this program again: the runtime, its flags and the script. */
function selfCommand(): string[] {
  const script = new URL(import.meta.url);
  if (deno) {
    const exe = deno.execPath();
    // A compiled binary is its own runtime; a renamed `deno` is not expected.
    if (!/(^|[\\/])deno(\.exe)?$/.test(exe)) return [exe];
    const flags = ["run", "--allow-net", "--no-prompt", "--no-config"];
    if (typeof deno.listenDatagram === "function") flags.push("--unstable-net");
    return [exe, ...flags, script.href];
  }
  if (
    script.pathname.includes("/$bunfs/") || script.pathname.includes("~BUN")
  ) {
    return [node!.execPath];
  }
  return [
    node!.execPath,
    ...node!.execArgv,
    decodeURIComponent(script.pathname),
  ];
}

/**
 * Starts a detached process and returns the first line it prints. Its stdout
 * is a pipe to us alone: `$(portpicker 0 60)` must not wait for it.
 */
async function spawnDetached(
  command: string,
  args: string[],
  env: Record<string, string>,
): Promise<string> {
  if (deno) {
    // Deno.Command needs no --allow-env, unlike node:child_process there.
    const child = new deno.Command(command, {
      args,
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "null",
      detached: true,
    }).spawn();
    const reader = child.stdout.getReader();
    const decoder = new TextDecoder();
    let text = "";
    while (!text.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    await reader.cancel();
    child.unref();
    return text || "error the holding process exited\n";
  }
  const { spawn } = await import("node:child_process");
  const child = spawn(command, args, {
    detached: true,
    env: { ...node!.env, ...env },
    stdio: ["ignore", "pipe", "ignore"],
  });
  const answer = await new Promise<string>((resolve) => {
    let text = "";
    child.stdout!.on("data", (chunk) => {
      text += chunk;
      if (text.includes("\n")) resolve(text);
    });
    child.on("error", (error) => resolve(`error ${error.message}\n`));
    child.on(
      "exit",
      () => resolve(text || "error the holding process exited\n"),
    );
  });
  child.stdout!.destroy();
  child.unref();
  return answer;
}

if (isMain()) {
  const status = await main(deno ? deno.args : node!.argv.slice(2));
  // On success, let pending work (a port given back) finish on its own.
  if (status !== 0) exit(status);
}
