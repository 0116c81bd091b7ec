/**
 * The command line: `portpicker [pid] [hold_seconds]` prints a free port;
 * `serve` runs the port server, `status` and `return` talk to it, `wait`
 * waits for a port to accept connections. Every flag is parsed here; the
 * values go to `mod.ts` and `portserver.ts`, which check them and name a bad
 * one. The runtime adapter at the end is the only code here that touches
 * `Deno` or `process`.
 *
 * @example
 * ```sh
 * deno run -A jsr:@x/portpicker/cli $$
 * ```
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import {
  getPortServerStatus,
  leasePorts,
  type PickOptions,
  pickUnusedPorts,
  reservePort,
  returnPort,
  returnPortsToServer,
  VERSION,
  waitForPort,
} from "./mod.ts";
import type { PortServerOptions } from "./portserver.ts";

const NAME = "portpicker";

const USAGE = `Usage: ${NAME} [options] [pid] [hold_seconds]
       ${NAME} serve [options]       run the port server
       ${NAME} status [options]      who holds which port on the server
       ${NAME} return PORT... [options]
       ${NAME} wait PORT [options]
       ${NAME} run [options] -- COMMAND...  ports for a command's lifetime
       ${NAME} help [COMMAND]        this help, or a command's

Prints a port that is free on TCP and UDP, IPv4 and IPv6, and a newline.

Arguments:
  pid            the process the port is for, told to the port server and
                 named in lock-directory claims (default: the parent process,
                 the shell's $$; under a wrapper such as 'npx' or 'timeout',
                 the wrapper: pass $$)
  hold_seconds   keep the port bound and listening for this many seconds
                 after printing it, in a detached process, so that nothing
                 else takes it meanwhile (default: 0)

Options:
  -n, --count N          print N distinct ports, one a line
  -p, --port P[,P...]    prefer these ports, in this order, when free
      --range A-B        search only ports A to B, inclusive
      --exclude P[,P...] never print these ports
      --portserver ADDR  ask this port server first: a Unix socket path, or
                         @name for the abstract namespace
                         (default: $PORTSERVER_ADDRESS)
      --label TEXT       store TEXT with the allocation on the port server
      --lock-dir DIR     claim each port for pid with a file in DIR, so that
                         processes sharing DIR never get the same port, with
                         no server; the claim lasts until pid exits or
                         '${NAME} return PORT' (default: $PORTPICKER_LOCK_DIR,
                         else your own, $XDG_RUNTIME_DIR/portpicker or
                         portpicker-<uid> in the temporary directory; an
                         empty PORTPICKER_LOCK_DIR makes no claims)
      --json             print {"ports":[...]} instead of lines
  -h, --help             print this help
  -V, --version          print the version

Exit status: 0 done, 1 no free port (or another failure), 2 usage error.
`;

const HELP: Record<string, string> = {
  serve: `Usage: ${NAME} serve [options]

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
                         then to take its reply, before it is dropped
                         (default: 2)
      --verbose          log every request
      --debug            log every request (as --verbose)
  -h, --help             print this help

Signals: SIGUSR1 logs statistics; SIGINT and SIGTERM stop it cleanly.
Exit status: 0 stopped, 1 could not serve, 2 usage error.
`,
  status: `Usage: ${NAME} status [--json] [--portserver ADDR]

Who holds which port on the port server (this project's server only); ports
of holders that died are marked reclaimable.

Options:
      --portserver ADDR  the server (default: $PORTSERVER_ADDRESS)
      --json             print the server's answer as JSON
  -h, --help             print this help
`,
  return: `Usage: ${NAME} return PORT[,PORT...]... [options]

Gives ports back: the port server frees them at once, and their claims in the
lock directory are removed.

Options:
      --pid PID          their holder (default: the parent process, $$)
      --portserver ADDR  the server (default: $PORTSERVER_ADDRESS)
      --lock-dir DIR     the lock directory (default: $PORTPICKER_LOCK_DIR)
  -h, --help             print this help
`,
  run: `Usage: ${NAME} run [options] -- COMMAND [ARG...]

Runs COMMAND with free ports in its environment ($PORT by default), held for
exactly as long as it runs: no other process gets them meanwhile. From a port
server they are a lease that ends when ${NAME} run does, even if it is killed;
without one they are claimed for ${NAME} run in the lock directory, if any,
and released when the command ends. SIGINT, SIGTERM and SIGHUP are passed on.

Options:
      --env NAME[,NAME...]  one distinct port per variable (default: PORT)
  -p, --port P[,P...]    prefer these ports, in this order, when free
      --range A-B        search only ports A to B, inclusive
      --exclude P[,P...] never use these ports
      --portserver ADDR  lease from this port server (default:
                         $PORTSERVER_ADDRESS); it chooses the ports
      --label TEXT       store TEXT with the lease on the port server
      --lock-dir DIR     claim the ports in DIR (default: $PORTPICKER_LOCK_DIR)
  -h, --help             print this help

Exit status: the command's (128 + N when signal N ended it); 127 when it is
not found, 126 when it cannot be run; 1 or 2 when no ports could be had.
`,
  wait: `Usage: ${NAME} wait PORT [--timeout SECONDS] [--host HOST]

Waits until something accepts TCP connections on PORT; exit 1 with one line
when nothing does in time.

Options:
      --timeout SECONDS  how long to wait (default: 30)
      --host HOST        where to connect (default: 127.0.0.1 or ::1)
  -h, --help             print this help
`,
};

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
  const prefix = command in HELP ? `${NAME} ${command}` : NAME;
  try {
    switch (command) {
      case HOLD_MARKER:
        return await holdCommand(rest);
      case "help":
        if (rest.length > 1 || (rest[0] && !(rest[0] in HELP))) {
          throw new UsageError(`no such command ${show(rest.join(" "))}`);
        }
        return print(HELP[rest[0]] ?? USAGE);
      case "serve":
        return await serveCommand(rest);
      case "status":
        return await statusCommand(rest);
      case "return":
        return await returnCommand(rest);
      case "wait":
        return await waitCommand(rest);
      case "run":
        return await runCommand(rest);
      default:
        return await pickCommand(args);
    }
  } catch (error) {
    if (error instanceof Help) return print(error.message);
    // A bad value: the library's argument checks throw these, naming it.
    const usage = error instanceof UsageError ||
      error instanceof TypeError || error instanceof RangeError;
    const message = String((error as Error).message ?? error);
    console.error(
      `${prefix}: ${message.replaceAll("\n", " ")}${
        usage ? " (see --help)" : ""
      }`,
    );
    if (error instanceof CommandError) return error.status;
    return usage ? 2 : 1;
  }
}

// ---------------------------------------------------------------------------
// Picking.

/** The options of `portpicker` and `portpicker run` that choose ports. */
const PICK_OPTIONS = {
  port: { type: "string", short: "p" },
  range: { type: "string" },
  exclude: { type: "string" },
  portserver: { type: "string" },
  label: { type: "string" },
  "lock-dir": { type: "string" },
} as const;

