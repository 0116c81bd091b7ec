/**
 * Turns the bench's samples into the markdown report, the targets and the
 * chart's bars. Every figure is the median of the repetitions that succeeded.
 */

import type { Bar } from "./chart.ts";

/** The sections of the bench, in the report's order. */
export const SECTIONS = [
  "pick",
  "exhaust",
  "server",
  "startup",
  "memory",
] as const;
export type Section = typeof SECTIONS[number];

/** The markdown headers, one per section (the smoke test looks for them). */
export const HEADERS: Record<Section, string> = {
  pick: "## 1. Picking without a server",
  exhaust: "## 2. Exhaustion",
  server: "## 3. Port server",
  startup: "## 4. Start-up",
  memory: "## 5. Memory",
};
export const TARGETS_HEADER = "## Targets";

/** The sizes of one run. */
export interface Sizes {
  /** Repetitions of every figure, each in a fresh process. */
  reps: number;
  /** Ports picked per process in section 1. */
  picks: number;
  /** Section 2 stops after this many ports (0: at the failure). */
  exhaustCap: number;
  /** Ports in the server's pool in section 3. */
  pool: number;
  /** Repetitions of each start-up. */
  startupReps: number;
  /** Ports in the server's pool in section 5. */
  memoryPool: number;
}

export const OCCUPANCIES = [0, 50, 90] as const;

/**
 * The timed requests of every cell of section 3: the ports B leaves
 * reclaimable at the highest occupancy. Every cell times the same number, as
 * a short run weighs its ramp-up and tail more than a long one.
 */
export function measuredRequests(pool: number): number {
  return Math.floor(pool * (100 - Math.max(...OCCUPANCIES)) / 100);
}
export const CONCURRENCIES = [1, 16] as const;

/** The pickers of section 1, the servers of sections 3 and 5. */
export const PICKERS = ["deno", "bun", "node", "python", "getport"] as const;
export type Picker = typeof PICKERS[number];
export const SERVERS = ["deno", "bun", "python"] as const;
export type ServerKind = typeof SERVERS[number];
export const STARTUPS = ["deno", "bun", "node", "binary", "python"] as const;
export type Startup = typeof STARTUPS[number];

/** One process's result in section 2. */
export interface Exhaustion {
  distinct: number;
  exhausted: boolean;
  seconds: number;
}

/** Where the bench ran. */
export interface Machine {
  cores: number;
  /** Clock ticks per second of /proc's CPU times. */
  clockTicks: number;
  cpu: string;
  date: string;
  commit: string;
  /** Runtime and peer versions, by name. */
  versions: [string, string][];
  loadBefore: number[];
  loadAfter: number[];
}

/** Everything measured in one run. */
export interface Results {
  sizes: Sizes;
  sections: readonly Section[];
  machine: Machine;
  /** Samples by key, one per successful repetition. */
  samples: Map<string, number[]>;
  exhaustion: Partial<Record<"ours" | "python", Exhaustion>>;
  /** The servers' pools (`--pool`) in sections 3 and 5. */
  pools: Partial<Record<"server" | "memory", string>>;
  /** Failures: each one leaves a figure missing or short of repetitions. */
  errors: string[];
  /** Anything odd that did not stop a figure, with how often it was seen. */
  notes: Map<string, number>;
  wallSeconds: number;
  /** How the run was started, for the report. */
  command: string;
}

export function pickKey(picker: Picker): string {
  return `pick/${picker}`;
}
/** Section 1's free-port checks (`isPortFree`, `is_port_free`) per second. */
export function checkKey(picker: Picker): string {
  return `check/${picker}`;
}
export function serverKey(
  server: ServerKind,
  occupancy: number,
  concurrency: number,
  what: "rps" | "p50" | "p99" | "cpu",
): string {
  return `server/${server}/${occupancy}/${concurrency}/${what}`;
}
export function startupKey(command: Startup): string {
  return `startup/${command}`;
}
export function memoryKey(server: ServerKind, when: "start" | "full"): string {
  return `memory/${server}/${when}`;
}

