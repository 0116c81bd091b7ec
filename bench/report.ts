/**
 * The bench's report: one run's samples as the markdown tables, the targets
 * and the chart's bars. Every figure is the median of the
 * repetitions that succeeded.
 */

import type { Bar } from "./chart.ts";

export type Section = "pick" | "exhaust" | "server" | "startup" | "memory";
/** The markdown headers, one per section (the smoke test looks for them). */
export const HEADERS: Record<Section, string> = {
  pick: "## 1. Picking without a server",
  exhaust: "## 2. Exhaustion",
  server: "## 3. Port server",
  startup: "## 4. Start-up",
  memory: "## 5. Memory",
};
export const SECTIONS = Object.keys(HEADERS) as Section[];
export const TARGETS_HEADER = "## Targets";
export const OCCUPANCIES = [0, 50, 90];
export const CONCURRENCIES = [1, 16];
/** Ours runs on these two, and so does bench/trivial.ts. */
export const RUNTIMES = { deno: "Deno", bun: "Bun" };
type Runtime = keyof typeof RUNTIMES;
const runtimes = Object.entries(RUNTIMES) as [Runtime, string][];
/** Each section's kinds of process, in the report's order, with their names. */
export const PICKERS = {
  deno: "ours, `pickUnusedPort` on Deno with `--unstable-net`",
  "deno-stable": "ours, `pickUnusedPort` on Deno without `--unstable-net`",
  bun: "ours, `pickUnusedPort` on Bun",
  node: "ours, `pickUnusedPort` on Node",
  "deno-claims":
    "ours on Deno (`-A`), claiming each port in the user's lock directory",
  "bun-claims": "ours on Bun, claiming each port in the user's lock directory",
  "node-claims":
    "ours on Node, claiming each port in the user's lock directory",
  python: "Python `portpicker.pick_unused_port`",
  getport: "`get-port` on Node",
};
export const MEMORY: Record<string, string> = {
  deno: "ours on Deno",
  "deno-trivial": "Deno's own sockets (`bench/trivial.ts`)",
  "deno-empty": "empty Deno (an idle script)",
  bun: "ours on Bun",
  "bun-trivial": "Bun's own sockets (`bench/trivial.ts`)",
  "bun-empty": "empty Bun (an idle script)",
  python: "Python `portserver`",
};
/** Section 3's servers, named as in MEMORY. */
export const SERVERS = ["deno", "bun", "python"];
/** Each one the command it names, but the binary, which the bench builds. */
export const STARTUPS: Record<string, string> = {
  deno: "`deno run -A cli.ts`",
  bun: "`bun cli.ts`",
  node: "`node cli.ts`",
  binary: "compiled binary (`bun build --compile --minify --bytecode`)",
  python: "`python3 -m portpicker`",
};
/** The server's peak RSS with its pool handed out may be this much, in MiB. */
export const RSS_LIMIT_MIB = { deno: 56.5, bun: 58.4 };
/** The targets: each one's goal (a ratio, ours the better above 1×), and what it means. */
const GOAL = { pick: 1, python: 3, own: 0.8, rss: 1 };
type Target = keyof typeof GOAL;
const TARGETS: Record<Target, string> = {
  pick:
    "Picking, no server, at least 1.0× Python's rate on Deno (with `--unstable-net`) and on Bun",
  python:
    "Server, 16 clients, at least 3× Python's requests per second on Deno and on Bun, at 0 %, 50 % and 90 % held",
  own:
    "Server, 16 clients: its rate at 90 % held at least 0.8× its rate at 0 %",
  rss:
    `Server's peak RSS with its pool handed out (§5) at most ${RSS_LIMIT_MIB.deno} MiB on Deno, ${RSS_LIMIT_MIB.bun} MiB on Bun (that limit ÷ ours ≥ 1)`,
};

/**
 * The timed requests of every cell of section 3: the ports B leaves
 * reclaimable at 90 % held. Every cell times the same number, as a short run
 * weighs its ramp-up and tail more than a long one.
 */
