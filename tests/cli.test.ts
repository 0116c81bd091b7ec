/**
 * The command line, run as a real process on the runtime running the test,
 * and as a binary compiled with `bun build --compile`.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { isPortFree } from "../mod.ts";
import {
  assertOneLineError,
  assertSubcommandError,
  canBindWithPython,
  cliCommandAllowing,
  COMPILE_ARGS,
  exitCodeOf,
  freeRange,
  HOLD_KINDS,
  holderOf,
  holdWithPython,
  killHolder,
  portsOf,
  type Proc,
  ROOT,
  run,
  runCliAllowing,
  type RunResult,
  RUNTIME,
  sleep,
  start,
  startPythonPortserver,
  tempDir,
  tool,
  uniqueName,
} from "./helpers.ts";

const VERSION: string =
  JSON.parse(readFileSync(join(ROOT, "deno.json"), "utf8")).version;

// The permissions a user gives Deno for each use of the CLI (Bun and Node
// have none to give).
/** Picking, and talking to a port server named by --portserver. */
const NET = ["--allow-net"];
/** The same with PORTSERVER_ADDRESS read from the environment. */
const NET_ENV = ["--allow-net", "--allow-env"];
/** hold_seconds: the CLI starts the process that holds the port. */
const NET_RUN = ["--allow-net", "--allow-run"];
/**
 * A lock directory: a claim names its owner's start time, from
 * /proc/<pid>/stat, which Deno 2 reads only with -A.
 */
const ALL = ["-A"];

/** Runs the CLI with `args`, Deno with only the `--allow-net` that picking needs. */
function runCli(
  args: string[],
  options: { env?: Record<string, string | undefined> } = {},
): Promise<RunResult> {
  return runCliAllowing(NET, args, options);
}

/** The ports printed one a line, checking the output's shape. */
function printedPorts(result: RunResult, count: number): number[] {
  assert.equal(result.code, 0, `exit ${result.code}: ${result.stderr}`);
  assert.match(result.stdout, new RegExp(`^(\\d+\\n){${count}}$`));
  const ports = result.stdout.trim().split("\n").map(Number);
  for (const port of ports) {
    assert.ok(port >= 1 && port <= 65535, `bad port ${port}`);
  }
  assert.equal(new Set(ports).size, count, `not distinct: ${ports}`);
  return ports;
}

/**
 * The pids a Python port server was asked for, from its log, once `count` of
 * them are there (the log may reach us after the reply).
 */
async function requestedPids(server: Proc, count: number): Promise<number[]> {
  await server.waitFor(
    new RegExp(`(?:Request on behalf of pid \\d+[\\s\\S]*){${count}}`),
    5_000,
  );
  return [...server.stderr().matchAll(/Request on behalf of pid (\d+)/g)].map((
    m,
  ) => Number(m[1]));
}

function inRange(port: number, range: readonly [number, number]): boolean {
  return port >= range[0] && port <= range[1];
}

/** Asserts a usage error: exit 2, one line on stderr, no stack trace, nothing on stdout. */
function assertUsageError(result: RunResult, args: string[]): void {
  assertOneLineError(result, 2, JSON.stringify(args));
}

/** Whether a TCP connection to 127.0.0.1:`port` is accepted. */
function tcpConnects(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** Waits until `port` is free, up to `timeoutMs`; whether it became free. */
async function becomesFree(port: number, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await isPortFree(port)) return true;
    await sleep(50);
  }
  return await isPortFree(port);
}

/**
 * `command <pid> <seconds>`: returns once the port is held, by a detached
 * process that keeps it listening (nothing else can bind it) until its time
 * is up. A long hold is checked while its holder lives, then ended by killing
 * the holder; a short one (`seconds`) must end by itself.
 */