export function median(values: readonly number[]): number | undefined {
  if (values.length === 0) return undefined;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2
    ? sorted[middle]
    : (sorted[middle - 1] + sorted[middle]) / 2;
}

function ratio(
  a: number | undefined,
  b: number | undefined,
): number | undefined {
  return a === undefined || b === undefined || b === 0 ? undefined : a / b;
}

// ---------------------------------------------------------------------------
// Formatting.

const NONE = "—";

/**
 * Free text (error messages, process output) as a code span, on one line:
 * markdown there is taken literally, and `deno fmt` leaves it as it is.
 */
function code(text: string): string {
  return `\`${text.replace(/\s+/g, " ").replaceAll("`", "'").trim()}\``;
}

/** A pool for the report: its ranges, unless there are too many to read. */
function poolText(spec: string | undefined): string {
  if (spec === undefined) return "none";
  const ranges = spec.split(",");
  if (ranges.length <= 3) return `\`${spec}\``;
  const first = ranges[0].split("-")[0];
  const last = ranges.at(-1)!.split("-")[1];
  return `${ranges.length} ranges from ${first} to ${last}`;
}

function thousands(value: number): string {
  return String(Math.round(value)).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function fixed(value: number | undefined, digits: number): string {
  return value === undefined ? NONE : value.toFixed(digits);
}

function times(value: number | undefined): string {
  return value === undefined ? NONE : `${value.toFixed(2)}×`;
}

/**
 * A markdown table laid out as `deno fmt` lays it out, so that the results
 * file passes `deno fmt --check` as written. Columns after the first are
 * numbers, aligned right.
 */
function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) =>
    Math.max(3, h.length, ...rows.map((r) => r[i].length))
  );
  const line = (cells: string[]) =>
    `| ${
      cells.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))
        .join(" | ")
    } |`;
  const rule = `| ${
    widths.map((w, i) => i === 0 ? "-".repeat(w) : `${"-".repeat(w - 1)}:`)
      .join(" | ")
  } |`;
  return [line(header), rule, ...rows.map(line)].join("\n");
}

// ---------------------------------------------------------------------------
// The report.

const PICKER_NAMES: Record<Picker, string> = {
  deno: "ours, `pickUnusedPort` on Deno",
  bun: "ours, `pickUnusedPort` on Bun",
  node: "ours, `pickUnusedPort` on Node",
  python: "Python `portpicker.pick_unused_port`",
  getport: "`get-port` on Node",
};
const SERVER_NAMES: Record<ServerKind, string> = {
  deno: "ours on Deno",
  bun: "ours on Bun",
  python: "Python `portserver`",
};
const STARTUP_NAMES: Record<Startup, string> = {
  deno: "`deno run -A cli.ts`",
  bun: "`bun cli.ts`",
  node: "`node cli.ts`",
  binary: "compiled binary (`bun build --compile --minify --bytecode`)",
  python: "`python3 -m portpicker`",
};

/** A view of the results with the medians at hand. */
class Figures {
  readonly results: Results;

  constructor(results: Results) {
    this.results = results;
  }

  get(key: string): number | undefined {
    return median(this.results.samples.get(key) ?? []);
  }

  /** "n of R" when some repetitions of a figure failed. */
  count(key: string, of: number): string {
    const n = this.results.samples.get(key)?.length ?? 0;
    return n === of ? "" : ` (${n} of ${of} runs)`;
  }

  has(section: Section): boolean {
    return this.results.sections.includes(section);
  }
}

/** One target and whether it was met. */
export interface Target {
  text: string;
  measured: string;
  met: boolean | undefined;
}