export const timedRequests = (pool: number) => Math.floor(pool / 10);

type Exhaustion = { distinct: number; exhausted: boolean; seconds: number };

/** A run's results, empty: run.ts fills them in, and the report renders them. */
export function emptyResults(sizes: Record<string, number>, command: string) {
  return {
    /** The sizes of the run (`reps`, `picks`...): see run.ts. */
    sizes,
    command,
    /** Samples by key (`pick/deno`, `server/bun/50/16/rps`...), one a run. */
    samples: new Map<string, number[]>(),
    exhaustion: {} as Partial<Record<"ours" | "python", Exhaustion>>,
    /** The servers' pools (`--pool`) in sections 3 and 5. */
    pools: {} as Partial<Record<"server" | "memory", string>>,
    /** The facts of the report's header. */
    machine: { cores: "", cpu: "", date: "", commit: "", versions: "" },
    /** The load average before and after; /proc's clock ticks per second. */
    load: [] as string[],
    clockTicks: 100,
    /** Failures: each one leaves a figure missing or short of repetitions. */
    errors: [] as string[],
    /** Anything odd that did not stop a figure, with how often it was seen. */
    notes: new Map<string, number>(),
    wallSeconds: 0,
  };
}
export type Results = ReturnType<typeof emptyResults>;

const NONE = "—";
const ratio = (a?: number, b?: number) =>
  a === undefined || b === undefined || b === 0 ? undefined : a / b;
const times = (v?: number) =>
  v === undefined || isNaN(v) ? NONE : `${v.toFixed(2)}×`;
const fixed = (v: number | undefined, digits: number) =>
  v === undefined || isNaN(v) ? NONE : v.toFixed(digits);
const thousands = (v?: number) =>
  v === undefined ? NONE : Math.round(v).toLocaleString("en-US");
const mib = (kib?: number) => fixed(kib === undefined ? kib : kib / 1024, 1);

/** A markdown table: text in the first column, numbers in the others. */
function table(header: string, rows: string[][]): string {
  const rule = header.split(" | ").map((_, i) => i ? "--:" : "---");
  const lines = [rule, ...rows].map((row) => `| ${row.join(" | ")} |`);
  return [`| ${header} |`, ...lines].join("\n");
}

/** The run's medians by key, and the ratios that the report shows. */
function figures({ samples, sizes }: Results) {
  const get = (key: string) => {
    const v = [...samples.get(key) ?? []].sort((a, b) => a - b);
    const m = Math.floor(v.length / 2);
    if (v.length > 0) return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
  };
  /** A server's median in a cell: its rate, or `what` (p50, p99, cpu). */
  const rps = (s: string, o: number, c = 16, what = "rps") =>
    get(`server/${s}/${o}/${c}/${what}`);
  const full = (m: string) => get(`memory/${m}/full`);
  return {
    get,
    rps,
    full,
    /** A row's name, with " (n of R runs)" when some repetitions failed. */
    name: (name: string, key: string, of = sizes.reps) => {
      const n = samples.get(key)?.length ?? 0;
      return n === of ? name : `${name} (${n} of ${of} runs)`;
    },
    pick: (p: string) => ratio(get(`pick/${p}`), get("pick/python")),
    python: (s: string, o: number) => ratio(rps(s, o), rps("python", o)),
    own: (s: string, c: number) => ratio(rps(s, 90, c), rps(s, 0, c)),
    /** Ours ÷ the runtime's own sockets, at as many clients. */
    limit: (r: string, o: number, c = 16) =>
      ratio(rps(r, o, c), rps(`${r}-trivial`, 0, c)),
    startup: (s: string) => ratio(get("startup/python"), get(`startup/${s}`)),
    /** The RSS limit ÷ ours on runtime `r`, the pool handed out. */
    rss: (r: Runtime) => ratio(RSS_LIMIT_MIB[r] * 1024, full(r)),
  };
}
type Figures = ReturnType<typeof figures>;