/** Those options as the library's, for `pid`. */
function pickOptions(
  values: { [K in keyof typeof PICK_OPTIONS]?: string },
  pid: number,
): PickOptions {
  const range = values.range?.split("-");
  return {
    pid,
    portserverAddress: nonEmpty(values.portserver, "--portserver"),
    lockDir: nonEmpty(values["lock-dir"], "--lock-dir"),
    ports: values.port?.split(",").map(number),
    range: range?.length === 2
      ? [number(range[0]), number(range[1])] as [number, number]
      : values.range as unknown as [number, number],
    exclude: values.exclude?.split(",").map(number),
    label: values.label,
  };
}

async function pickCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    ...PICK_OPTIONS,
    count: { type: "string", short: "n" },
    json: { type: "boolean" },
    version: { type: "boolean", short: "V" },
  }, USAGE);
  if (values.version) return print(`${NAME} ${VERSION}`);
  if (positionals.length > 2) {
    throw new UsageError(
      `too many arguments: ${
        positionals.slice(2).join(" ")
      } (expected [pid] [hold_seconds])`,
    );
  }
  const [pid, hold] = positionals;
  const holdSeconds = hold === undefined
    ? 0
    : seconds(hold, "hold_seconds", 0, 2_000_000);
  const ports = await pickUnusedPorts(
    number(values.count ?? "1"),
    pickOptions(values, pid === undefined ? parentPid() : number(pid)),
  );
  if (holdSeconds > 0) await holdInChild(ports, holdSeconds);
  return print(values.json ? JSON.stringify({ ports }) : ports.join("\n"));
}

