/**
 * The bench: picking, exhaustion, the port server, start-up and memory, ours
 * against Debian's python3-portpicker (and get-port for picking), all in one
 * run on one machine. Writes DIR/results.md (the tables, the targets, the
 * machine) and DIR/chart.svg, and prints the markdown.
 *
 * Usage: deno task bench
 *        deno run -A bench/run.ts [--tiny] [--out DIR] [--only a,b]
 *
 *   --tiny      tiny sizes, one repetition: checks that the bench runs
 *   --out DIR   where to write results.md and chart.svg (default: bench/)
 *   --only a,b  run only these sections: pick, exhaust, server, startup,
 *               memory
 *
 * Written with node: APIs only, so it also runs on Bun and Node. Exits 1 when
 * a figure could not be measured (the files are written all the same).
 */

import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import os from "node:os";
import { join, resolve } from "node:path";
import process from "node:process";
import { parseArgs } from "node:util";
import { DEFAULT_RANGE, isPortFree } from "../mod.ts";
import { COMPILE_ARGS } from "../tests/helpers.ts";
import { renderChart } from "./chart.ts";
import type { LoadResult } from "./load.ts";
import {
  type Background,
  cpuTicks,
  killAll,
  lastLines,
  peakRssKiB,
  PYTHON,
  PYTHON_PORTSERVER,
  ROOT,
  run,
  runJson,
  sleep,
  startBackground,
  startSleeper,
  tool,
  waitForLog,
} from "./proc.ts";
import {
  bars,
  checkKey,
  CONCURRENCIES,
  type Exhaustion,
  type Machine,
  measuredRequests,
  memoryKey,
  OCCUPANCIES,
  type Picker,
  PICKERS,
  pickKey,
  renderMarkdown,
  type Results,
  type Section,
  SECTIONS,
  serverKey,
  type ServerKind,
  SERVERS,
  type Sizes,
  type Startup,
  startupKey,
  STARTUPS,
} from "./report.ts";

const FULL: Sizes = {
  reps: 5,
  picks: 2000,
  exhaustCap: 0,
  pool: 10_000,
  startupReps: 10,
  memoryPool: 10_000,
};
const TINY: Sizes = {
  reps: 1,
  picks: 50,
  exhaustCap: 300,
  pool: 200,
  startupReps: 2,
  memoryPool: 500,
};

/**
 * Where the servers' pools start. Pools lie below the pickers' default range
 * (15000-24999, which every picker on the host uses), the tests' ranges
 * (25000-32767) and the kernel's ephemeral ports (which the servers warn
 * about), and leave out the ports in use when the section starts (Deno's
 * inspector on 9229, say).
 */
const SERVER_POOL_FIRST = 5000;
const MEMORY_POOL_FIRST = 1024;
/** Concurrency of the pre-fill: its speed is not measured. */
const FILL_CONCURRENCY = 16;
/** Untimed requests before each timed load run (see load.ts). */
const WARM_UP_REQUESTS = 100;
/** Clock ticks per second of /proc's CPU times; set from `getconf CLK_TCK`. */
let clockTicks = 100;

const DENO = tool("deno");
const BUN = tool("bun");
const NODE = tool("node");
const PICK = join(ROOT, "bench", "pick.ts");
const EXHAUST = join(ROOT, "bench", "exhaust.ts");
const GETPORT = join(ROOT, "bench", "getport.mjs");
const LOAD = join(ROOT, "bench", "load.ts");

/** pick.ts's loop, for Python's pick_unused_port. */
const PYTHON_PICK = `
import json, sys, time, portpicker
n = int(sys.argv[1])
for _ in range(20):
    portpicker.pick_unused_port()
began = time.perf_counter()
for _ in range(n):
    portpicker.pick_unused_port()
rate = n / (time.perf_counter() - began)
port = portpicker.pick_unused_port()
for _ in range(20):
    portpicker.is_port_free(port)
began = time.perf_counter()
for _ in range(n):
    if not portpicker.is_port_free(port):
        raise SystemExit("port %d was taken" % port)
print(json.dumps({"rate": rate, "checkRate": n / (time.perf_counter() - began)}))
`;

