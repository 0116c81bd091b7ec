/**
 * The bench: picking, exhaustion, the port server, start-up and memory, ours
 * against Debian's python3-portpicker, get-port and the runtime's own sockets
 * (bench/trivial.ts), all in one run on one machine. Writes
 * DIR/results.md and DIR/chart.svg, and prints the markdown.
 *
 * Usage: deno task bench
 *        deno run -A bench/run.ts [--tiny] [--only SECTIONS] [--out DIR]
 *
 *   --tiny           tiny sizes, one repetition: checks that the bench runs
 *   --only SECTIONS  only these sections, by name, comma-separated (pick,
 *                    exhaust, server, startup, memory): for trying a change;
 *                    the others show as not measured
 *   --out DIR        where to write results.md and chart.svg (default: bench/)
 *
 * Written with node: APIs, so it also runs on Bun and Node; uses only the
 * library's public API and its CLI. Exits 1 when a figure could not be
 * measured (the files are written all the same).
 */

import { type ChildProcess, execFile, spawn } from "node:child_process";
import * as fs from "node:fs";
import os from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { DEFAULT_RANGE, isPortFree } from "../mod.ts";
import { renderChart } from "./chart.ts";
import * as report from "./report.ts";
import { MEMORY, PICKERS, RUNTIMES, SERVERS, STARTUPS } from "./report.ts";
import type { Results, Section } from "./report.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const { values } = parseArgs({
  options: {
    tiny: { type: "boolean", default: false },
    only: { type: "string" },
    out: { type: "string", default: join(ROOT, "bench") },
  },
});
const [reps, picks, exhaustCap, pool, memoryPool, startupReps] = values.tiny
  ? [1, 50, 300, 200, 500, 2]
  : [5, 2000, 0, 10_000, 10_000, 10];
const sizes = { reps, picks, exhaustCap, pool, memoryPool, startupReps };
/** Untimed requests before each timed run: client and server code are warm. */
const WARM_UP = 100;
/** Pinned in node_modules/.bin, else on PATH; python3 is Debian's. */
const TOOLS: Record<string, string> = { python3: "/usr/bin/python3" };
for (const name of ["deno", "bun", "node"]) {
  const local = join(ROOT, "node_modules", ".bin", name);
  TOOLS[name] = fs.existsSync(local) ? local : name;
}
/** A command line from words; the first names a tool. */
const sh = (line: string) => line.split(" ").map((w) => TOOLS[w] ?? w);
/** What a JSR user gets with `deno test --allow-net`, with and without `--unstable-net`. */
const DENO_PICK =
  "deno run --allow-net --unstable-net --no-config bench/pick.ts";
const DENO_STABLE_PICK = "deno run --allow-net --no-config bench/pick.ts";
const tmp = fs.mkdtempSync(join(os.tmpdir(), "portpicker-bench-"));
const LOAD = join(tmp, "load");

/** pick.ts's loops, for Python's portpicker: `pick N` or `exhaust CAP`. */
const PYTHON_PICK = `
import json, sys, time, portpicker as p
mode, n = sys.argv[1], int(sys.argv[2])
def rate(f):
    for _ in range(20): f()
    began = time.perf_counter()
    for _ in range(n): f()
    return n / (time.perf_counter() - began)
def check():
    if not p.is_port_free(port): raise SystemExit("port %d was taken" % port)
if mode == "pick":
    picks = rate(p.pick_unused_port); port = p.pick_unused_port()
    print(json.dumps({"rate": picks, "checkRate": rate(check)}))
else:
    ports, exhausted, began = set(), False, time.perf_counter()
    try:
        while n == 0 or len(ports) < n: ports.add(p.pick_unused_port())
    except p.NoFreePortFoundError: exhausted = True
    print(json.dumps({"distinct": len(ports), "exhausted": exhausted,
                      "seconds": time.perf_counter() - began}))
`;
const PYTHON = [TOOLS.python3, "-c", PYTHON_PICK];

/** Each server's command, given its address and pool. */
const IDLE = join(tmp, "idle.js");
fs.writeFileSync(IDLE, 'console.log("Serving on"); setTimeout(() => {}, 1e9);');
const SERVE: Record<string, (address: string, pool: string) => string[]> = {
  deno: (a, p) =>
    sh(`deno run -A --unstable-net cli.ts serve --pool ${p} --address ${a}`),
  bun: (a, p) => sh(`bun cli.ts serve --pool ${p} --address ${a}`),
  python: (a, p) =>
    sh(`python3 /usr/bin/portserver --portserver_address=${a}`)
      .concat(`--portserver_static_pool=${p}`),
  "deno-trivial": (a) => sh(`deno run -A --unstable-net bench/trivial.ts ${a}`),
  "bun-trivial": (a) => sh(`bun bench/trivial.ts ${a}`),
  "deno-empty": () => sh(`deno run -A --unstable-net ${IDLE}`),
  "bun-empty": () => sh(`bun ${IDLE}`),
};