/**
 * `portpicker run [options] -- COMMAND [ARG...]`: runs the command with its
 * ports in environment variables, held for exactly as long as it runs: a
 * lease from the port server (it ends with our connection, even if we are
 * killed), else claims for this process in the lock directory, removed when
 * the command ends.
 */
async function runCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    ...PICK_OPTIONS,
    env: { type: "string" },
  }, HELP.run);
  if (positionals.length === 0) {
    throw new UsageError("run needs a command: run [options] -- COMMAND");
  }
  const names = (values.env ?? "PORT").split(",");
  const bad = names.find((n) => !/^[A-Za-z_][A-Za-z0-9_]*$/.test(n));
  if (bad !== undefined || new Set(names).size !== names.length) {
    throw new UsageError(
      `invalid --env ${show(values.env!)}: expected distinct variable names`,
    );
  }
  const options = pickOptions(values, ownPid());
  const address = options.portserverAddress ?? env("PORTSERVER_ADDRESS");
  let release: () => unknown;
  let ports: readonly number[];
  if (address) {
    const lease = await leasePorts(names.length, {
      portserverAddress: address,
      label: options.label,
    });
    ({ ports, release } = lease);
  } else {
    ports = await pickUnusedPorts(names.length, options);
    release = () => ports.forEach((port) => returnPort(port));
  }
  try {
    const [command, ...rest] = positionals;
    const vars = Object.fromEntries(names.map((n, i) => [n, String(ports[i])]));
    const { code, signal } = await runChild(command, rest, vars);
    return signal ? 128 + await signalNumber(signal) : code;
  } finally {
    await release();
  }
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
  try {
    for (const port of args.slice(1).map(Number)) {
      await reservePort({ ports: port, range: [port, port] });
    }
  } catch (error) {
    return print(`error ${(error as Error).message}`, 1);
  }
  print("ready");
  await new Promise((resolve) => setTimeout(resolve, Number(args[0]) * 1000));
  return 0;
}

// ---------------------------------------------------------------------------
// Talking to the port server.

/** `portpicker status`: who holds which port on the server. */
async function statusCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
    json: { type: "boolean" },
    portserver: { type: "string" },
  }, HELP.status);
  if (positionals.length > 0) {
    throw new UsageError(`unexpected argument ${show(positionals[0])}`);
  }
  const status = await getPortServerStatus(
    nonEmpty(values.portserver, "--portserver"),
  );
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
  const { values, positionals } = parse(args, {
    pid: { type: "string" },
    portserver: { type: "string" },
    "lock-dir": { type: "string" },
  }, HELP.return);
  if (positionals.length === 0) {
    throw new UsageError("return needs at least one PORT");
  }
  const ports = positionals.flatMap((p) => p.split(",")).map(number);
  const pid = values.pid === undefined ? parentPid() : number(values.pid);
  const address = nonEmpty(values.portserver, "--portserver") ??
    env("PORTSERVER_ADDRESS");
  const lockDir = nonEmpty(values["lock-dir"], "--lock-dir") ??
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
  const { values, positionals } = parse(args, {
    timeout: { type: "string" },
    host: { type: "string" },
  }, HELP.wait);
  if (positionals.length !== 1) {
    throw new UsageError(
      positionals.length === 0
        ? "wait needs a PORT"
        : `unexpected argument ${show(positionals[1])}`,
    );
  }
  const timeout = values.timeout === undefined
    ? 30
    : seconds(values.timeout, "--timeout", 0, 86400);
  await waitForPort(number(positionals[0]), {
    timeout: timeout * 1000,
    hostname: values.host,
  });
  return 0;
}

// ---------------------------------------------------------------------------
// The port server.