/** exhaust.ts's loop, for Python's pick_unused_port. */
const PYTHON_EXHAUST = `
import json, sys, time, portpicker
cap = int(sys.argv[1])
ports = set()
exhausted = False
began = time.perf_counter()
while cap == 0 or len(ports) < cap:
    try:
        ports.add(portpicker.pick_unused_port())
    except portpicker.NoFreePortFoundError:
        exhausted = True
        break
print(json.dumps({"distinct": len(ports), "exhausted": exhausted,
                  "seconds": time.perf_counter() - began}))
`;

type Runtime = "deno" | "bun" | "node";

/** A TypeScript file of this repo run on `runtime`, as the library's users run it. */
function tsCommand(runtime: Runtime, script: string): string[] {
  if (runtime === "deno") {
    return [DENO, "run", "-A", "--unstable-net", "--no-config", script];
  }
  return [runtime === "bun" ? BUN : NODE, script];
}

/** The state of one run, shared by the sections. */
interface Context {
  sizes: Sizes;
  results: Results;
  /** A temporary folder for logs and the compiled binary. */
  tmp: string;
}

function log(line: string): void {
  process.stderr.write(`bench: ${line}\n`);
}

function clients(count: number): string {
  return `${count} client${count === 1 ? "" : "s"}`;
}

/** Notes something odd; the same note from several runs is counted once. */
function note(ctx: Context, text: string): void {
  const notes = ctx.results.notes;
  notes.set(text, (notes.get(text) ?? 0) + 1);
}

function add(ctx: Context, key: string, value: number): void {
  const values = ctx.results.samples.get(key) ?? [];
  values.push(value);
  ctx.results.samples.set(key, values);
}

/**
 * Runs one measurement; a failure is recorded and the bench goes on, so that
 * one broken peer does not cost the other figures.
 */
async function attempt(
  ctx: Context,
  what: string,
  measure: () => Promise<void>,
): Promise<void> {
  try {
    await measure();
  } catch (error) {
    const message = (error as Error).message ?? String(error);
    ctx.results.errors.push(`${what}: ${message}`);
    log(`FAILED ${what}: ${message}`);
  }
}

// ---------------------------------------------------------------------------
// 1. Picking without a server.

async function benchPick(ctx: Context): Promise<void> {
  const n = String(ctx.sizes.picks);
  const commands: Record<Picker, string[]> = {
    deno: [...tsCommand("deno", PICK), n],
    bun: [...tsCommand("bun", PICK), n],
    node: [...tsCommand("node", PICK), n],
    python: [PYTHON, "-c", PYTHON_PICK, n],
    getport: [NODE, GETPORT, n],
  };
  // The pickers take turns in each repetition, so that a busy moment of the
  // machine does not fall on one of them only.
  for (let rep = 0; rep < ctx.sizes.reps; rep++) {
    for (const picker of PICKERS) {
      await attempt(ctx, `picking, ${picker}, run ${rep + 1}`, async () => {
        const { rate, checkRate } = await runJson<
          { rate: number; checkRate?: number }
        >(commands[picker]);
        add(ctx, pickKey(picker), rate);
        if (checkRate !== undefined) add(ctx, checkKey(picker), checkRate);
      });
    }
  }
}

// ---------------------------------------------------------------------------
// 2. Exhaustion.

async function benchExhaust(ctx: Context): Promise<void> {
  const cap = String(ctx.sizes.exhaustCap);
  await attempt(ctx, "exhaustion, ours", async () => {
    ctx.results.exhaustion.ours = await runJson<Exhaustion>([
      ...tsCommand("deno", EXHAUST),
      cap,
    ]);
  });
  await attempt(ctx, "exhaustion, Python", async () => {
    ctx.results.exhaustion.python = await runJson<Exhaustion>([
      PYTHON,
      "-c",
      PYTHON_EXHAUST,
      cap,
    ]);
  });
}

// ---------------------------------------------------------------------------
// 3. The port server.

let addresses = 0;

/** An abstract socket name nobody else uses. */
function uniqueAddress(): string {
  return `@portpicker-bench-${process.pid}-${++addresses}`;
}

