/**
 * Runs the whole test suite on Deno, Bun and Node 24 (and Deno once more
 * without --unstable-net, for its node:dgram fallback), side by side, prints
 * each runtime's output as it ends, and ends with one summary line:
 * `N passed, N failed`.
 *
 * Usage: `node tests/run.ts [file filter]` (the README's `npm test`), or
 * `deno task test`. Runtimes come from node_modules/.bin, else from PATH.
 */

import { spawn, spawnSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const filter = process.argv[2] ?? "";
const files = readdirSync(join(root, "tests"))
  .filter((f) => f.endsWith(".test.ts") && f.includes(filter))
  .sort()
  .map((f) => `tests/${f}`);

function tool(name: string): string {
  const local = join(root, "node_modules", ".bin", name);
  return existsSync(local) ? local : name;
}

interface Suite {
  name: string;
  command: string[];
  env?: Record<string, string>;
  /** Reads [passed, failed] off the runner's closing lines. */
  count(output: string): [number, number] | undefined;
}

const last = (output: string, pattern: RegExp): number | undefined => {
  const all = [...output.matchAll(pattern)];
  return all.length ? Number(all[all.length - 1][1]) : undefined;
};

const denoCount = (out: string): [number, number] | undefined => {
  // deno-lint-ignore no-control-regex
  const plain = out.replace(/\x1b\[[0-9;]*m/g, "");
  const m = /(?:ok|FAILED) \| (\d+) passed.*?\| (\d+) failed/.exec(plain);
  return m ? [Number(m[1]), Number(m[2])] : undefined;
};

const deno = tool("deno");
const suites: Suite[] = [
  {
    name: "deno",
    command: [deno, "test", "-A", "--unstable-net", ...files],
    count: denoCount,
  },
  {
    // Deno without --unstable-net has no Deno.listenDatagram: node:dgram then.
    name: "deno without --unstable-net",
    command: [
      deno,
      "test",
      "-A",
      "--no-check",
      "--no-config",
      "--node-modules-dir=none",
      ...files.filter((f) => f.includes("picker")),
    ],
    env: { PORTPICKER_TEST_NO_UNSTABLE: "1" },
    count: denoCount,
  },
  {
    name: "bun",
    command: [
      tool("bun"),
      "test",
      "--timeout",
      "120000",
      ...files.map((f) => `./${f}`),
    ],
    count: (out) => {
      const pass = last(out, /^\s*(\d+) pass$/gm);
      const fail = last(out, /^\s*(\d+) fail$/gm);
      return pass === undefined || fail === undefined
        ? undefined
        : [pass, fail];
    },
  },
  {
    name: "node",
    command: [tool("node"), "--test", "--test-concurrency=2", ...files],
    count: (out) => {
      const pass = last(out, /^ℹ pass (\d+)$/gm);
      const fail = last(out, /^ℹ fail (\d+)$/gm);
      const cancelled = last(out, /^ℹ cancelled (\d+)$/gm) ?? 0;
      return pass === undefined || fail === undefined
        ? undefined
        : [pass, fail + cancelled];
    },
  },
];

if (files.length === 0) {
  console.error(`no test file matches ${JSON.stringify(filter)}`);
  console.log("0 passed, 1 failed");
  process.exit(1);
}

const nodeVersion = spawnSync(tool("node"), ["--version"]).stdout?.toString()
  .trim();
if (!nodeVersion || Number(/^v(\d+)/.exec(nodeVersion)?.[1]) < 22) {
  console.error(
    `tests need Node 22 or later, found ${
      nodeVersion ?? "none"
    }: run npm ci first`,
  );
  console.log("0 passed, 1 failed");
  process.exit(1);
}

// What the tests talk to: Debian's Python portpicker (the peer of the
// interop tests) and OpenBSD nc (the protocol examples). Installed here when
// this is root on Debian; otherwise one line says what to install.
const PEERS = {
  "/usr/bin/portserver": "python3-portpicker",
  "/bin/nc.openbsd": "netcat-openbsd",
};
const missing = Object.entries(PEERS).filter(([path]) => !existsSync(path)).map(
  ([, pkg]) => pkg,
);
if (missing.length > 0) {
  const install = `apt-get install -y ${missing.join(" ")}`;
  const root = process.getuid?.() === 0 && existsSync("/usr/bin/apt-get");
  if (root) console.log(`=== ${install}`);
  const ok = root &&
    (spawnSync("sh", ["-c", `${install} || (apt-get update && ${install})`], {
      stdio: "ignore",
    }).status === 0);
  if (!ok) {
    console.error(
      `the tests need Debian's ${missing.join(" and ")}: ${
        root ? "apt-get failed: " : ""
      }run ${install}, as root`,
    );
    console.log("0 passed, 1 failed");
    process.exit(1);
  }
}

/** Runs one suite to its end; its output, and how it ended. */
function runSuite(suite: Suite): Promise<string> {
  return new Promise<string>((resolve) => {
    let text = "";
    const child = spawn(suite.command[0], suite.command.slice(1), {
      cwd: root,
      env: { ...process.env, ...suite.env, NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout.on("data", (c: Buffer) => text += c);
    child.stderr.on("data", (c: Buffer) => text += c);
    child.on("error", (error) => resolve(`${text}\n${error.message}`));
    child.on("close", (code) => resolve(`${text}\nexit ${code}`));
  });
}

// The runtimes run side by side: most of a suite's time is spent waiting on
// other processes. Each suite's output is printed whole, as it ends.
const started = performance.now();
const runnable = suites.filter((suite) =>
  // No file for this suite under the filter: deno test would run them all.
  suite.command.some((arg) => arg.endsWith(".test.ts"))
);
const results = await Promise.all(runnable.map(async (suite) => {
  // A region per suite, whichever suites the filter leaves.
  const slot = suites.indexOf(suite);
  // Each runtime's tests take their ports from a region of their own.
  suite.env = { ...suite.env, PORTPICKER_TEST_SLOT: String(slot) };
  const output = await runSuite(suite);
  console.log(`\n=== ${suite.name}: ${suite.command.slice(1).join(" ")}`);
  console.log(output);
  return { suite, output };
}));

let passed = 0;
let failed = 0;
const lines: string[] = [];
for (const { suite, output } of results) {
  const counts = suite.count(output);
  if (!counts) {
    lines.push(
      `${suite.name}: no summary from the runner (counted as 1 failed)`,
    );
    failed += 1;
    continue;
  }
  const exitCode = /exit (\d+)\s*$/.exec(output)?.[1];
  if (counts[1] === 0 && exitCode !== "0") counts[1] = 1;
  lines.push(`${suite.name}: ${counts[0]} passed, ${counts[1]} failed`);
  passed += counts[0];
  failed += counts[1];
}
const seconds = Math.round((performance.now() - started) / 1000);
console.log(`\n${lines.join("\n")}\n(${seconds} s)`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 && passed > 0 ? 0 : 1);