/** `portpicker serve`: runs the server until SIGINT or SIGTERM. */
async function serveCommand(args: string[]): Promise<number> {
  const { values, positionals } = parse(args, {
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
  }, HELP.serve);
  if (positionals.length > 0) {
    throw new UsageError(`unexpected argument ${show(positionals[0])}`);
  }
  const options: PortServerOptions = {
    address: values.address ?? values.portserver_address ??
      values.portserver_unix_socket_address,
    statePath: nonEmpty(values.state, "--state"),
    verbose: values.verbose || values.debug,
  };
  if (values.mode !== undefined) {
    // Octal as typed; anything else, the library names as typed.
    const mode = /^[0-7]{1,4}$/.test(values.mode)
      ? parseInt(values.mode, 8)
      : NaN;
    options.socketMode = mode <= 0o777
      ? mode
      : values.mode as unknown as number;
  }
  if (values.timeout !== undefined) {
    options.timeoutMs = 1000 *
      seconds(values.timeout, "--timeout", 0.001, 3600);
  }
  const spec = values.pool ?? values.portserver_static_pool;
  if (spec !== undefined) {
    // As the Python server: a range that cannot be used is skipped, said.
    const pool: [number, number][] = options.pool = [];
    for (const part of spec.split(",")) {
      const match = /^\s*([+-]?\d+)\s*-\s*([+-]?\d+)\s*$/.exec(part);
      const [first, last] = [Number(match?.[1]), Number(match?.[2])];
      if (!match || first < 1 || last > 65535 || first > last) {
        console.error(
          `${NAME} serve: ignoring ${
            match ? "out of bounds" : "unparsable"
          } port range ${show(part)}`,
        );
      } else pool.push([first, last]);
    }
  }
  const { startPortServer } = await import("./portserver.ts");
  // Listening before "Serving on" is logged: a signal right after it must
  // stop the server cleanly, not kill it.
  let server: Awaited<ReturnType<typeof startPortServer>> | undefined;
  const stopping = untilSignal(() => server?.logStats());
  try {
    server = await startPortServer(options);
  } catch (error) {
    stopping.cancel();
    throw error;
  }
  console.error(`${NAME} serve: stopping on ${await stopping}`);
  await server.stop();
  return 0;
}

// ---------------------------------------------------------------------------
// Arguments. The CLI turns text into values; the library checks them.

/** A bad command line: printed as one line, exit 2. */
class UsageError extends Error {}

/** A command that `run` cannot start: one line, and the shell's status. */
class CommandError extends Error {
  readonly status: number;
  constructor(message: string, status: number) {
    super(message);
    this.status = status;
  }
}

/** `--help` on every command; Node's parser errors in our own words. */
function parse<T extends NonNullable<ParseArgsConfig["options"]>>(
  args: string[],
  options: T,
  help: string,
) {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: { ...options, help: { type: "boolean", short: "h" } },
    });
  } catch (error) {
    const message = (error as Error).message;
    const flag = /--[\w-]+/.exec(message)?.[0] ?? /-\w/.exec(message)?.[0] ??
      "";
    throw new UsageError(
      /ambiguous|argument missing/.test(message)
        ? `option ${flag} needs a value (a value that starts with - goes as ${flag}=VALUE)`
        : /Unknown option/.test(message)
        ? `unknown option ${flag}`
        : /does not take an argument/.test(message)
        ? `option ${flag} takes no value`
        : message.split(". ")[0],
    );
  }
  if ((parsed.values as { help?: boolean }).help) throw new Help(help);
  return parsed;
}

/** Thrown to print a command's help, exit 0. */
class Help extends Error {}

/** Text that is a whole number as a number; anything else as given, for the check to name. */
function number(text: string): number {
  return /^-?\d{1,16}$/.test(text) ? Number(text) : text as unknown as number;
}

function seconds(text: string, what: string, min: number, max: number): number {
  const value = Number(text);
  if (!/^\d+(\.\d+)?$/.test(text) || value < min || value > max) {
    throw new UsageError(
      `invalid ${what} ${
        show(text)
      }: expected a number of seconds from ${min} to ${max}`,
    );
  }
  return value;
}

/** An option that must not be empty when given. */
function nonEmpty(text: string | undefined, flag: string): string | undefined {
  if (text === "") throw new UsageError(`${flag} needs a value`);
  return text;
}

function show(text: string): string {
  return JSON.stringify(text);
}

// ---------------------------------------------------------------------------
// The runtime adapter.