function serverCommand(
  kind: ServerKind,
  address: string,
  pool: string,
): string[] {
  switch (kind) {
    case "deno":
      return [
        DENO,
        "run",
        "-A",
        "--unstable-net",
        join(ROOT, "cli.ts"),
        "serve",
        "--pool",
        pool,
        "--address",
        address,
      ];
    case "bun":
      return [
        BUN,
        join(ROOT, "cli.ts"),
        "serve",
        "--pool",
        pool,
        "--address",
        address,
      ];
    case "python":
      return [
        PYTHON,
        PYTHON_PORTSERVER,
        `--portserver_address=${address}`,
        `--portserver_static_pool=${pool}`,
      ];
  }
}

interface RunningServer {
  proc: Background;
  address: string;
  logFile: string;
}

/**
 * A pool of `size` ports free now, from `first` up and below the pickers'
 * default range, as the servers' `--pool` takes it: `A-B[,C-D...]`.
 */
async function freePool(size: number, first: number): Promise<string> {
  const ranges: [number, number][] = [];
  let found = 0;
  for (let port = first; port < DEFAULT_RANGE[0] && found < size; port++) {
    if (!(await isPortFree(port))) continue;
    found++;
    const last = ranges.at(-1);
    if (last && last[1] === port - 1) last[1] = port;
    else ranges.push([port, port]);
  }
  if (found < size) {
    throw new Error(
      `only ${found} free ports from ${first} to ${DEFAULT_RANGE[0] - 1}`,
    );
  }
  return ranges.map(([a, b]) => `${a}-${b}`).join(",");
}

/** A section's pool, kept for the report; undefined when there is none. */
async function pool(
  ctx: Context,
  section: "server" | "memory",
  size: number,
  first: number,
): Promise<string | undefined> {
  await attempt(ctx, `${section}: a pool of ${size} free ports`, async () => {
    ctx.results.pools[section] = await freePool(size, first);
  });
  return ctx.results.pools[section];
}

/** Starts a fresh server and waits until it serves. */
async function startServer(
  ctx: Context,
  kind: ServerKind,
  pool: string,
): Promise<RunningServer> {
  const address = uniqueAddress();
  const logFile = join(ctx.tmp, `${address.slice(1)}.log`);
  const proc = startBackground(serverCommand(kind, address, pool), logFile);
  try {
    await waitForLog(proc, logFile, /Serving on/);
  } catch (error) {
    await proc.stop();
    throw error;
  }
  return { proc, address, logFile };
}

function serverLog(server: RunningServer): string {
  return existsSync(server.logFile)
    ? lastLines(readFileSync(server.logFile, "utf8"), 3)
    : "";
}

/** Runs the load client against a server. */
function load(
  address: string,
  pids: number[],
  requests: number,
  concurrency: number,
  share = 100,
): Promise<LoadResult> {
  return runJson<LoadResult>([
    ...tsCommand("node", LOAD),
    "--address",
    address,
    "--pids",
    pids.join(","),
    "--share",
    String(share),
    "--requests",
    String(requests),
    "--concurrency",
    String(concurrency),
  ]);
}

/** What one timed load run tells about a server. */
interface Measured extends LoadResult {
  /** The server's CPU time (user and system) per timed request, in µs. */
  cpuUs: number;
}

/**
 * The timed run of the load client: warmed up with refused requests, then
 * timed, with the server's CPU time read right before and after the timed
 * requests. The CPU time does not depend on the client, which on a small
 * machine competes with the server for the cores.
 */
async function measure(
  server: RunningServer,
  pid: number,
  requests: number,
  concurrency: number,
): Promise<Measured> {
  let before = NaN;
  const result = await runJson<LoadResult>([
    ...tsCommand("node", LOAD),
    "--address",
    server.address,
    "--pids",
    String(pid),
    "--requests",
    String(requests),
    "--concurrency",
    String(concurrency),
    "--warmup",
    String(WARM_UP_REQUESTS),
    "--handshake",
  ], { onWarm: () => before = cpuTicks(server.proc.pid) });
  const ticks = cpuTicks(server.proc.pid) - before;
  return { ...result, cpuUs: ticks / clockTicks * 1e6 / requests };
}

/**
 * Hands every port of a fresh server's pool to live processes; fails unless
 * (nearly) all of them were handed out: a few may be in use by something
 * else on the machine, and are noted.
 */