function serverRatio(
  f: Figures,
  server: ServerKind,
  occupancy: number,
  concurrency: number,
): number | undefined {
  return ratio(
    f.get(serverKey(server, occupancy, concurrency, "rps")),
    f.get(serverKey("python", occupancy, concurrency, "rps")),
  );
}

function ownRatio(
  f: Figures,
  server: ServerKind,
  concurrency: number,
): number | undefined {
  return ratio(
    f.get(serverKey(server, 90, concurrency, "rps")),
    f.get(serverKey(server, 0, concurrency, "rps")),
  );
}

/** Met when every figure is at least `goal`; unknown when one is missing. */
function judge(
  text: string,
  parts: [string, number | undefined][],
  goal: number,
): Target {
  const measured = parts.map(([name, v]) => `${name} ${times(v)}`).join(", ");
  const met = parts.some(([, v]) => v === undefined)
    ? undefined
    : parts.every(([, v]) => v! >= goal);
  return { text, measured, met };
}

export function targets(results: Results): Target[] {
  const f = new Figures(results);
  const out: Target[] = [];
  if (f.has("pick")) {
    const python = f.get(pickKey("python"));
    out.push(judge(
      "Picking at least 2× Python's rate on Deno and Bun",
      [
        ["Deno", ratio(f.get(pickKey("deno")), python)],
        ["Bun", ratio(f.get(pickKey("bun")), python)],
      ],
      2,
    ));
  }
  if (f.has("server")) {
    out.push(judge(
      "Server at least 5× Python's requests per second at 16 clients (every occupancy, Deno and Bun)",
      SERVERS.filter((s) => s !== "python").flatMap((s) =>
        OCCUPANCIES.map((o): [string, number | undefined] => [
          `${s === "deno" ? "Deno" : "Bun"} ${o} %`,
          serverRatio(f, s, o, 16),
        ])
      ),
      5,
    ));
    out.push(judge(
      "Our server's rate at 90 % occupancy at least 0.8× its own rate at 0 %",
      SERVERS.filter((s) => s !== "python").flatMap((s) =>
        CONCURRENCIES.map((c): [string, number | undefined] => [
          `${s === "deno" ? "Deno" : "Bun"} ${c} client${c > 1 ? "s" : ""}`,
          ownRatio(f, s, c),
        ])
      ),
      0.8,
    ));
  }
  if (f.has("startup")) {
    const python = f.get(startupKey("python"));
    const binary = f.get(startupKey("binary"));
    const t = judge(
      "Compiled binary's start-up at most half of Python's (Python ÷ binary ≥ 2)",
      [["Python ÷ binary", ratio(python, binary)]],
      2,
    );
    out.push({
      ...t,
      measured: `${t.measured} (binary ${fixed(binary, 1)} ms, Python ${
        fixed(python, 1)
      } ms)`,
    });
  }
  return out;
}

