/**
 * The command line: `portpicker [pid] [hold_seconds]` prints a free port, and
 * `portpicker serve` runs the port server.
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
  type PickOptions,
  pickUnusedPorts,
  reservePort,
  returnPortsToServer,
  VERSION,
} from "./mod.ts";

/** Exit codes: 0 done, 1 no port (or another failure), 2 usage error. */
const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;
const NAME = "portpicker";

const USAGE = `Usage: ${NAME} [options] [pid] [hold_seconds]
       ${NAME} serve [server options]     (${NAME} serve --help)
       ${NAME} status [--json] [--portserver ADDR]
       ${NAME} return PORT... [--pid PID] [--portserver ADDR]

Prints a port that is free on TCP and UDP, IPv4 and IPv6, and a newline.

Arguments:
  pid            the process the port is for, told to the port server
                 (default: the parent process, the shell's $$)
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
      --lock-dir DIR     claim each port with a file in DIR, so that processes
                         sharing DIR never get the same port, with no server
                         (default: $PORTPICKER_LOCK_DIR)
      --json             print {"ports":[...]} instead of lines
  -h, --help             print this help
  -V, --version          print the version

status: who holds which port on the port server (this project's server only).
return: give ports back to the port server, which frees them at once; --pid
        is their holder (default: the parent process).

Exit status: 0 done, 1 no free port (or the server refused), 2 usage error.
`;

/** A bad command line: printed as one line, exit 2. */
class UsageError extends Error {}

function exit(code: number): never {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  if (g.Deno) g.Deno.exit(code);
  g.process.exit(code);
  throw new Error("unreachable");
}

function parentPid(): number {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  return g.Deno ? g.Deno.ppid : g.process.ppid;
}

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

/**
 * Parses `A-B` (inclusive) into a range.
 *
 * @internal Shared with the port server's pool parsing.
 */
export function parseRange(text: string): [number, number] {
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

function parseLabel(text: string): string {
  if (!/^[\x21-\x7e]{1,100}$/.test(text)) {
    throw new UsageError(
      `invalid label ${
        JSON.stringify(text)
      }: expected 1 to 100 printable characters without spaces`,
    );
  }
  return text;
}

interface PickCommand {
  count: number;
  json: boolean;
  holdSeconds: number;
  options: PickOptions;
}

function parsePickCommand(args: string[]): PickCommand | "help" | "version" {
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
  if (values.help) return "help";
  if (values.version) return "version";
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
      : parseInteger(pidText, "pid", 1, 0x7fffffff),
  };
  let holdSeconds = 0;
  if (holdText !== undefined) {
    if (!/^\d+(\.\d+)?$/.test(holdText) || Number(holdText) > 2_000_000) {
      throw new UsageError(
        `invalid hold_seconds ${
          JSON.stringify(holdText)
        }: expected a number of seconds from 0 to 2000000`,
      );
    }
    holdSeconds = Number(holdText);
  }
  if (values.range !== undefined) options.range = parseRange(values.range);
  if (values.exclude !== undefined) {
    options.exclude = values.exclude.split(",").map((p) =>
      parseInteger(p.trim(), "excluded port", 1, 65535)
    );
  }
  options.portserverAddress = parseAddress(values.portserver);
  if (values.label !== undefined) options.label = parseLabel(values.label);
  if (values["lock-dir"] !== undefined) {
    if (values["lock-dir"] === "") {
      throw new UsageError("--lock-dir needs a directory");
    }
    options.lockDir = values["lock-dir"];
  }
  const count = values.count === undefined
    ? 1
    : parseInteger(values.count, "count", 1, 65535);
  return { count, json: values.json ?? false, holdSeconds, options };
}

/** How to start this program again: the runtime, its flags and the script. */
function selfCommand(): string[] {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  const script = new URL(import.meta.url);
  if (g.Deno) {
    const exe: string = g.Deno.execPath();
    // A compiled binary is its own runtime; a renamed `deno` is not expected.
    if (!/(^|[\\/])deno(\.exe)?$/.test(exe)) return [exe];
    const flags = ["run", "--allow-net", "--no-prompt", "--no-config"];
    if (typeof g.Deno.listenDatagram === "function") {
      flags.push("--unstable-net");
    }
    return [exe, ...flags, script.href];
  }
  if (
    script.pathname.includes("/$bunfs/") || script.pathname.includes("~BUN")
  ) {
    return [g.process.execPath];
  }
  return [
    g.process.execPath,
    ...g.process.execArgv,
    decodeURIComponent(script.pathname),
  ];
}

const HOLD_MARKER = "__portpicker_hold__";

/**
 * Starts a detached copy of this program that binds `ports` and keeps them
 * listening for `seconds`; resolves once they are bound.
 */
async function holdInChild(ports: number[], seconds: number): Promise<void> {
  const [command, ...args] = selfCommand();
  args.push(HOLD_MARKER, String(seconds), ...ports.map(String));
  // Its stdout is a pipe to us alone: `$(portpicker 0 60)` must not wait for it.
  const answer = await spawnDetached(command, args);
  if (!answer.startsWith("ready")) {
    throw new Error(
      `cannot hold the port: ${answer.replace(/^error /, "").trim()}`,
    );
  }
}