async function fill(
  ctx: Context,
  server: RunningServer,
  pids: number[],
  share: number,
  pool: number,
  what: string,
): Promise<void> {
  const result = await load(
    server.address,
    pids,
    pool,
    FILL_CONCURRENCY,
    share,
  );
  if (result.ok < pool * 0.98) {
    throw new Error(
      `the server handed out ${result.ok} of ${pool} ports (${result.empty} empty replies, ${result.errors} errors); its log: ${
        serverLog(server)
      }`,
    );
  }
  if (result.ok < pool) {
    note(
      ctx,
      `${what}: ${
        pool - result.ok
      } of the pool's ${pool} ports were not handed out (in use by something else?).`,
    );
  }
}

/** Waits until a killed process is gone from /proc (reaped). */
async function gone(proc: Background): Promise<void> {
  await proc.stop("SIGKILL");
  while (existsSync(`/proc/${proc.pid}`)) await sleep(5);
}

/** One cell of section 3 on a fresh server: see the report for the scenario. */
async function serverCell(
  ctx: Context,
  kind: ServerKind,
  spec: string,
  occupancy: number,
  concurrency: number,
): Promise<void> {
  const { pool } = ctx.sizes;
  const what = `server ${kind}, ${occupancy} % held, ${clients(concurrency)}`;
  const [a, b, c] = [startSleeper(), startSleeper(), startSleeper()];
  let server: RunningServer | undefined;
  try {
    server = await startServer(ctx, kind, spec);
    // A holds the occupancy's share, B the rest, interleaved (see load.ts).
    await fill(ctx, server, [a.pid, b.pid], occupancy, pool, what);
    // B dies: its ports are reclaimable, A's are held by a live process.
    await gone(b);
    const requests = measuredRequests(pool);
    const result = await measure(server, c.pid, requests, concurrency);
    if (result.ok === 0) {
      throw new Error(
        `no port in ${requests} requests; the server's log: ${
          serverLog(server)
        }`,
      );
    }
    if (result.ok < requests) {
      note(
        ctx,
        `${what}: ${
          requests - result.ok
        } of ${requests} timed requests got no port (${result.errors} errors).`,
      );
    }
    add(ctx, serverKey(kind, occupancy, concurrency, "rps"), result.rps);
    add(ctx, serverKey(kind, occupancy, concurrency, "p50"), result.p50Ms);
    add(ctx, serverKey(kind, occupancy, concurrency, "p99"), result.p99Ms);
    add(ctx, serverKey(kind, occupancy, concurrency, "cpu"), result.cpuUs);
  } finally {
    await server?.proc.stop();
    await Promise.all([a, b, c].map((p) => p.stop()));
  }
}