/** The chart's bars: every ratio turned so that above 1× means ours is better. */
export function bars(results: Results): Bar[] {
  const f = new Figures(results);
  const out: Bar[] = [];
  if (f.has("pick")) {
    const python = f.get(pickKey("python"));
    for (
      const [picker, name] of [["deno", "Deno"], ["bun", "Bun"], [
        "node",
        "Node",
      ]] as const
    ) {
      out.push({
        label: `Picking rate: ${name} ÷ Python`,
        value: ratio(f.get(pickKey(picker)), python),
        target: picker === "node" ? undefined : 2,
      });
    }
  }
  if (f.has("exhaust")) {
    const { ours, python } = results.exhaustion;
    // A capped run (--tiny) says nothing about the ratio.
    if (ours?.exhausted && python?.exhausted) {
      out.push({
        label: "Ports before failure: ours ÷ Python",
        value: ratio(ours.distinct, python.distinct),
      });
    }
  }
  if (f.has("server")) {
    for (const occupancy of OCCUPANCIES) {
      for (
        const [server, name] of [["deno", "Deno"], ["bun", "Bun"]] as const
      ) {
        out.push({
          label: `Server, 16 clients, ${occupancy} % held: ${name} ÷ Python`,
          value: serverRatio(f, server, occupancy, 16),
          target: 5,
        });
      }
    }
    for (const [server, name] of [["deno", "Deno"], ["bun", "Bun"]] as const) {
      out.push({
        label: `Server, 16 clients, ${name}: own 90 % ÷ 0 % held`,
        value: ownRatio(f, server, 16),
        target: 0.8,
      });
    }
  }
  if (f.has("startup")) {
    const python = f.get(startupKey("python"));
    for (
      const [command, name] of [
        ["deno", "Deno"],
        ["bun", "Bun"],
        ["node", "Node"],
        ["binary", "compiled binary"],
      ] as const
    ) {
      out.push({
        label: `Start-up: Python ÷ ${name}`,
        value: ratio(python, f.get(startupKey(command))),
        target: command === "binary" ? 2 : undefined,
      });
    }
  }
  if (f.has("memory")) {
    const python = f.get(memoryKey("python", "full"));
    for (const [server, name] of [["deno", "Deno"], ["bun", "Bun"]] as const) {
      out.push({
        label: `Peak RSS, pool handed out: Python ÷ ${name}`,
        value: ratio(python, f.get(memoryKey(server, "full"))),
      });
    }
  }
  return out;
}

function pickSection(f: Figures): string {
  const { reps, picks } = f.results.sizes;
  const python = f.get(pickKey("python"));
  const getport = f.get(pickKey("getport"));
  const rows = PICKERS.map((picker) => {
    const rate = f.get(pickKey(picker));
    const checks = f.get(checkKey(picker));
    const ours = picker === "deno" || picker === "bun" || picker === "node";
    return [
      PICKER_NAMES[picker] + f.count(pickKey(picker), reps),
      rate === undefined ? NONE : thousands(rate),
      ours ? times(ratio(rate, python)) : NONE,
      ours ? times(ratio(rate, getport)) : NONE,
      checks === undefined ? NONE : thousands(checks),
      ours ? times(ratio(checks, python)) : NONE,
    ];
  });
  return [
    HEADERS.pick,
    "",
    `Ports per second, no port server: ${picks} picks in one process after 20 warm-up picks, the process timing itself (start-up excluded). Ratios: ours ÷ theirs, above 1 means ours picks faster.`,
    "",
    `Checks per second: the same process then checks one free port ${picks} times (\`isPortFree\`, Python's \`is_port_free\`). Every pick needs at least one check, since a port is free only when it binds on both TCP and UDP, so a runtime's check rate is the most its picker could reach; the last column is that ceiling ÷ Python's picking rate. Ours binds once a protocol where the host is dual-stack, Python once a protocol and family.`,
    "",
    table([
      "picker",
      "ports/s",
      "ours ÷ Python",
      "ours ÷ get-port",
      "checks/s",
      "checks ÷ Python's ports/s",
    ], rows),
  ].join("\n");
}

function exhaustSection(f: Figures): string {
  const { ours, python } = f.results.exhaustion;
  const cap = f.results.sizes.exhaustCap;
  const shown = (e: Exhaustion | undefined): string =>
    e === undefined
      ? NONE
      : e.exhausted
      ? thousands(e.distinct)
      : `≥${thousands(e.distinct)}`;
  const capped = !ours?.exhausted || !python?.exhausted;
  return [
    HEADERS.exhaust,
    "",
    `Distinct ports one process gets from the picker, no port server, before it throws \`NoFreePortFoundError\`; one run each.${
      cap > 0
        ? ` Stopped after ${cap} ports (--tiny): "≥" means it had not failed yet.`
        : ""
    }`,
    "",
    table(["picker", "distinct ports", "seconds"], [
      [
        "ours, `pickUnusedPort` on Deno",
        shown(ours),
        fixed(ours?.seconds, 1),
      ],
      [
        "Python `portpicker.pick_unused_port`",
        shown(python),
        fixed(python?.seconds, 1),
      ],
      [
        "ours ÷ Python",
        capped ? NONE : times(ratio(ours?.distinct, python?.distinct)),
        NONE,
      ],
    ]),
  ].join("\n");
}