/**
 * The headline ratios, each turned so that above 1× means ours is better: the
 * chart's bars, and the targets, each one met when every one of its parts is
 * at least its goal.
 */
export function headlines(results: Results) {
  const f = figures(results);
  const bars: Bar[] = [];
  const parts = new Map<Target, [string, number?][]>();
  /** A bar; with a target, its part named `part`. */
  const add = (label: string, value?: number, target?: Target, part = "") => {
    bars.push({ label, value, target: target && GOAL[target] });
    if (target) parts.set(target, [...parts.get(target) ?? [], [part, value]]);
  };
  add(
    "Picking: Deno with --unstable-net ÷ Python",
    f.pick("deno"),
    "pick",
    "Deno",
  );
  add("Picking rate: Bun ÷ Python", f.pick("bun"), "pick", "Bun");
  add("Picking rate: Node ÷ Python", f.pick("node"));
  add("Picking: Deno without --unstable-net ÷ Python", f.pick("deno-stable"));
  const { ours, python } = results.exhaustion;
  // A capped run (--tiny) says nothing about the ratio.
  if (ours?.exhausted && python?.exhausted) {
    add("Ports before failure: ours ÷ Python", ours.distinct / python.distinct);
  }
  for (const o of OCCUPANCIES) {
    for (const [r, name] of runtimes) {
      const [label, part] = [`${o} % held: ${name} ÷ Python`, `${name} ${o} %`];
      add(`Server, 16 clients, ${label}`, f.python(r, o), "python", part);
      add(`Same, ${name} ÷ its own sockets`, f.limit(r, o));
    }
  }
  for (const [r, name] of runtimes) {
    const label = `Server, 16 clients, ${name}: own 90 % ÷ 0 % held`;
    add(label, f.own(r, 16), "own", name);
  }
  for (const [s, name] of [...runtimes, ["node", "Node"]]) {
    add(`Start-up: Python ÷ ${name}`, f.startup(s));
  }
  add("Start-up: Python ÷ compiled binary", f.startup("binary"));
  for (const [r, name] of runtimes) {
    const python = ratio(f.full("python"), f.full(r));
    add(`Peak RSS, pool handed out: Python ÷ ${name}`, python);
    const limit = `Same, ${RSS_LIMIT_MIB[r]} MiB ÷ ${name}`;
    add(limit, f.rss(r), "rss", `${name} (${mib(f.full(r))} MiB)`);
  }
  const targets = [...parts].map(([target, values]) => {
    const measured = values.map(([name, v]) => `${name} ${times(v)}`);
    const verdict = values.some(([, v]) => v === undefined || isNaN(v))
      ? "NOT MEASURED"
      : values.every(([, v]) => v! >= GOAL[target])
      ? "MET"
      : "NOT MET";
    return `- **${verdict}**: ${TARGETS[target]}: ${measured.join(", ")}.`;
  });
  return { bars, targets };
}