async function checkHold(command: string[], seconds: number): Promise<void> {
  const env = { PORTSERVER_ADDRESS: undefined };
  const long = start([...command, String(process.pid), "600"], env);
  let holder: number | undefined;
  try {
    // It exits while the holder holds the port for ten minutes: it did not
    // wait for it.
    assert.equal(await exitCodeOf(long, 30_000), 0, long.stderr());
    assert.match(long.stdout(), /^\d+\n$/);
    const port = Number(long.stdout());
    holder = holderOf(port, 600);
    assert.ok(holder, `no holding process for port ${port}`);
    assert.equal(await isPortFree(port), false, "the port is not held");
    assert.equal(await tcpConnects(port), true, "nothing listens on the port");
    for (const kind of HOLD_KINDS) {
      assert.equal(
        await canBindWithPython(kind, port),
        false,
        `a ${kind} socket could bind ${port}`,
      );
    }
    process.kill(holder, "SIGKILL");
    holder = undefined;
    assert.equal(
      await becomesFree(port, 30_000),
      true,
      "held after its holder",
    );
  } finally {
    if (holder) process.kill(holder, "SIGKILL");
    await long.stop("SIGKILL");
  }
  const short = start([...command, String(process.pid), String(seconds)], env);
  try {
    assert.equal(await exitCodeOf(short, 30_000), 0, short.stderr());
    const port = Number(short.stdout());
    assert.equal(
      await becomesFree(port, 30_000),
      true,
      `port ${port} still held 30 s after a hold of ${seconds} s`,
    );
  } finally {
    await short.stop("SIGKILL");
  }
}

test("prints one port and a newline, exit 0", async () => {
  const ports = printedPorts(await runCli([]), 1);
  assert.equal(await isPortFree(ports[0]), true);
});

test("the pid argument is told to the port server", async () => {
  const address = uniqueName("cli-pid");
  const pool = await freeRange(3);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    // Any live process other than the test: the server itself.
    const pid = server.child.pid!;
    const [port] = printedPorts(
      await runCliAllowing(NET_ENV, [String(pid)], {
        env: { PORTSERVER_ADDRESS: address },
      }),
      1,
    );
    assert.ok(inRange(port, pool), `${port} not from the pool ${pool}`);
    assert.deepEqual(await requestedPids(server, 1), [pid]);
  } finally {
    await server.stop();
  }
});

test("without a pid, the port server is told the parent's pid", async () => {
  const address = uniqueName("cli-ppid");
  const pool = await freeRange(3);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    const [port] = printedPorts(
      await runCliAllowing(NET_ENV, [], {
        env: { PORTSERVER_ADDRESS: address },
      }),
      1,
    );
    assert.ok(inRange(port, pool), `${port} not from the pool ${pool}`);
    assert.deepEqual(await requestedPids(server, 1), [process.pid]);
  } finally {
    await server.stop();
  }
});

test("--portserver ADDRESS gets the port from that server's pool", async () => {
  const address = uniqueName("cli-option");
  const pool = await freeRange(3);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    const ports = printedPorts(
      await runCli(["--portserver", address, "-n", "2"]),
      2,
    );
    for (const port of ports) {
      assert.ok(inRange(port, pool), `${port} not from the pool ${pool}`);
    }
    assert.deepEqual(await requestedPids(server, 2), [
      process.pid,
      process.pid,
    ]);
  } finally {
    await server.stop();
  }
});

test("an empty PORTSERVER_ADDRESS asks no server and says nothing", async () => {
  const result = await runCliAllowing(NET_ENV, [], {
    env: { PORTSERVER_ADDRESS: "" },
  });
  printedPorts(result, 1);
  assert.equal(result.stderr, "");
});

test("with no server at PORTSERVER_ADDRESS, prints a port and the Python client's message", async () => {
  const result = await runCliAllowing(NET_ENV, [], {
    env: { PORTSERVER_ADDRESS: uniqueName("cli-nobody") },
  });
  printedPorts(result, 1);
  assert.match(
    result.stderr,
    /^Socket error when connecting to portserver: [^\n]+\n$/,
  );
});

test(
  "Deno without --allow-env does not read PORTSERVER_ADDRESS, and says nothing about it",
  { skip: RUNTIME === "deno" ? false : "about Deno's permissions" },
  async () => {
    const result = await runCli([], {
      env: { PORTSERVER_ADDRESS: uniqueName("cli-no-env") },
    });
    printedPorts(result, 1);
    assert.equal(result.stderr, "");
  },
);

test("-n 3 and --count 3 print 3 distinct ports", async () => {
  printedPorts(await runCli(["-n", "3"]), 3);
  printedPorts(await runCli(["--count", "3"]), 3);
  printedPorts(await runCli(["--count=3"]), 3);
});