function serverSection(f: Figures): string {
  const { reps, pool } = f.results.sizes;
  const cells = OCCUPANCIES.flatMap((o) =>
    CONCURRENCIES.map((c) => [o, c] as const)
  );
  const rps = table(
    [
      "held",
      "clients",
      "ours, Deno",
      "ours, Bun",
      "Python",
      "Deno ÷ Python",
      "Bun ÷ Python",
    ],
    cells.map(([o, c]) => [
      `${o} %`,
      String(c),
      ...SERVERS.map((s) => {
        const key = serverKey(s, o, c, "rps");
        const value = f.get(key);
        return value === undefined
          ? NONE
          : `${thousands(value)}${f.count(key, reps)}`;
      }),
      times(serverRatio(f, "deno", o, c)),
      times(serverRatio(f, "bun", o, c)),
    ]),
  );
  const latency = table(
    ["held", "clients", "ours, Deno", "ours, Bun", "Python"],
    cells.map(([o, c]) => [
      `${o} %`,
      String(c),
      ...SERVERS.map((s) =>
        `${fixed(f.get(serverKey(s, o, c, "p50")), 2)} / ${
          fixed(f.get(serverKey(s, o, c, "p99")), 2)
        }`
      ),
    ]),
  );
  const cpu = table(
    [
      "held",
      "clients",
      "ours, Deno",
      "ours, Bun",
      "Python",
      "Python ÷ Deno",
      "Python ÷ Bun",
    ],
    cells.map(([o, c]) => {
      const value = (s: ServerKind) => f.get(serverKey(s, o, c, "cpu"));
      return [
        `${o} %`,
        String(c),
        ...SERVERS.map((s) => fixed(value(s), 0)),
        times(ratio(value("python"), value("deno"))),
        times(ratio(value("python"), value("bun"))),
      ];
    }),
  );
  const own = table(
    ["server", "1 client", "16 clients"],
    SERVERS.map((s) => [
      SERVER_NAMES[s],
      times(ownRatio(f, s, 1)),
      times(ownRatio(f, s, 16)),
    ]),
  );
  return [
    HEADERS.server,
    "",
    `Each cell: a fresh server with a pool of ${thousands(pool)} ports (${
      poolText(f.results.pools.server)
    }); two live processes A and B fill the whole pool, A taking the held share, interleaved with B's ports through the rotation (request i goes to A when i mod 10 < held ÷ 10); B is killed, so its ports are reclaimable while A's are not; then the load client (the same Node client for every server, one connection per request) asks for ${
      thousands(measuredRequests(pool))
    } ports (B's share at ${
      Math.max(...OCCUPANCIES)
    } % held, the same in every cell) for a third live process at 1 or 16 concurrent clients, after 100 untimed requests for pid 1, which every server refuses without touching its pool.`,
    "",
    "Requests per second (ours ÷ Python: above 1 means ours serves faster):",
    "",
    rps,
    "",
    "Latency, p50 / p99, in milliseconds:",
    "",
    latency,
    "",
    `The server's CPU time (user and system, from /proc) per request, in µs: the server's own cost, whatever the load client's. Python ÷ ours: above 1 means ours costs less. (/proc counts in clock ticks of ${
      1000 / f.results.machine.clockTicks
    } ms: a few ticks per run make a rough figure.)`,
    "",
    cpu,
    "",
    "Each server's rate at 90 % held ÷ its own rate at 0 % (1 means the held ports cost nothing):",
    "",
    own,
  ].join("\n");
}