/** Starts a detached process and returns the first line it prints. */
async function spawnDetached(command: string, args: string[]): Promise<string> {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  if (g.Deno) {
    // Deno.Command needs no --allow-env, unlike node:child_process there.
    const child = new g.Deno.Command(command, {
      args,
      stdin: "null",
      stdout: "piped",
      stderr: "null",
      detached: true,
    }).spawn() as Deno.ChildProcess;
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

/** The detached child of {@linkcode holdInChild}. */
async function runHolder(args: string[]): Promise<void> {
  const seconds = Number(args[0]);
  // The parent checked these ports and holds their claims in any lock
  // directory; this process only keeps them bound.
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  if (!g.Deno) delete g.process.env.PORTPICKER_LOCK_DIR;
  try {
    for (const text of args.slice(1)) {
      const port = Number(text);
      await reservePort({ ports: [port], range: [port, port] });
    }
  } catch (error) {
    console.log(`error ${(error as Error).message}`);
    exit(EXIT_FAILURE);
  }
  console.log("ready");
  setTimeout(() => exit(0), seconds * 1000);
}

/** `portpicker status`: who holds which port on the server. */
async function statusCommand(args: string[]): Promise<void> {
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
  const address = parseAddress(values.portserver) ?? portserverFromEnv();
  if (!address) {
    throw new UsageError(
      "status needs a port server: --portserver or PORTSERVER_ADDRESS",
    );
  }
  const status = await getPortServerStatus(address);
  if (values.json) return void console.log(JSON.stringify(status));
  console.log(
    `${status.allocated} of ${status.pool} ports held on ${status.address}`,
  );
  if (status.allocations.length === 0) return;
  const rows = [["PORT", "PID", "SINCE", "LABEL"]];
  for (const a of status.allocations) {
    rows.push([
      String(a.port),
      a.lease ? "lease" : String(a.pid),
      a.since,
      a.label ?? "",
    ]);
  }
  const widths = rows[0].map((_, i) =>
    Math.max(...rows.map((r) => r[i].length))
  );
  for (const row of rows) {
    console.log(
      row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd(),
    );
  }
}

/** `portpicker return PORT...`: the server frees them at once. */
async function returnCommand(args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { pid: { type: "string" }, portserver: { type: "string" } },
  });
  if (positionals.length === 0) {
    throw new UsageError("return needs at least one PORT");
  }
  const ports = positionals.flatMap((p) => p.split(",")).map((p) =>
    parseInteger(p, "port", 1, 65535)
  );
  const pid = values.pid === undefined
    ? parentPid()
    : parseInteger(values.pid, "pid", 1, 0x7fffffff);
  const address = parseAddress(values.portserver) ?? portserverFromEnv();
  if (!address) {
    throw new UsageError(
      "return needs a port server: --portserver or PORTSERVER_ADDRESS",
    );
  }
  await returnPortsToServer(address, ports, { pid });
}

function portserverFromEnv(): string | undefined {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  return (g.Deno
    ? g.Deno.env.get("PORTSERVER_ADDRESS")
    : g.process.env.PORTSERVER_ADDRESS) ||
    undefined;
}

async function pickCommand(args: string[]): Promise<void> {
  const command = parsePickCommand(args);
  if (command === "help") return void console.log(USAGE);
  if (command === "version") return void console.log(`${NAME} ${VERSION}`);
  const ports = await pickUnusedPorts(command.count, command.options);
  if (command.holdSeconds > 0) await holdInChild(ports, command.holdSeconds);
  console.log(command.json ? JSON.stringify({ ports }) : ports.join("\n"));
}

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
  try {
    if (args[0] === HOLD_MARKER) {
      await runHolder(args.slice(1));
    } else if (args[0] === "serve") {
      const { serveCommand } = await import("./portserver.ts");
      return await serveCommand(args.slice(1));
    } else if (args[0] === "status") {
      await statusCommand(args.slice(1));
    } else if (args[0] === "return") {
      await returnCommand(args.slice(1));
    } else {
      await pickCommand(args);
    }
    return 0;
  } catch (error) {
    const usage = error instanceof UsageError ||
      (error as { code?: string }).code?.startsWith("ERR_PARSE_ARGS");
    const message = (error as Error).message ?? String(error);
    // One line, never a stack trace.
    const line = usage ? `${message.split(". ")[0]} (see --help)` : message;
    console.error(`${NAME}: ${line.replaceAll("\n", " ")}`);
    return usage ? EXIT_USAGE : EXIT_FAILURE;
  }
}

if (import.meta.main) {
  // deno-lint-ignore no-explicit-any
  const g = globalThis as any;
  const status = await main(g.Deno ? g.Deno.args : g.process.argv.slice(2));
  if (status !== 0) exit(status);
}