test("--range A-B prints ports within A-B", async () => {
  const range = await freeRange(5);
  const ports = printedPorts(
    await runCli(["--range", `${range[0]}-${range[1]}`, "-n", "5"]),
    5,
  );
  assert.deepEqual(new Set(ports), new Set(portsOf(range)));
});

test("--exclude ports are never printed", async () => {
  const range = await freeRange(4);
  const [a, b, c, d] = portsOf(range);
  const spec = `${a}-${d}`;
  assert.deepEqual(
    printedPorts(
      await runCli(["--range", spec, "--exclude", `${a},${c},${d}`]),
      1,
    ),
    [b],
  );
  const ports = printedPorts(
    await runCli(["--range", spec, "--exclude", `${b}`, "-n", "3"]),
    3,
  );
  assert.deepEqual(new Set(ports), new Set([a, c, d]));
});

test('--json prints {"ports":[...]}', async () => {
  const result = await runCli(["--json", "-n", "2"]);
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /\n$/);
  const parsed = JSON.parse(result.stdout);
  assert.deepEqual(Object.keys(parsed), ["ports"]);
  assert.equal(parsed.ports.length, 2);
  assert.ok(parsed.ports.every((p: unknown) => Number.isInteger(p)));
  assert.notEqual(parsed.ports[0], parsed.ports[1]);
});

/** Help printed on stdout, exit 0, nothing on stderr; returns the text. */
function helpText(result: RunResult, args: string[]): string {
  const what = JSON.stringify(args);
  assert.equal(result.code, 0, `${what}: exit ${result.code} ${result.stderr}`);
  assert.equal(result.stderr, "", what);
  return result.stdout;
}

const COMMANDS = ["serve", "status", "return", "wait"];

test("-h, --help and `portpicker help` print the usage naming every command, exit 0", async () => {
  const argsList = [["-h"], ["--help"], ["help"]];
  const texts = (await Promise.all(argsList.map((args) => runCli(args))))
    .map((result, i) => helpText(result, argsList[i]));
  assert.match(
    texts[0],
    /^Usage: portpicker \[options\] \[pid\] \[hold_seconds\]\n/,
  );
  for (const command of [...COMMANDS, "help"]) {
    assert.match(texts[0], new RegExp(`^ +portpicker ${command} `, "m"));
  }
  assert.equal(texts[1], texts[0]);
  assert.equal(texts[2], texts[0]);
});

test("`portpicker help COMMAND`, `COMMAND --help` and `COMMAND -h` print that command's help, exit 0, for serve, status, return and wait", async () => {
  const usage = helpText(await runCli(["--help"]), ["--help"]);
  for (const command of COMMANDS) {
    const argsList = [["help", command], [command, "--help"], [command, "-h"]];
    const texts = (await Promise.all(argsList.map((args) => runCli(args))))
      .map((result, i) => helpText(result, argsList[i]));
    assert.match(texts[0], new RegExp(`^Usage: portpicker ${command} `));
    assert.match(texts[0], /^ {2}-h, --help {2,}print this help$/m);
    assert.notEqual(texts[0], usage);
    assert.equal(texts[1], texts[0], `${command} --help`);
    assert.equal(texts[2], texts[0], `${command} -h`);
  }
});

test("--help wins over the other arguments: `serve --help` serves nothing, `wait PORT --help` waits for nothing", async () => {
  const serve = await runCli([
    "serve",
    "--address",
    uniqueName("help"),
    "--help",
  ]);
  assert.match(
    helpText(serve, ["serve", "--help"]),
    /^Usage: portpicker serve /,
  );
  // Nothing listens on port 1: a wait would fail after its timeout.
  const wait = await runCli(["wait", "1", "--timeout", "30", "--help"]);
  assert.match(helpText(wait, ["wait", "--help"]), /^Usage: portpicker wait /);
});

test("`portpicker help nope` is a usage error naming the command, exit 2", async () => {
  const result = await runCli(["help", "nope"]);
  assertUsageError(result, ["help", "nope"]);
  assert.match(result.stderr, /no such command "nope"/);
});

test("-V and --version print the version of deno.json, exit 0", async () => {
  for (const flag of ["-V", "--version"]) {
    const result = await runCli([flag]);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `portpicker ${VERSION}\n`);
  }
});