/** What this file uses of Node's `process` (Bun has it too). */
interface NodeProcess {
  pid: number;
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

function ownPid(): number {
  return deno ? deno.pid : node!.pid;
}

/**
 * Runs `command` with our stdio and `vars` added to our environment, passes
 * SIGINT, SIGTERM and SIGHUP on to it, and resolves with how it ended. One
 * that cannot be started is a {@linkcode CommandError}: 127 not found, 126
 * not executable, as shells say.
 */
async function runChild(
  command: string,
  args: string[],
  vars: Record<string, string>,
): Promise<{ code: number; signal: string | null }> {
  type Passed = "SIGINT" | "SIGTERM" | "SIGHUP";
  const cannot = (error: unknown) => {
    const code = (error as { code?: string }).code;
    const why = code === "ENOENT"
      ? "command not found"
      : (error as Error).message;
    return new CommandError(
      `cannot run ${show(command)}: ${why}`,
      code === "ENOENT" ? 127 : 126,
    );
  };
  // Listening before the command starts: a signal that comes meanwhile must
  // not kill us and leave the command running without its ports.
  const early: Passed[] = [];
  let kill = (signal: Passed): void => void early.push(signal);
  const off = onSignals({
    SIGINT: () => kill("SIGINT"),
    SIGTERM: () => kill("SIGTERM"),
    SIGHUP: () => kill("SIGHUP"),
  });
  try {
    let ended: Promise<{ code: number; signal: string | null }>;
    if (deno) {
      let child: Deno.ChildProcess;
      try {
        child = new deno.Command(command, { args, env: vars }).spawn();
      } catch (error) {
        throw cannot(error);
      }
      kill = (signal) => void child.kill(signal);
      ended = child.status.then((s) => ({ code: s.code, signal: s.signal }));
    } else {
      const { spawn } = await import("node:child_process");
      // Bun throws at once where Node emits "error".
      const child = await new Promise<
        import("node:child_process").ChildProcess
      >((resolve, reject) => {
        const child = spawn(command, args, {
          stdio: "inherit",
          env: { ...node!.env, ...vars },
        });
        child.once("spawn", () => resolve(child));
        child.once("error", reject);
      }).catch((error) => {
        throw cannot(error);
      });
      kill = (signal) => void child.kill(signal);
      ended = new Promise((resolve) =>
        child.once(
          "exit",
          (code, signal) => resolve({ code: code ?? 0, signal }),
        )
      );
    }
    early.forEach(kill);
    return await ended;
  } finally {
    off();
  }
}

/** A signal's number, for the exit status of a command it ended. */
async function signalNumber(name: string): Promise<number> {
  const { constants } = await import("node:os");
  return (constants.signals as Record<string, number>)[name] ?? 0;
}

/** An environment variable; on Deno without `--allow-env` for it, unset. */
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
 * Calls each handler on its signal until the returned function is called,
 * which removes them (Deno's signal listeners keep the process alive).
 */
function onSignals(handlers: Partial<Record<Deno.Signal, () => void>>) {
  const entries = Object.entries(handlers) as [Deno.Signal, () => void][];
  for (const [signal, handler] of entries) {
    if (deno) deno.addSignalListener(signal, handler);
    else node!.on(signal, handler);
  }
  return () => {
    for (const [signal, handler] of entries) {
      if (deno) deno.removeSignalListener(signal, handler);
      else node!.off(signal, handler);
    }
  };
}

/**
 * Resolves with the name of the first SIGINT or SIGTERM; SIGUSR1 calls
 * `onUsr1`. `cancel()` removes the listeners without waiting.
 */
function untilSignal(
  onUsr1: () => void,
): Promise<string> & { cancel(): void } {
  let cancel = () => {};
  let off = () => {};
  const signalled = new Promise<string>((resolve) => {
    off = onSignals({
      SIGUSR1: onUsr1,
      SIGINT: () => resolve("SIGINT"),
      SIGTERM: () => resolve("SIGTERM"),
    });
    cancel = () => resolve("");
  }).finally(() => off());
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
  const exited = "error the holding process exited\n";
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
    const reader = child.stdout.pipeThrough(new TextDecoderStream())
      .getReader();
    let text = "";
    while (!text.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    await reader.cancel();
    child.unref();
    return text || exited;
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
    child.on("exit", () => resolve(text || exited));
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