/** Each section's paragraphs and tables. */
const TEXT: Record<Section, (results: Results, f: Figures) => string[]> = {
  pick({ sizes: { picks: n } }, f) {
    const rows = Object.entries(PICKERS).map(([p, name]) => {
      const [rate, checks] = [f.get(`pick/${p}`), f.get(`check/${p}`)];
      const ours = (v?: number) => /python|getport/.test(p) ? NONE : times(v);
      const getport = ratio(rate, f.get("pick/getport"));
      const ceiling = ours(ratio(checks, f.get("pick/python")));
      const cells = [thousands(rate), ours(f.pick(p)), ours(getport)];
      return [f.name(name, `pick/${p}`), ...cells, thousands(checks), ceiling];
    });
    const head =
      "picker | ports/s | ours ÷ Python | ours ÷ get-port | checks/s | checks ÷ Python's ports/s";
    return [
      `Ports per second, no port server: ${n} picks in one process after 20 warm-up picks, the process timing itself (start-up excluded). Ratios: ours ÷ theirs, above 1 means ours picks faster. Every check binds through the runtime's own sockets: on Deno, what a JSR user gets with \`deno test --allow-net\` (here \`deno run --allow-net --no-config\`), with \`--unstable-net\` (on the command line or in their \`deno.json\`) \`Deno.listen\` and \`Deno.listenDatagram\`, without it \`Deno.listen\` and \`node:dgram\`; on Bun, \`Bun.listen\` and \`Bun.udpSocket\`; on Node, \`node:net\` and \`node:dgram\`.`,
      `Checks per second: the same process then checks one free port ${n} times (\`isPortFree\`, Python's \`is_port_free\`). Every pick needs at least one check, since a port is free only when it binds on both TCP and UDP, so a runtime's check rate is the most its picker could reach; the last column is that ceiling ÷ Python's picking rate. Ours binds once a protocol where the host is dual-stack, Python once a protocol and family.`,
      `The rows above run with \`PORTPICKER_LOCK_DIR=\` (no claims), as Python makes none. The "claiming" rows show what uniqueness across processes costs: with no lock directory set, each port is claimed with a file in the user's own directory (here \`portpicker-<uid>\` in the temporary directory: \`$XDG_RUNTIME_DIR\` is unset), and the claims are removed at exit.`,
      table(head, rows),
    ];
  },
  exhaust({ exhaustion: { ours, python }, sizes: { exhaustCap: cap } }) {
    const row = (name: string, e?: Exhaustion) => {
      const distinct = `${e?.exhausted ? "" : "≥"}${thousands(e?.distinct)}`;
      return [name, e ? distinct : NONE, fixed(e?.seconds, 1)];
    };
    const both = ours?.exhausted && python?.exhausted;
    const ratio = times(both ? ours.distinct / python.distinct : undefined);
    const capped = !cap
      ? ""
      : ` Stopped after ${cap} ports (--tiny): "≥" means it had not failed yet.`;
    return [
      `Distinct ports one process gets from the picker, no port server, before it throws \`NoFreePortFoundError\`; one run each.${capped}`,
      table("picker | distinct ports | seconds", [
        row(PICKERS.deno, ours),
        row(PICKERS.python, python),
        ["ours ÷ Python", ratio, NONE],
      ]),
    ];
  },
  server({ sizes, pools, clockTicks }, f) {
    const pool = thousands(sizes.pool);
    const timed = thousands(timedRequests(sizes.pool));
    const [ranges, tick] = [poolText(pools.server), 1000 / clockTicks];
    const cells = OCCUPANCIES.flatMap((o) => CONCURRENCIES.map((c) => [o, c]));
    /** A row per cell, whose figures `at` gives (as `f.rps` for the cell). */
    type At = (s: string, what?: string) => number | undefined;
    const rows = (
      cell: (at: At, key: string, o: number, c: number) => string[],
    ) =>
      cells.map(([o, c]) => {
        const at: At = (s, what) => f.rps(s, o, c, what);
        return [`${o} %`, String(c), ...cell(at, `${o}/${c}/rps`, o, c)];
      });
    const head = "held | clients | ours, Deno | ours, Bun | Python";
    const ratios = [
      ...runtimes.map(([, name]) => `${name} ÷ Python`),
      ...runtimes.map(([, name]) => `${name} ÷ own sockets`),
    ].join(" | ");
    const rps = rows((at, key, o, c) => [
      ...SERVERS.map((s) => f.name(thousands(at(s)), `server/${s}/${key}`)),
      ...runtimes.map(([r]) => times(ratio(at(r), at("python")))),
      ...runtimes.map(([r]) => times(f.limit(r, o, c))),
    ]);
    const limits = runtimes.map(([r, name]) => {
      const key = (c: number) => `server/${r}-trivial/0/${c}`;
      const [rps, cpu] = [f.get(`${key(16)}/rps`), f.get(`${key(16)}/cpu`)];
      const steady = ratio(
        f.get(`memory/${r}/rps`),
        f.get(`memory/${r}-trivial/rps`),
      );
      return [
        f.name(name, `${key(16)}/rps`),
        thousands(f.get(`${key(1)}/rps`)),
        thousands(rps),
        fixed((rps ?? NaN) * (cpu ?? NaN) / 1e4, 0),
        times(steady),
      ];
    });
    const steadyHead = `ours ÷ own sockets, ${
      thousands(sizes.memoryPool)
    } requests (§5)`;
    const limit =
      `runtime | own sockets, requests/s, 1 client | 16 clients | its CPU at 16 clients, % | ${steadyHead}`;
    const ms = (at: At, s: string) =>
      ["p50", "p99"].map((p) => fixed(at(s, p), 2)).join(" / ");
    const latency = rows((at) => SERVERS.map((s) => ms(at, s)));
    const costs = rows((at) => [
      ...SERVERS.map((s) => fixed(at(s, "cpu"), 0)),
      ...runtimes.map(([r]) => times(ratio(at("python", "cpu"), at(r, "cpu")))),
    ]);
    const own = SERVERS
      .map((s) => [MEMORY[s], times(f.own(s, 1)), times(f.own(s, 16))]);
    return [
      `Each cell: a fresh server with a pool of ${pool} ports (${ranges}); two live processes A and B fill the whole pool, A taking the held share, interleaved with B's ports through the rotation (request i goes to A when i mod 10 < held ÷ 10); B is killed, so its ports are reclaimable while A's are not; then the load client asks for ${timed} ports (B's share at 90 % held, the same in every cell) for a third live process at 1 or 16 concurrent clients, after 100 untimed requests for pid 1, which every server refuses without touching its pool. The load client, the same for every server, is \`bench/load.c\`, compiled with gcc when the bench starts: one thread a client, one connection a request (the pid and a newline, then the reply read to its end). Ours runs as \`deno run -A --unstable-net cli.ts serve\` (Deno 2.9 reads \`/proc\` only with \`-A\`) and \`bun cli.ts serve\`.`,
      "The runtime's own sockets: `bench/trivial.ts`, the least any correct port server on that runtime can do, fresh in each run and timed as the cells above with no pool. For each request it reads a line, binds one TCP and one UDP socket on the wildcard address and closes them at once, and replies `15000\\n`, through the runtime's native API only (`Deno.listen` and `Deno.listenDatagram` with `--unstable-net`, `Bun.listen` and `Bun.udpSocket`), on the same kind of socket (an abstract Unix socket). Ours ÷ own sockets: 1 would mean that our server costs nothing over one check of a port.",
      `Requests per second (ours ÷ theirs: above 1 means ours serves faster):`,
      table(`${head} | ${ratios}`, rps),
      `The own sockets' rates, and their CPU time over the requests at 16 clients ÷ the wall time (100 %: one core busy), which shows whether the server, not the load client, set the pace. A run of ${timed} requests weighs its ramp-up and tail: the last column compares the rates of section 5, ${
        thousands(sizes.memoryPool)
      } requests at 16 clients each (ours handing out its whole pool to one live process).`,
      table(limit, limits),
      "Latency, p50 / p99, in milliseconds:",
      table(head, latency),
      `The server's CPU time (user and system, from /proc) per request, in µs: the server's own cost, whatever the load client's. Python ÷ ours: above 1 means ours costs less. (/proc counts in clock ticks of ${tick} ms: a few ticks per run make a rough figure.)`,
      table(`${head} | Python ÷ Deno | Python ÷ Bun`, costs),
      "Each server's rate at 90 % held ÷ its own rate at 0 % (1 means the held ports cost nothing):",
      table("server | 1 client | 16 clients", own),
    ];
  },
  startup({ sizes: { startupReps: reps } }, f) {
    const rows = Object.entries(STARTUPS).map(([s, name]) => [
      f.name(name, `startup/${s}`, reps),
      fixed(f.get(`startup/${s}`), 1),
      s === "python" ? NONE : times(f.startup(s)),
    ]);
    return [
      `Wall time from spawn to exit of a command that prints one port, no port server, median of ${reps} runs after one untimed run. Python ÷ ours: above 1 means ours starts faster.`,
      table("command | ms | Python ÷ ours", rows),
    ];
  },
  memory({ sizes, pools }, f) {
    const [n, ranges] = [thousands(sizes.memoryPool), poolText(pools.memory)];
    const rows = Object.entries(MEMORY).map(([m, name]) => {
      const [start, full] = [f.get(`memory/${m}/start`), f.full(m)];
      const empty = f.get(`memory/${m.replace(/-.*/, "")}-empty/start`) ?? NaN;
      const python = m in RUNTIMES ? ratio(full, f.full("python")) : undefined;
      const over = m === "python" ? NONE : mib((full ?? NaN) - empty);
      const name_ = f.name(name, `memory/${m}/start`);
      const rps = /empty/.test(m) ? NONE : thousands(f.get(`memory/${m}/rps`));
      return [name_, mib(start), mib(full), over, times(python), rps];
    });
    const head =
      "process | after start, MiB | pool handed out, MiB | over the empty runtime, MiB | ours ÷ Python | requests/s handing out";
    return [
      `Peak resident set size (VmHWM) of each server with a pool of ${n} ports (${ranges}): once it serves, and after it has handed out every port of the pool to a live process (${n} replies, for the runtime's own sockets); and the runtime's empty baseline: the same runtime, with the same flags, running a script that only prints a line and waits. Over the empty runtime: the peak RSS with the pool handed out − the empty runtime's. Ours ÷ Python: below 1 means ours uses less memory. Requests/s handing out: the rate of those ${n} replies at 16 clients.`,
      table(head, rows),
    ];
  },
};