const USAGE_ERRORS: string[][] = [
  ["abc"],
  ["0"],
  ["-5"],
  ["99999999999"],
  ["1", "2", "3"],
  ["1", "soon"],
  ["--range", "5-3"],
  ["--range", "x"],
  ["--range", "0-10"],
  ["--range", "1-70000"],
  ["--exclude", "abc"],
  ["--exclude", "0"],
  ["--count", "0"],
  ["-n", "x"],
  ["-n"],
  ["-p", "x"],
  ["--port", "0"],
  ["--port", "20000,70000"],
  ["--nope"],
  ["--portserver", ""],
  ["--lock-dir", ""],
  ["--json=yes"],
];

test("each usage error exits 2 with one line on stderr", async () => {
  const results = await Promise.all(USAGE_ERRORS.map((args) => runCli(args)));
  USAGE_ERRORS.forEach((args, i) => assertUsageError(results[i], args));
});

/** Subcommands' usage errors: `portpicker COMMAND: ...`, exit 2. */
const SUBCOMMAND_USAGE_ERRORS: string[][] = [
  ["serve", "--nope"],
  ["serve", "--mode", "999"],
  ["serve", "--address="],
  ["serve", "--timeout", "0"],
  ["status", "extra"],
  ["status", "--portserver="],
  ["return"],
  ["return", "abc", "--portserver", "@nobody"],
  ["return", "80", "--pid", "0", "--portserver", "@nobody"],
  ["wait"],
  ["wait", "0"],
  ["wait", "80", "81"],
  ["wait", "80", "--timeout", "x"],
];

test("each subcommand's usage error exits 2 with one line `portpicker COMMAND: ...`", async () => {
  const results = await Promise.all(
    SUBCOMMAND_USAGE_ERRORS.map((args) => runCli(args)),
  );
  SUBCOMMAND_USAGE_ERRORS.forEach((args, i) => {
    assertSubcommandError(results[i], 2, args[0], JSON.stringify(args));
    assert.match(results[i].stderr, / \(see --help\)\n$/);
  });
});

test("-n -3 says, in one line of its own words, that --count needs a value, exit 2", async () => {
  for (const args of [["-n", "-3"], ["--count", "-3"]]) {
    const result = await runCli(args);
    assertUsageError(result, args);
    assert.equal(
      result.stderr,
      "portpicker: option --count needs a value (a value that starts with - goes as --count=VALUE) (see --help)\n",
    );
  }
});

test("-p A,B prefers A, then B, in the order given, when free; else another port", async () => {
  const [a, b] = await freeRange(2);
  assert.deepEqual(printedPorts(await runCli(["-p", `${a},${b}`]), 1), [a]);
  assert.deepEqual(
    printedPorts(await runCli(["--port", `${b},${a}`, "-n", "2"]), 2),
    [b, a],
  );
  // More ports than preferred: the preferred first, then any.
  const [first, other] = printedPorts(
    await runCli(["-p", `${a}`, "-n", "2"]),
    2,
  );
  assert.equal(first, a);
  assert.ok(other !== a && other !== b, `${other}`);
  const holder = await holdWithPython("dual", a);
  try {
    assert.deepEqual(printedPorts(await runCli(["-p", `${a},${b}`]), 1), [b]);
    const [port] = printedPorts(await runCli(["-p", `${a}`]), 1);
    assert.notEqual(port, a, "a port in use was printed");
  } finally {
    await holder.release();
  }
});

test("no free port exits 1 with one line naming the range", async () => {
  const holder = await holdWithPython("dual");
  try {
    const spec = `${holder.port}-${holder.port}`;
    const result = await runCli(["--range", spec]);
    assert.equal(result.code, 1, result.stderr);
    assert.equal(result.stdout, "");
    assert.match(result.stderr, /^portpicker: [^\n]+\n$/);
    assert.ok(result.stderr.includes(spec), result.stderr);
    assert.doesNotMatch(result.stderr, /^\s+at /m);
  } finally {
    await holder.release();
  }
});

test("-n 2 in a range of 1 free port says the range has fewer free ports than asked, and how many", async () => {
  const [port] = await freeRange(1);
  const result = await runCli(["--range", `${port}-${port}`, "-n", "2"]);
  assert.equal(result.code, 1, result.stderr);
  assert.equal(result.stdout, "");
  assert.equal(
    result.stderr,
    `portpicker: Not enough free ports in ${port}-${port}: asked for 2, found 1 of its 1 ports\n`,
  );
});

