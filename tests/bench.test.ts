/**
 * Smoke test of the bench: `bench/run.ts --tiny` runs to its end on the
 * runtime running the test and writes its report and chart. The figures
 * themselves are not checked: the bench is not part of the test suite.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { HEADERS, SECTIONS, TARGETS_HEADER } from "../bench/report.ts";
import {
  exclusive,
  PYTHON,
  ROOT,
  run,
  RUNTIME,
  runtimeCommand,
  tempDir,
  tool,
} from "./helpers.ts";

/** The tiny run takes seconds; a busy machine may take much longer. */
const TIMEOUT_MS = 240_000;

interface BenchRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs the bench; on timeout, SIGTERM first, so that it kills the servers
 * and sleepers it started, then SIGKILL.
 */
function runBench(args: string[]): Promise<BenchRun> {
  const command = runtimeCommand("bench/run.ts");
  return new Promise((resolve, reject) => {
    const child = spawn(command[0], [...command.slice(1), ...args], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (chunk) => stdout += chunk);
    child.stderr!.on("data", (chunk) => stderr += chunk);
    let kill: ReturnType<typeof setTimeout> | undefined;
    const timer = setTimeout(() => {
      child.kill("SIGTERM");
      kill = setTimeout(() => child.kill("SIGKILL"), 10_000);
    }, TIMEOUT_MS);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      clearTimeout(kill);
      resolve({ code, stdout, stderr });
    });
  });
}

test("bench/run.ts --tiny writes the report and a valid SVG chart", {
  timeout: TIMEOUT_MS + 30_000,
  // The bench drives Deno, Bun, Node and Python itself, whichever runs it;
  // its entry point is `deno task bench`.
  skip: RUNTIME !== "deno" ? "run once, from Deno (deno task bench)" : false,
}, async () => {
  const dir = tempDir("portpicker-bench-test-");
  try {
    // Its pools start at 5000, as the wide pool of the hostile tests.
    const result = await exclusive(
      "ports-5000-14999",
      () => runBench(["--tiny", "--out", dir.path]),
    );
    assert.equal(
      result.code,
      0,
      `exit ${result.code}: ${result.stderr.slice(-2000)}`,
    );

    const markdown = readFileSync(join(dir.path, "results.md"), "utf8");
    assert.equal(result.stdout, markdown, "stdout is the markdown written");
    for (const section of SECTIONS) {
      assert.ok(markdown.includes(`\n${HEADERS[section]}\n`), HEADERS[section]);
    }
    const targets = markdown.slice(markdown.indexOf(`\n${TARGETS_HEADER}\n`));
    assert.ok(targets.length > TARGETS_HEADER.length, "a Targets section");
    const verdicts = targets.match(/^- \*\*(MET|NOT MET)\*\*: /gm) ?? [];
    assert.equal(verdicts.length, 4, `four targets judged:\n${targets}`);
    assert.match(markdown, /\*\*\d+\s+cores\*\*/);
    // Rows a figure of which would read "—" had it failed: picking on Deno
    // with and without --unstable-net; the server against Python and its
    // runtime's own sockets (bench/trivial.ts); their rates; the memory rows.
    for (
      const row of [
        /^\| ours, `pickUnusedPort` on Deno with `--unstable-net` +\| +[\d,]+ \|/m,
        /^\| ours, `pickUnusedPort` on Deno without `--unstable-net` +\| +[\d,]+ \|/m,
        /^\| 90 % +\| +16 \|( +[\d,]+ \|){3}( +[\d.]+× \|){4}$/m,
        /^\| Deno +\|( +[\d,]+ \|){2} +\d+ \| +[\d.]+× \|$/m,
        /^\| Bun +\|( +[\d,]+ \|){2} +\d+ \| +[\d.]+× \|$/m,
        /^\| ours on Bun +\|( +[\d.]+ \|){2} +-?[\d.]+ \| +[\d.]+× \| +[\d,]+ \|$/m,
        /^\| Deno's own sockets \(`bench\/trivial.ts`\) +\|( +[\d.]+ \|){2} +-?[\d.]+ \|/m,
        /^\| empty Bun \(an idle script\) +\| +[\d.]+ \|/m,
      ]
    ) assert.match(markdown, row);

    const chart = join(dir.path, "chart.svg");
    assert.ok(existsSync(chart), "chart.svg written");
    assert.match(readFileSync(chart, "utf8"), /^<\?xml[^>]*>\s*<svg[\s>]/);
    const parsed = await run([
      PYTHON,
      "-c",
      "import xml.dom.minidom, sys; xml.dom.minidom.parse(sys.argv[1])",
      chart,
    ]);
    assert.equal(
      parsed.code,
      0,
      `chart.svg is not valid XML: ${parsed.stderr}`,
    );

    // bench/results.md and bench/chart.svg are committed: they must pass the
    // repository's `deno fmt --check` as the bench writes them.
    const fmt = await run([tool("deno"), "fmt", "--check", dir.path]);
    assert.equal(fmt.code, 0, `not formatted as deno fmt does: ${fmt.stderr}`);
  } finally {
    dir.remove();
  }
});