const command = ["bench/run.ts", ...process.argv.slice(2)].join(" ");
const results = report.emptyResults(sizes, command);
const log = (line: string) => process.stderr.write(`bench: ${line}\n`);
const add = (key: string, value: number) =>
  results.samples.set(key, [...results.samples.get(key) ?? [], value]);
/** Something odd; the same note from several runs is counted once. */
const note = (text: string) =>
  results.notes.set(text, (results.notes.get(text) ?? 0) + 1);
const lastLines = (text: string, count = 5) =>
  text.trim().split("\n").slice(-count).join(" | ");

// ---------------------------------------------------------------------------
// Processes: every child is tracked, so that none outlives the bench.

/**
 * No child may ask a port server the bench did not start, nor claim ports
 * (as Python does not), but the rows that measure claims.
 */
const env: Record<string, string | undefined> = {
  ...process.env,
  PORTPICKER_LOCK_DIR: "",
};
delete env.PORTSERVER_ADDRESS;
const live = new Set<ChildProcess>();
const track = (child: ChildProcess) => {
  live.add(child);
  child.on("exit", () => live.delete(child));
  return child;
};

/** Runs a command to its end; its wall time from spawn to exit, in ms. */
type Ran = { code: number; stdout: string; stderr: string; wallMs: number };
function run(command: string[], timeout = 600_000, cwd = ROOT): Promise<Ran> {
  const [began, [file, ...args]] = [performance.now(), command];
  const options = { cwd, env, timeout, killSignal: 9, maxBuffer: 1e9 };
  return new Promise((resolve) => {
    track(execFile(file, args, options, (error, stdout, stderr) => {
      const code = error ? Number(error.code) || -1 : 0;
      resolve({ code, stdout, stderr, wallMs: performance.now() - began });
    }));
  });
}

/** Runs a command that prints a JSON object last; throws unless it exits 0. */
async function runJson<T>(command: string[]): Promise<T> {
  const r = await run(command);
  try {
    if (r.code === 0) return JSON.parse(r.stdout.trim().split("\n").at(-1)!);
  } catch { /* thrown below */ }
  const how = `${command.join(" ").slice(0, 200)} exited ${r.code}`;
  throw new Error(`${how}: ${lastLines(r.stderr + r.stdout)}`);
}

/**
 * Starts a background process, its output to `logFile`, not through a pipe:
 * a server that logs each request must not cost the bench CPU time while it
 * is measured. `stop` kills it and waits until it is reaped.
 */
function background(command: string[], logFile = "/dev/null") {
  const [fd, [file, ...args]] = [fs.openSync(logFile, "a"), command];
  const stdio: ("ignore" | number)[] = ["ignore", fd, fd];
  const child = track(spawn(file, args, { cwd: ROOT, env, stdio }));
  fs.closeSync(fd);
  let exited = false;
  const gone = new Promise((done) => child.on("exit", done).on("error", done));
  gone.then(() => exited = true);
  const stop = () => (exited || child.kill("SIGKILL"), gone);
  return { pid: child.pid ?? 0, stop, exited: () => exited };
}
/** A live process to hold ports for. */
const sleeper = () => background(["sleep", "600"]);