test("hold_seconds: returns at once, the port listens meanwhile, then is free", async () => {
  await checkHold(cliCommandAllowing(NET_RUN), 2);
});

test("hold_seconds works with PORTPICKER_LOCK_DIR set", async () => {
  const dir = tempDir();
  try {
    const result = await runCliAllowing(ALL, [String(process.pid), "600"], {
      env: { PORTPICKER_LOCK_DIR: dir.path },
    });
    const [port] = printedPorts(result, 1);
    try {
      assert.equal(await isPortFree(port), false, "the port is not held");
    } finally {
      killHolder(port, 600);
    }
  } finally {
    dir.remove();
  }
});

test("$(portpicker $$ 10) does not wait for the holding process", async () => {
  const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;
  const cli = cliCommandAllowing(NET_RUN).map(quote).join(" ");
  const result = await run(
    ["bash", "-c", `p=$(${cli} "$$" 10); echo "got $p"`],
    { env: { PORTSERVER_ADDRESS: undefined }, timeoutMs: 60_000 },
  );
  assert.equal(result.code, 0, result.stderr);
  assert.match(result.stdout, /^got \d+\n$/);
  // Had bash waited for the holder, the port would be free again by now.
  const port = Number(result.stdout.slice(4));
  assert.equal(await isPortFree(port), false, "the port is not held");
});

// ---------------------------------------------------------------------------
// The binary compiled as the README says (`bun build --compile …`), built once.

let binary: Promise<string> | undefined;

function compiled(): Promise<string> {
  return binary ??= (async () => {
    const dir = tempDir("portpicker-bin-");
    process.on(
      "exit",
      () => rmSync(dir.path, { recursive: true, force: true }),
    );
    const out = join(dir.path, "portpicker");
    const result = await run([
      tool("bun"),
      ...COMPILE_ARGS,
      "--outfile",
      out,
    ], {
      timeoutMs: 120_000,
    });
    assert.equal(
      result.code,
      0,
      `bun build --compile failed: ${result.stderr}${result.stdout}`,
    );
    return out;
  })();
}

test("compiled binary: prints one port, exit 0", async () => {
  const bin = await compiled();
  printedPorts(await run([bin], { env: { PORTSERVER_ADDRESS: undefined } }), 1);
});

test("compiled binary: -n 2 --json", async () => {
  const result = await run([await compiled(), "-n", "2", "--json"], {
    env: { PORTSERVER_ADDRESS: undefined },
  });
  assert.equal(result.code, 0, result.stderr);
  const { ports } = JSON.parse(result.stdout);
  assert.equal(ports.length, 2);
  assert.notEqual(ports[0], ports[1]);
});

test("compiled binary: usage errors exit 2 with one line", async () => {
  const bin = await compiled();
  for (const args of [["--nope"], ["abc"], ["--range", "5-3"]]) {
    assertUsageError(await run([bin, ...args]), args);
  }
});

test("compiled binary: --help and --version", async () => {
  const bin = await compiled();
  const help = await run([bin, "--help"]);
  assert.equal(help.code, 0, help.stderr);
  assert.match(help.stdout, /Usage:/);
  const version = await run([bin, "--version"]);
  assert.equal(version.code, 0, version.stderr);
  assert.equal(version.stdout, `portpicker ${VERSION}\n`);
});

test("compiled binary: the pid argument is told to the port server", async () => {
  const address = uniqueName("bin-pid");
  const pool = await freeRange(2);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    const bin = await compiled();
    const pid = server.child.pid!;
    const [a] = printedPorts(
      await run([bin, String(pid)], { env: { PORTSERVER_ADDRESS: address } }),
      1,
    );
    const [b] = printedPorts(
      await run([bin], { env: { PORTSERVER_ADDRESS: address } }),
      1,
    );
    assert.ok(
      inRange(a, pool) && inRange(b, pool),
      `${a}, ${b} not from the pool ${pool}`,
    );
    assert.deepEqual(await requestedPids(server, 2), [pid, process.pid]);
  } finally {
    await server.stop();
  }
});

test("compiled binary: hold_seconds 1 keeps the port listening, then frees it", async () => {
  await checkHold([await compiled()], 1);
});