/** A pool for the report: its ranges, unless there are too many to read. */
function poolText(spec = ""): string {
  const ranges = spec.split(",");
  const [first, last] = [ranges[0].split("-")[0], ranges.at(-1)!.split("-")[1]];
  if (ranges.length <= 3) return spec ? `\`${spec}\`` : "none";
  return `${ranges.length} ranges from ${first} to ${last}`;
}

/** The whole report, as markdown. */
export function renderMarkdown(results: Results): string {
  const { machine: m, load: [before, after], sizes: { reps } } = results;
  const [seconds, s] = [results.wallSeconds.toFixed(0), reps === 1 ? "" : "s"];
  const f = figures(results);
  const code = (text: string) =>
    "`" + text.replace(/\s+/g, " ").replaceAll("`", "'").trim() + "`";
  const times = (n: number) => n > 1 ? ` (in ${n} runs)` : "";
  const notes = [
    ...results.errors.map((e) => `- Failed: ${code(e)}`),
    ...[...results.notes].map(([text, n]) => `- ${text}${times(n)}`),
  ];
  return [
    "# Benchmark",
    `Run on ${m.date} with \`${results.command}\`, in ${seconds} s. Machine: **${m.cores} cores** (\`nproc\`), ${m.cpu}; load average ${before} before, ${after} after. Commit ${m.commit}.`,
    `Versions: ${m.versions}.`,
    `Every figure is the median of ${reps} repetition${s}, each in a fresh process, unless a section says otherwise.`,
    ...SECTIONS.flatMap((x) => [HEADERS[x], ...TEXT[x](results, f)]),
    TARGETS_HEADER,
    `The floors this bench must show, on this machine's ${m.cores} cores, each one met when every one of its parts is:`,
    headlines(results).targets.join("\n"),
    ...notes.length ? ["## Notes", notes.join("\n")] : [],
  ].join("\n\n") + "\n";
}