async function benchServer(ctx: Context): Promise<void> {
  const spec = await pool(ctx, "server", ctx.sizes.pool, SERVER_POOL_FIRST);
  if (spec === undefined) return;
  for (let rep = 0; rep < ctx.sizes.reps; rep++) {
    for (const occupancy of OCCUPANCIES) {
      for (const concurrency of CONCURRENCIES) {
        for (const kind of SERVERS) {
          const what = `server ${kind}, ${occupancy} % held, ${
            clients(concurrency)
          }, run ${rep + 1}`;
          log(what);
          await attempt(
            ctx,
            what,
            () => serverCell(ctx, kind, spec, occupancy, concurrency),
          );
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 4. Start-up.

async function benchStartup(ctx: Context): Promise<void> {
  const binary = join(ctx.tmp, "portpicker");
  const pid = String(process.pid);
  const commands: Partial<Record<Startup, string[]>> = {
    deno: [DENO, "run", "-A", "cli.ts", pid],
    bun: [BUN, "cli.ts", pid],
    node: [NODE, "cli.ts", pid],
    python: [PYTHON, "-m", "portpicker", pid],
  };
  await attempt(ctx, "start-up, bun build --compile", async () => {
    const built = await run([BUN, ...COMPILE_ARGS, "--outfile", binary]);
    if (built.code !== 0) {
      throw new Error(lastLines(built.stderr + built.stdout));
    }
    commands.binary = [binary, pid];
  });
  const ready = STARTUPS.filter((s) => commands[s] !== undefined);
  const timed = async (command: Startup): Promise<number> => {
    // Python's cwd must not shadow its portpicker module.
    const cwd = command === "python" ? ctx.tmp : ROOT;
    const result = await run(commands[command]!, { timeoutMs: 60_000, cwd });
    if (result.code !== 0 || !/^\d+\n$/.test(result.stdout)) {
      throw new Error(
        `exit ${result.code ?? result.signal}, printed ${
          JSON.stringify(result.stdout)
        }: ${lastLines(result.stderr)}`,
      );
    }
    return result.wallMs;
  };
  // One untimed run each: caches (Deno's transpiled modules, the page cache)
  // are warm for all of them alike.
  for (const command of ready) {
    await attempt(ctx, `start-up, ${command}, warm-up`, async () => {
      await timed(command);
    });
  }
  for (let rep = 0; rep < ctx.sizes.startupReps; rep++) {
    for (const command of ready) {
      await attempt(ctx, `start-up, ${command}, run ${rep + 1}`, async () => {
        add(ctx, startupKey(command), await timed(command));
      });
    }
  }
}

// ---------------------------------------------------------------------------
// 5. Memory.

async function benchMemory(ctx: Context): Promise<void> {
  const size = ctx.sizes.memoryPool;
  const spec = await pool(ctx, "memory", size, MEMORY_POOL_FIRST);
  if (spec === undefined) return;
  for (let rep = 0; rep < ctx.sizes.reps; rep++) {
    for (const kind of SERVERS) {
      const what = `memory, ${kind}, run ${rep + 1}`;
      log(what);
      await attempt(ctx, what, async () => {
        const owner = startSleeper();
        let server: RunningServer | undefined;
        try {
          server = await startServer(ctx, kind, spec);
          add(ctx, memoryKey(kind, "start"), peakRssKiB(server.proc.pid));
          await fill(ctx, server, [owner.pid], 100, size, `memory, ${kind}`);
          add(ctx, memoryKey(kind, "full"), peakRssKiB(server.proc.pid));
        } finally {
          await server?.proc.stop();
          await owner.stop();
        }
      });
    }
  }
}

// ---------------------------------------------------------------------------
// The machine.

/** A command's first line of output, or "unknown": a version must not stop the bench. */
async function firstLine(command: string[]): Promise<string> {
  try {
    const result = await run(command, { timeoutMs: 30_000 });
    const line = (result.stdout || result.stderr).trim().split("\n")[0];
    return result.code === 0 && line ? line : "unknown";
  } catch {
    return "unknown";
  }
}

async function machine(): Promise<Machine> {
  const cores = Number(await firstLine(["nproc"])) ||
    os.availableParallelism();
  clockTicks = Number(await firstLine(["getconf", "CLK_TCK"])) || 100;
  let cpu = "unknown CPU";
  try {
    cpu = /^model name\s*:\s*(.+)$/m.exec(
      readFileSync("/proc/cpuinfo", "utf8"),
    )?.[1].trim() ?? cpu;
  } catch { /* not Linux */ }
  const getPort = JSON.parse(
    readFileSync(
      join(ROOT, "node_modules", "get-port", "package.json"),
      "utf8",
    ),
  ).version as string;
  const head = await firstLine([
    "git",
    "-C",
    ROOT,
    "rev-parse",
    "--short",
    "HEAD",
  ]);
  const dirty = (await run(["git", "-C", ROOT, "status", "--porcelain"]))
    .stdout.trim() !== "";
  return {
    cores,
    clockTicks,
    cpu,
    date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    commit: `${head}${dirty ? " with uncommitted changes" : ""}`,
    versions: [
      [
        "Deno",
        (await firstLine([DENO, "--version"])).replace(/^deno /, "").replace(
          / \(.*/,
          "",
        ),
      ],
      ["Bun", await firstLine([BUN, "--version"])],
      ["Node", (await firstLine([NODE, "--version"])).replace(/^v/, "")],
      [
        "Python",
        (await firstLine([PYTHON, "--version"])).replace(/^Python /, ""),
      ],
      [
        "python3-portpicker",
        await firstLine([
          PYTHON,
          "-c",
          "import importlib.metadata as m; print(m.version('portpicker'))",
        ]),
      ],
      ["get-port", getPort],
    ],
    loadBefore: os.loadavg(),
    loadAfter: [],
  };
}

/**
 * A file's text as `deno fmt` writes it (markdown prose wrapped at 80
 * columns, SVG attributes wrapped), so that the results committed to the
 * repository pass its `deno fmt --check`; as it is when Deno cannot format it.
 */
async function formatted(text: string, ext: "md" | "svg"): Promise<string> {
  let why: string;
  try {
    const result = await run([DENO, "fmt", "--ext", ext, "-"], {
      input: text,
      timeoutMs: 60_000,
    });
    if (result.code === 0 && result.stdout.trim() !== "") return result.stdout;
    why = lastLines(result.stderr);
  } catch (error) {
    why = (error as Error).message;
  }
  log(`deno fmt failed, the .${ext} file is left unformatted: ${why}`);
  return text;
}

// ---------------------------------------------------------------------------

interface Options {
  sizes: Sizes;
  out: string;
  sections: Section[];
}

function parseOptions(args: string[]): Options {
  const { values } = parseArgs({
    args,
    options: {
      tiny: { type: "boolean", default: false },
      out: { type: "string" },
      only: { type: "string" },
    },
  });
  const sections = values.only === undefined
    ? [...SECTIONS]
    : values.only.split(",").map((s) => s.trim());
  for (const section of sections) {
    if (!(SECTIONS as readonly string[]).includes(section)) {
      throw new Error(
        `unknown section ${JSON.stringify(section)}: expected ${
          SECTIONS.join(", ")
        }`,
      );
    }
  }
  return {
    sizes: values.tiny ? TINY : FULL,
    out: resolve(values.out ?? join(ROOT, "bench")),
    sections: SECTIONS.filter((s) => sections.includes(s)),
  };
}

async function main(): Promise<number> {
  const args = process.argv.slice(2);
  const options = parseOptions(args);
  const began = performance.now();
  const tmp = mkdtempSync(join(os.tmpdir(), "portpicker-bench-"));
  temporary = tmp;
  try {
    const results: Results = {
      sizes: options.sizes,
      sections: options.sections,
      machine: await machine(),
      samples: new Map(),
      exhaustion: {},
      pools: {},
      errors: [],
      notes: new Map(),
      wallSeconds: 0,
      command: ["bench/run.ts", ...args].join(" "),
    };
    if (!existsSync(PYTHON_PORTSERVER)) {
      results.errors.push(
        "Debian's python3-portpicker is not installed (apt-get install python3-portpicker): no Python figures",
      );
    }
    const ctx: Context = { sizes: options.sizes, results, tmp };
    const sections: Record<Section, (ctx: Context) => Promise<void>> = {
      pick: benchPick,
      exhaust: benchExhaust,
      server: benchServer,
      startup: benchStartup,
      memory: benchMemory,
    };
    for (const section of options.sections) {
      log(`section ${section}`);
      await sections[section](ctx);
    }
    results.machine.loadAfter = os.loadavg();
    results.wallSeconds = (performance.now() - began) / 1000;
    const markdown = await formatted(renderMarkdown(results), "md");
    const m = results.machine;
    const chart = await formatted(
      renderChart(
        bars(results),
        "portpicker (TypeScript) against Python's portpicker",
        `Above 1×, ours is better. Server: requests per second. ${m.cores} cores, ${
          m.date.slice(0, 10)
        }.`,
      ),
      "svg",
    );
    mkdirSync(options.out, { recursive: true });
    writeFileSync(join(options.out, "results.md"), markdown);
    writeFileSync(join(options.out, "chart.svg"), chart);
    process.stdout.write(markdown);
    log(
      `wrote ${join(options.out, "results.md")} and chart.svg in ${
        results.wallSeconds.toFixed(0)
      } s`,
    );
    return results.errors.length === 0 ? 0 : 1;
  } finally {
    cleanUp();
  }
}

/** The run's temporary folder, removed at the end or on interruption. */
let temporary: string | undefined;

/** Kills every child process still running and removes the temporary folder. */
function cleanUp(): void {
  killAll();
  if (temporary) rmSync(temporary, { recursive: true, force: true });
  temporary = undefined;
}

// Interrupted: no server or sleeper may outlive the bench.
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    cleanUp();
    process.exit(130);
  });
}

let status: number;
try {
  status = await main();
} catch (error) {
  log(`error: ${(error as Error).stack ?? error}`);
  status = 2;
}
process.exit(status);