/** The peak resident set size of a live process (VmHWM), in KiB. */
function peakRssKiB(pid: number): number {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/^VmHWM:\s+(\d+) kB$/m.exec(status)?.[1] ?? NaN);
}
/** The CPU time of a live process, user and system, in clock ticks. */
function cpuTicks(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
  // Fields 14 and 15 of stat(5), counted after the command's closing ")".
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

// ---------------------------------------------------------------------------
// Measurements.

/** Runs one measurement; a failure is recorded and the bench goes on. */
async function attempt(what: string, measure: () => Promise<unknown>) {
  try {
    await measure();
  } catch (error) {
    const message = (error as Error).message ?? String(error);
    results.errors.push(`${what}: ${message}`);
    log(`FAILED ${what}: ${message}`);
  }
}

type Measure = (kind: string) => Promise<unknown>;
/**
 * `reps` runs of each kind in turn, so that a busy moment of the machine does
 * not fall on one kind only.
 */
async function repeat(what: string, reps: number, kinds: string[], m: Measure) {
  for (let rep = 1; rep <= reps; rep++) {
    for (const kind of kinds) {
      const name = `${what}, ${kind}${reps > 1 ? `, run ${rep}` : ""}`;
      log(name);
      await attempt(name, () => m(kind));
    }
  }
}

/**
 * A pool of `size` ports free now, from `from` up, as `--pool` takes it
 * (`A-B,C-D`): below the pickers' default range (which every picker on the
 * host uses), the tests' ranges and the kernel's ephemeral ports.
 */
async function freePool(key: "server" | "memory", size: number, from: number) {
  await attempt(`${key}: a pool of ${size} free ports`, async () => {
    const ranges: number[][] = [];
    for (let port = from, found = 0; found < size; port++) {
      if (port >= DEFAULT_RANGE[0]) throw new Error(`${found} free ports only`);
      if (!(await isPortFree(port))) continue;
      found++;
      if (ranges.at(-1)?.[1] === port - 1) ranges.at(-1)![1] = port;
      else ranges.push([port, port]);
    }
    results.pools[key] = ranges.map(([a, b]) => `${a}-${b}`).join(",");
  });
  return results.pools[key];
}

/** A server that serves: its name is its kind and cell (`deno/50/16`). */
type Server = { pid: number; address: string; name: string; log(): string };
let addresses = 0;

/** Runs `body` on a fresh server of each kind, once it serves; then stops it. */
function served(spec: string, cell: string, body: (s: Server) => unknown) {
  return async (kind: string) => {
    const address = `@portpicker-bench-${process.pid}-${++addresses}`;
    const logFile = join(tmp, `${address.slice(1)}.log`);
    const command = SERVE[kind](address, spec);
    const { pid, stop, exited } = background(command, logFile);
    const log = () => lastLines(fs.readFileSync(logFile, "utf8"), 3);
    try {
      const deadline = performance.now() + 30_000;
      while (!/Serving on/.test(log())) {
        const late = performance.now() > deadline && "timed out";
        const why = exited() ? "exited" : late;
        if (why) throw new Error(`${why} before serving: ${log()}`);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      await body({ pid, address, log, name: kind + cell });
    } finally {
      await stop();
    }
  };
}

/** The load client, compiled from load.c: see there for its arguments. */
const load = (s: Server, args: number[]) =>
  runJson<Record<string, number>>([LOAD, s.address, ...args.map(String)]);

/**
 * Hands out `count` ports (all of a pool) to live processes, at 16 clients;
 * returns the rate. A few may be in use by something else on the machine:
 * noted.
 */
async function fill(s: Server, [a, b = a]: number[], share: number, n: number) {
  const r = await load(s, [a, b, share, n, 16]);
  const [missing, replies] = [n - r.ok, `${r.empty} empty replies`];
  const lost = `${s.name}: ${missing} of the pool's ${n} ports not handed out`;
  if (r.ok < n * 0.98) {
    throw new Error(`${lost} (${replies}, ${r.errors} errors); ${s.log()}`);
  }
  if (missing > 0) note(`${lost} (in use by something else?).`);
  return r.rps;
}

/**
 * The timed run, for `owner` at `clients` clients, after WARM_UP requests for
 * pid 1, which every server refuses: the rate and latencies from the client,
 * and the server's CPU time per request from /proc (the server's own cost,
 * whatever the client's).
 */
async function measure(s: Server, owner: number, clients: number) {
  const key = `server/${s.name}`;
  const n = report.timedRequests(pool);
  await load(s, [1, 1, 100, WARM_UP, clients]);
  const ticks = cpuTicks(s.pid);
  const r = await load(s, [owner, owner, 100, n, clients]);
  r.cpu = (cpuTicks(s.pid) - ticks) / results.clockTicks * 1e6 / n; // µs
  if (r.ok === 0) throw new Error(`no port in ${n} requests; ${s.log()}`);
  const lost = `${n - r.ok} of ${n} timed requests got no port`;
  if (r.ok < n) note(`${s.name}: ${lost} (${r.errors} errors).`);
  for (const x of ["rps", "p50", "p99", "cpu"]) add(`${key}/${x}`, r[x]);
}

const BENCHES: Record<Section, () => Promise<void>> = {
  /** 1. Picking without a server. */
  async pick() {
    const commands: Record<string, string[]> = {
      deno: sh(`${DENO_PICK} ${picks}`),
      "deno-stable": sh(`${DENO_STABLE_PICK} ${picks}`),
      bun: sh(`bun bench/pick.ts ${picks}`),
      node: sh(`node bench/pick.ts ${picks}`),
      // `env -u`: the user's lock directory, as with no set-up at all.
      "deno-claims": [
        "env",
        "-u",
        "PORTPICKER_LOCK_DIR",
        ...sh(`deno run -A --unstable-net --no-config bench/pick.ts ${picks}`),
      ],
      "bun-claims": [
        "env",
        "-u",
        "PORTPICKER_LOCK_DIR",
        ...sh(`bun bench/pick.ts ${picks}`),
      ],
      "node-claims": [
        "env",
        "-u",
        "PORTPICKER_LOCK_DIR",
        ...sh(`node bench/pick.ts ${picks}`),
      ],
      python: [...PYTHON, "pick", String(picks)],
      getport: sh(`node bench/pick.ts getport ${picks}`),
    };
    await repeat("picking", reps, Object.keys(PICKERS), async (p) => {
      const r = await runJson<Record<string, number>>(commands[p]);
      add(`pick/${p}`, r.rate);
      if (r.checkRate !== undefined) add(`check/${p}`, r.checkRate);
    });
  },

  /** 2. Exhaustion: one run each. */
  async exhaust() {
    const { exhaustion } = results;
    await attempt("exhaustion, ours", async () => {
      exhaustion.ours = await runJson(sh(`${DENO_PICK} exhaust ${exhaustCap}`));
    });
    const python = [...PYTHON, "exhaust", String(exhaustCap)];
    await attempt("exhaustion, Python", async () => {
      exhaustion.python = await runJson(python);
    });
  },

  /**
   * 3. The port server. Each cell: live processes A and B fill a fresh
   * server's pool, A taking the held share, interleaved; B dies, so that its
   * ports are reclaimable and A's are not; then the timed requests, for C.
   * Then the runtime's own sockets (trivial.ts), timed alike, with no pool.
   */
  async server() {
    const spec = await freePool("server", pool, 5000);
    if (spec === undefined) return;
    const [a, c] = [sleeper(), sleeper()];
    const trivial = Object.keys(RUNTIMES).map((r) => `${r}-trivial`);
    for (let rep = 1; rep <= reps; rep++) {
      for (const o of report.OCCUPANCIES) {
        for (const n of report.CONCURRENCIES) {
          const cell = served(spec, `/${o}/${n}`, async (s) => {
            const b = sleeper();
            await fill(s, [a.pid, b.pid], o, pool);
            await b.stop();
            await measure(s, c.pid, n);
          });
          const what = `server, run ${rep}, ${o} % held, ${n} clients`;
          await repeat(what, 1, SERVERS, cell);
        }
      }
      for (const n of report.CONCURRENCIES) {
        const limit = served("", `/0/${n}`, (s) => measure(s, c.pid, n));
        const what = `own sockets, run ${rep}, ${n} clients`;
        await repeat(what, 1, trivial, limit);
      }
    }
    await Promise.all([a.stop(), c.stop()]);
  },

  /** 4. Start-up of a command that prints one port. */
  async startup() {
    const binary = join(tmp, "portpicker");
    await attempt("start-up, bun build --compile", async () => {
      const flags = "--compile --minify --bytecode --format=esm cli.ts";
      const r = await run(sh(`bun build ${flags} --outfile ${binary}`));
      if (r.code !== 0) throw new Error(lastLines(r.stderr + r.stdout));
    });
    const startup = async (s: string) => {
      // Each row's name is its command in backquotes, but the binary's.
      const command = s === "binary" ? [binary] : sh(STARTUPS[s].slice(1, -1));
      // Python's cwd must not shadow its portpicker module.
      const cwd = s === "python" ? tmp : ROOT;
      const r = await run([...command, String(process.pid)], 60_000, cwd);
      if (r.code === 0 && /^\d+\n$/.test(r.stdout)) return r.wallMs;
      const why = `exit ${r.code}, printed ${JSON.stringify(r.stdout)}`;
      throw new Error(`${why}: ${lastLines(r.stderr)}`);
    };
    // Left out when the build failed. One untimed run each: caches (Deno's
    // transpiled modules, the page cache) are warm for all of them alike.
    const built = fs.existsSync(binary);
    const kinds = Object.keys(STARTUPS).filter((s) => built || s !== "binary");
    await repeat("start-up, warm-up", 1, kinds, startup);
    await repeat("start-up", startupReps, kinds, async (s) => {
      add(`startup/${s}`, await startup(s));
    });
  },

  /** 5. Memory: peak RSS once serving, and with the pool handed out. */
  async memory() {
    const spec = await freePool("memory", memoryPool, 1024);
    if (spec === undefined) return;
    const owner = sleeper();
    const memory = served(spec, "", async (s) => {
      add(`memory/${s.name}/start`, peakRssKiB(s.pid));
      if (s.name.endsWith("-empty")) return;
      const rps = await fill(s, [owner.pid], 100, memoryPool);
      add(`memory/${s.name}/full`, peakRssKiB(s.pid));
      add(`memory/${s.name}/rps`, rps);
    });
    await repeat("memory", reps, Object.keys(MEMORY), memory);
    await owner.stop();
  },
};

// ---------------------------------------------------------------------------

/** A command's first line of output, or "unknown". */
async function firstLine(command: string): Promise<string> {
  const r = await run(sh(command), 30_000);
  const line = r.code === 0 && (r.stdout || r.stderr).trim().split("\n")[0];
  return line || "unknown";
}

async function machine(): Promise<Results["machine"]> {
  results.clockTicks = Number(await firstLine("getconf CLK_TCK")) || 100;
  const cpuinfo = fs.readFileSync("/proc/cpuinfo", "utf8");
  const getPort = join(ROOT, "node_modules/get-port/package.json");
  const git = await run(sh("git status --porcelain"));
  const dirty = git.stdout.trim() ? " with uncommitted changes" : "";
  const portpicker = await firstLine("dpkg-query -W python3-portpicker");
  const versions = {
    Deno: (await firstLine("deno --version")).replace(/^deno (\S+).*/, "$1"),
    Bun: await firstLine("bun --version"),
    Node: (await firstLine("node --version")).replace(/^v/, ""),
    Python: (await firstLine("python3 --version")).replace(/^Python /, ""),
    "python3-portpicker": portpicker.replace(/^.*\t/, ""),
    "get-port": JSON.parse(fs.readFileSync(getPort, "utf8")).version,
    gcc: await firstLine("gcc -dumpfullversion"),
  };
  return {
    cores: String(Number(await firstLine("nproc")) || os.cpus().length),
    cpu: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1].trim() ?? "unknown CPU",
    date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    commit: await firstLine("git rev-parse --short HEAD") + dirty,
    versions: Object.entries(versions).map((e) => e.join(" ")).join(", "),
  };
}

async function main(): Promise<number> {
  const began = performance.now();
  const loadavg = () => os.loadavg().map((v) => v.toFixed(2)).join(" ");
  results.load.push(loadavg());
  results.machine = await machine();
  // The load client, compiled here: it must outpace every server it drives.
  const gcc = await run(sh(`gcc -O2 -Wall -pthread -o ${LOAD} bench/load.c`));
  const only = values.only?.split(",");
  const unknown = only?.filter((s) => !report.SECTIONS.includes(s as Section));
  if (unknown?.length) throw new Error(`--only: no section ${unknown}`);
  for (const section of report.SECTIONS) {
    if (only && !only.includes(section)) continue;
    log(`section ${section}`);
    if (gcc.code === 0 || section !== "server" && section !== "memory") {
      await BENCHES[section]();
    } else results.errors.push(`${section}: gcc: ${lastLines(gcc.stderr)}`);
  }
  results.load.push(loadavg());
  results.wallSeconds = (performance.now() - began) / 1000;
  const out = resolve(values.out);
  const [md, svg] = ["results.md", "chart.svg"].map((f) => join(out, f));
  fs.mkdirSync(out, { recursive: true });
  fs.writeFileSync(md, report.renderMarkdown(results));
  const { cores, date } = results.machine;
  const day = `${cores} cores, ${date.slice(0, 10)}`;
  fs.writeFileSync(svg, renderChart(report.headlines(results).bars, day));
  // As `deno fmt` writes them: the committed results pass `deno fmt --check`.
  const fmt = await run(sh(`deno fmt ${md} ${svg}`));
  if (fmt.code !== 0) log(`deno fmt failed: ${lastLines(fmt.stderr)}`);
  process.stdout.write(fs.readFileSync(md, "utf8"));
  log(`wrote ${md} and chart.svg in ${results.wallSeconds.toFixed(0)} s`);
  return results.errors.length === 0 ? 0 : 1;
}

/** Kills every child still running and removes the temporary folder. */
function cleanUp(): void {
  for (const child of live) child.kill("SIGKILL");
  fs.rmSync(tmp, { recursive: true, force: true });
}
// Interrupted: no server or sleeper may outlive the bench.
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => (cleanUp(), process.exit(130)));
}
const status = await main().catch((error) => {
  log(`error: ${error?.stack ?? error}`);
  return 2;
});
cleanUp();
process.exit(status);