function startupSection(f: Figures): string {
  const reps = f.results.sizes.startupReps;
  const python = f.get(startupKey("python"));
  return [
    HEADERS.startup,
    "",
    `Wall time from spawn to exit of a command that prints one port, no port server, median of ${reps} runs after one untimed run. Python ÷ ours: above 1 means ours starts faster.`,
    "",
    table(
      ["command", "ms", "Python ÷ ours"],
      STARTUPS.map((s) => [
        STARTUP_NAMES[s] + f.count(startupKey(s), reps),
        fixed(f.get(startupKey(s)), 1),
        s === "python" ? NONE : times(ratio(python, f.get(startupKey(s)))),
      ]),
    ),
  ].join("\n");
}

function memorySection(f: Figures): string {
  const { reps, memoryPool } = f.results.sizes;
  const mib = (kib: number | undefined) =>
    kib === undefined ? NONE : (kib / 1024).toFixed(1);
  const python = f.get(memoryKey("python", "full"));
  return [
    HEADERS.memory,
    "",
    `Peak resident set size (VmHWM) of a port server with a pool of ${
      thousands(memoryPool)
    } ports (${
      poolText(f.results.pools.memory)
    }): once it serves, and after it has handed out every port of the pool to a live process. Ours ÷ Python: below 1 means ours uses less memory.`,
    "",
    table(
      ["server", "after start, MiB", "pool handed out, MiB", "ours ÷ Python"],
      SERVERS.map((s) => [
        SERVER_NAMES[s] + f.count(memoryKey(s, "full"), reps),
        mib(f.get(memoryKey(s, "start"))),
        mib(f.get(memoryKey(s, "full"))),
        s === "python"
          ? NONE
          : times(ratio(f.get(memoryKey(s, "full")), python)),
      ]),
    ),
  ].join("\n");
}

/** The whole report, as markdown. */
export function renderMarkdown(results: Results): string {
  const f = new Figures(results);
  const m = results.machine;
  const load = (l: number[]) => l.map((v) => v.toFixed(2)).join(" ");
  const parts: string[] = [
    "# Benchmark",
    "",
    `Run on ${m.date} with \`${results.command}\`, in ${
      results.wallSeconds.toFixed(0)
    } s. Machine: **${m.cores} cores** (\`nproc\`), ${m.cpu}; load average ${
      load(m.loadBefore)
    } before, ${load(m.loadAfter)} after. Commit ${m.commit}.`,
    "",
    `Versions: ${m.versions.map(([k, v]) => `${k} ${v}`).join(", ")}.`,
    "",
    `Every figure is the median of ${results.sizes.reps} repetition${
      results.sizes.reps === 1 ? "" : "s"
    }, each in a fresh process, unless a section says otherwise.`,
  ];
  const sections: Record<Section, (f: Figures) => string> = {
    pick: pickSection,
    exhaust: exhaustSection,
    server: serverSection,
    startup: startupSection,
    memory: memorySection,
  };
  for (const section of SECTIONS) {
    if (f.has(section)) parts.push("", sections[section](f));
  }
  parts.push(
    "",
    TARGETS_HEADER,
    "",
    `On this machine's ${m.cores} cores:`,
    "",
  );
  const list = targets(results);
  if (list.length === 0) parts.push("- No target was measured in this run.");
  for (const t of list) {
    const verdict = t.met === undefined
      ? "**NOT MEASURED**"
      : t.met
      ? "**MET**"
      : "**NOT MET**";
    parts.push(`- ${verdict}: ${t.text}: ${t.measured}.`);
  }
  if (results.errors.length > 0 || results.notes.size > 0) {
    parts.push("", "## Notes", "");
    for (const e of results.errors) parts.push(`- Failed: ${code(e)}`);
    for (const [text, count] of results.notes) {
      parts.push(`- ${text}${count > 1 ? ` (in ${count} runs)` : ""}`);
    }
  }
  return parts.join("\n") + "\n";
}
