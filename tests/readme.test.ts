/**
 * Runs the README's code blocks, so that what it shows is what the package
 * does. Each fenced block is one test:
 *
 * - ```ts: written to a temporary module whose imports of "@x/portpicker"
 *   (and of its "/portserver" and "/cli" entries) point at this repository's
 *   files, and run on the runtime running the test. It must exit 0, and the
 *   lines it prints must be what its `// prints X` comments say, in order. A
 *   block that talks to a port server gets one (`cli.ts serve` on a unique
 *   @address, as PORTSERVER_ADDRESS).
 * - ```sh: run line by line in one bash session, where `portpicker` is this
 *   repository's cli.ts on the runtime running the test. The test starts each
 *   `portpicker serve … &` itself and waits for its "Serving on" line. Every
 *   other line must exit 0, or the status its `# exit N` comment says; then
 *   its output is checked against what the command asked for (ports in the
 *   range and as many as asked, claims in the lock directory, the status
 *   line) and, for the `nc` protocol examples, against their comments. A line
 *   whose comment says "until ^C" runs in the background until the block
 *   ends, when it gets SIGINT as from ^C.
 * - ```text: the output of the command its `output of:` marker names.
 *
 * Every @address, /tmp path and port range of a block is replaced with a
 * fresh one, so that blocks collide neither with each other nor with other
 * tests. Tests wait for events (a line printed, a process gone), never sleep.
 *
 * Markers: an HTML comment on the last non-blank line before a block.
 *   <!-- not run: WHY -->        the block is skipped, with WHY as the reason;
 *   <!-- runs on: deno -->        it runs on these runtimes only (a list);
 *   <!-- output of: COMMAND -->   it is what COMMAND prints.
 * A block that this file cannot run and that has no marker fails: nothing is
 * skipped silently.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import type { PortServerStatus } from "../mod.ts";
import { poolSpec, startServer } from "./server_helpers.ts";
import {
  exitCodeOf,
  freeRange,
  MOD_URL,
  type Proc,
  releaseRange,
  ROOT,
  run,
  runCli,
  runScript,
  RUNTIME,
  scriptCommand,
  start,
  tempDir,
  uniqueName,
} from "./helpers.ts";

type Runtime = typeof RUNTIME;
const RUNTIMES: readonly Runtime[] = ["deno", "bun", "node"];

/** A fenced block of the README. */
interface Block {
  lang: string;
  /** The line of its opening fence, from 1. */
  line: number;
  code: string;
  marker?: { kind: "not run" | "runs on" | "output of"; value: string };
}

/** The README and the docs it links to: every block of them is run. */
const FILES = [
  "README.md",
  ...readdirSync(join(ROOT, "docs")).filter((f) => f.endsWith(".md")).sort()
    .map((f) => `docs/${f}`),
];

function readmeBlocks(file: string): Block[] {
  const lines = readFileSync(join(ROOT, file), "utf8").split("\n");
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\S*)\s*$/.exec(lines[i]);
    if (!open) continue;
    const end = lines.indexOf("```", i + 1);
    assert.ok(end > i, `README line ${i + 1}: a block that never closes`);
    let before = i - 1;
    while (before >= 0 && lines[before].trim() === "") before--;
    const comment = /^<!--\s*(.*?)\s*-->$/.exec(lines[before] ?? "");
    let marker: Block["marker"];
    if (comment) {
      const m = /^(not run|runs on|output of):\s*(\S.*)$/.exec(comment[1]);
      assert.ok(m, `README line ${before + 1}: unknown marker ${comment[0]}`);
      marker = { kind: m[1] as "not run", value: m[2] };
    }
    blocks.push({
      lang: open[1],
      line: i + 1,
      code: lines.slice(i + 1, end).join("\n"),
      marker,
    });
    i = end;
  }
  return blocks;
}

const PORTSERVER_URL = pathToFileURL(join(ROOT, "portserver.ts")).href;
const CLI_URL = pathToFileURL(join(ROOT, "cli.ts")).href;
/** What a TypeScript block calls that needs a port server. */
const NEEDS_SERVER =
  /\b(leasePorts|getPortServerStatus|returnPortsToServer|getPortFromPortServer)\b|PORTSERVER_ADDRESS/;

/**
 * The fresh names of a block: each @address becomes a unique one, /tmp/ a
 * temporary folder, and the ports of the README's ranges (`--pool A-B`,
 * `--range A-B`, `[A, B]`) a free range of the same size.
 */
class Fresh {
  readonly dir: string;
  #names = new Map<string, string>();
  #from = 0;
  #to = -1;
  #first = 0;
  #ranges: [number, number][] = [];

  private constructor(dir: string) {
    this.dir = dir;
  }

  static async of(code: string, dir: string): Promise<Fresh> {
    const fresh = new Fresh(dir);
    const ranges = [
      ...code.matchAll(/--(?:pool|range) (\d+)-(\d+)/g),
      ...code.matchAll(/\[\s*(\d{4,5}),\s*(\d{4,5})\s*\]/g),
    ].map((m) => [Number(m[1]), Number(m[2])]);
    if (ranges.length > 0) {
      fresh.#from = Math.min(...ranges.map((r) => r[0]));
      fresh.#to = Math.max(...ranges.map((r) => r[1]));
      fresh.#first = (await fresh.range(fresh.#to - fresh.#from + 1))[0];
    }
    return fresh;
  }

  /** A fresh range of `size` ports of this test process's region. */
  async range(size: number): Promise<[number, number]> {
    const range = await freeRange(size);
    this.#ranges.push(range);
    return range;
  }

  /** Gives back the ranges. */
  release(): void {
    for (const range of this.#ranges) releaseRange(range);
  }

  #name(name: string): string {
    let mapped = this.#names.get(name);
    if (!mapped) this.#names.set(name, mapped = uniqueName(`readme-${name}`));
    return mapped;
  }

  /** `text` with the block's names replaced; `quoted`: only "@name" literals. */
  apply(text: string, quoted = false): string {
    const names = quoted
      ? text.replace(
        /"@([A-Za-z][\w.-]*)"/g,
        (_, name) => JSON.stringify(this.#name(name)),
      )
      : text.replace(
        /(^|[\s=])@([A-Za-z][\w.-]*)/g,
        (_, lead, name) => lead + this.#name(name),
      );
    return names.replaceAll("/tmp/", `${this.dir}/`).replace(
      /\b\d{4,5}\b/g,
      (n) =>
        Number(n) >= this.#from && Number(n) <= this.#to
          ? String(this.#first + Number(n) - this.#from)
          : n,
    );
  }
}

// ---------------------------------------------------------------------------
// TypeScript blocks.

async function runTypeScript(block: Block): Promise<void> {
  const runtimes = block.marker?.kind === "runs on"
    ? block.marker.value.split(/[\s,]+/) as Runtime[]
    : RUNTIMES;
  for (const [global, name] of [["Deno", "deno"], ["Bun", "bun"]] as const) {
    if (new RegExp(`\\b${global}\\.`).test(block.code)) {
      assert.deepEqual(runtimes, [name], `uses ${global}: say runs on`);
    }
  }
  assert.match(
    block.code,
    /from "@x\/portpicker(\/portserver|\/cli)?";/,
    "a TypeScript block imports @x/portpicker, or says why it is not run",
  );
  const dir = tempDir("portpicker-readme-");
  let server: Proc | undefined;
  let fresh: Fresh | undefined;
  try {
    fresh = await Fresh.of(block.code, dir.path);
    // The block's own paths and ports first: the local files' URLs may lie
    // under /tmp too (a clone there), and must stay as they are.
    const code = fresh.apply(block.code, true)
      .replaceAll('"@x/portpicker/portserver"', JSON.stringify(PORTSERVER_URL))
      .replaceAll('"@x/portpicker/cli"', JSON.stringify(CLI_URL))
      .replaceAll('"@x/portpicker"', JSON.stringify(MOD_URL));
    const env: Record<string, string | undefined> = {
      PORTPICKER_LOCK_DIR: undefined,
    };
    if (NEEDS_SERVER.test(block.code)) {
      const address = uniqueName("readme-server");
      server = await startServer([
        "--pool",
        poolSpec(await fresh.range(100)),
        "--address",
        address,
      ]);
      env.PORTSERVER_ADDRESS = address;
    }
    const result = await runScript(code, { env, timeoutMs: 60_000 });
    assert.equal(
      result.code,
      0,
      `exit ${result.code}: ${result.stderr}${result.stdout}`,
    );
    const expected = [
      ...block.code.matchAll(/console\.log\(.*\/\/ prints (.*)$/gm),
    ]
      .map((m) => fresh!.apply(m[1]));
    if (expected.length > 0) {
      assert.deepEqual(result.stdout.trimEnd().split("\n"), expected);
    }
  } finally {
    await server?.stop();
    fresh?.release();
    dir.remove();
  }
}

// ---------------------------------------------------------------------------
// Shell blocks.

/** The files of one line of a shell session, quoted, and its end marker. */
interface LineFiles {
  out: string;
  err: string;
  fifo: string;
  done: string;
}

/** What one line of a shell session printed, and how it ended. */
interface LineResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * A bash session, fed one line at a time; `portpicker` on its PATH is this
 * repository's cli.ts on the runtime running the test. Job control is on, so
 * that each background line has a process group to interrupt, as ^C does.
 */
class Shell {
  readonly pid: number;
  readonly #proc: Proc;
  readonly #dir: string;
  #lines = 0;

  private constructor(proc: Proc, dir: string, pid: number) {
    this.#proc = proc;
    this.#dir = dir;
    this.pid = pid;
  }

  static async start(dir: string): Promise<Shell> {
    const quote = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;
    const command = scriptCommand(join(ROOT, "cli.ts")).map(quote).join(" ");
    const bin = join(dir, "bin");
    mkdirSync(bin);
    const wrapper = join(bin, "portpicker");
    writeFileSync(wrapper, `#!/bin/sh\nexec ${command} "$@"\n`, {
      mode: 0o755,
    });
    const proc = start(["bash", "--norc", "--noprofile"], {
      PATH: `${bin}:${process.env.PATH}`,
      PORTSERVER_ADDRESS: undefined,
      PORTPICKER_LOCK_DIR: undefined,
    });
    // A shell that died is reported by the wait for its output, with its
    // stderr; a write to it must not fail the test first with EPIPE.
    proc.child.stdin!.on("error", () => {});
    proc.child.stdin!.write(`set -m\ncd ${quote(dir)}\necho "__pid $$"\n`);
    await proc.waitFor(/__pid \d+\n/);
    const pid = Number(/__pid (\d+)\n/.exec(proc.stdout())![1]);
    return new Shell(proc, dir, pid);
  }

  /** Sends the text `make` writes for line n's files; returns n. */
  #send(make: (files: LineFiles) => string): number {
    const n = ++this.#lines;
    const file = (name: string) => `'${join(this.#dir, `${name}${n}`)}'`;
    this.#proc.child.stdin!.write(make({
      out: file("out"),
      err: file("err"),
      fifo: file("fifo"),
      done: `__done${n}`,
    }));
    return n;
  }

  async #result(n: number): Promise<LineResult> {
    const done = new RegExp(`__done${n} (\\d+)\\n`);
    await this.#proc.waitFor(done, 60_000);
    return {
      code: Number(done.exec(this.#proc.stdout())![1]),
      stdout: readFileSync(join(this.#dir, `out${n}`), "utf8"),
      stderr: readFileSync(join(this.#dir, `err${n}`), "utf8"),
    };
  }

  /** Runs `line` to its end. */
  run(line: string): Promise<LineResult> {
    return this.#result(
      this.#send((f) =>
        `{ ${line}\n} > ${f.out} 2> ${f.err}; echo "${f.done} $?"\n`
      ),
    );
  }

  /**
   * Starts `line` in the background and returns its first line of output,
   * once printed; it runs until {@linkcode close}.
   */
  background(line: string): Promise<LineResult> {
    return this.#result(
      this.#send((f) =>
        `mkfifo ${f.fifo}; { ${line}\n} > ${f.fifo} 2> ${f.err} &\n` +
        `read -r reply < ${f.fifo}; s=$?\n` +
        `printf '%s\\n' "$reply" > ${f.out}; echo "${f.done} $s"\n`
      ),
    );
  }

  /** Interrupts every background job, as ^C would, and ends the session. */
  async close(): Promise<void> {
    this.#proc.child.stdin!.write(
      "for p in $(jobs -p); do kill -INT -- -$p; done; wait; exit 0\n",
    );
    const code = await exitCodeOf(this.#proc, 30_000);
    assert.equal(code, 0, `the shell: ${this.#proc.stderr()}`);
  }
}

/** A line without its `# comment`. */
function splitComment(line: string): { command: string; comment: string } {
  const m = /^(.*?)\s+# (.*)$/.exec(line);
  return m ? { command: m[1], comment: m[2] } : { command: line, comment: "" };
}

/** The words of a command, `"$var"` and `$var` replaced by their values. */
function words(command: string, vars: Map<string, string>): string[] {
  return command.split(/\s+/).map((word) =>
    word.replace(/^"?\$(\w+)"?$/, (all, name) => vars.get(name) ?? all)
  );
}

/** The value of `--flag V` or `-f V` among `args`. */
function flag(args: string[], ...names: string[]): string | undefined {
  const i = args.findIndex((a) => names.includes(a));
  return i < 0 ? undefined : args[i + 1];
}

/** The flags of the command line that take a value. */
const VALUE_FLAGS = [
  "-n",
  "--count",
  "-p",
  "--port",
  "--range",
  "--exclude",
  "--portserver",
  "--label",
  "--lock-dir",
  "--env",
  "--pid",
  "--timeout",
  "--host",
];

/** The arguments of `portpicker …` that are not flags nor their values. */
function positionals(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 1; i < args.length; i++) {
    if (VALUE_FLAGS.includes(args[i])) i++;
    else if (!args[i].startsWith("-")) out.push(args[i]);
  }
  return out;
}

/** Checks what a pick printed against what its arguments asked for. */
function checkPick(args: string[], stdout: string, shellPid: number): void {
  const count = Number(flag(args, "-n", "--count") ?? 1);
  const ports: number[] = args.includes("--json")
    ? JSON.parse(stdout).ports
    : stdout.trimEnd().split("\n").map(Number);
  assert.equal(ports.length, count, `${count} ports: ${stdout}`);
  assert.equal(new Set(ports).size, count, `distinct: ${stdout}`);
  const range = flag(args, "--range")?.split("-").map(Number) ?? [1, 65535];
  for (const port of ports) {
    assert.ok(
      Number.isInteger(port) && port >= range[0] && port <= range[1],
      `${port} is a port in ${range.join("-")}`,
    );
  }
  const lockDir = flag(args, "--lock-dir");
  const given = positionals(args)[0];
  const pid = given === undefined || given === "$$" ? String(shellPid) : given;
  for (const port of lockDir ? ports : []) {
    const claim = readFileSync(join(lockDir!, `${port}.claim`), "utf8");
    assert.match(claim, new RegExp(`^${pid} \\d+\\n$`), "the claim names pid");
  }
}

/** The nc protocol examples: the reply is what the comment says. */
function checkReply(
  comment: string,
  reply: string,
  session: { shellPid: number; socket?: string; taken: number[] },
): void {
  const ok = /^(OK(?: \d+)+)/.exec(comment);
  const classic = /^(\d+) \(classic\)$/.exec(comment);
  if (ok) {
    assert.equal(reply, `${ok[1]}\n`);
    const ports = ok[1].split(" ").slice(1).map(Number);
    if (session.taken.length === 0) session.taken.push(...ports);
  } else if (comment.startsWith("{")) {
    assert.match(reply, /^\{[^\n]*\}\n$/);
    const status = JSON.parse(reply) as PortServerStatus;
    assert.equal(status.address, session.socket);
    assert.deepEqual(
      status.allocations.map((a) => [a.port, a.pid, a.label]),
      session.taken.map((port) => [port, session.shellPid, "web"]),
    );
  } else {
    assert.ok(classic, `unexpected comment ${comment}`);
    assert.equal(reply, `${classic[1]}\n`);
  }
}

async function runShell(block: Block): Promise<void> {
  if (block.code.includes("nc -U")) {
    const nc = await run(["sh", "-c", "nc -h 2>&1 | head -n 1"]);
    assert.match(
      nc.stdout,
      /OpenBSD netcat/,
      "OpenBSD nc is needed (apt-get install netcat-openbsd; .ci/run installs it)",
    );
  }
  const dir = tempDir("portpicker-readme-");
  const servers: Proc[] = [];
  let shell: Shell | undefined;
  const leased: number[] = [];
  let fresh: Fresh | undefined;
  try {
    fresh = await Fresh.of(block.code, dir.path);
    shell = await Shell.start(dir.path);
    const vars = new Map<string, string>();
    const session = {
      shellPid: shell.pid,
      socket: undefined as string | undefined,
      taken: [] as number[],
    };
    for (const readmeLine of block.code.split("\n")) {
      if (readmeLine.trim() === "") continue;
      const line = fresh.apply(readmeLine);
      const { command, comment } = splitComment(line);
      const what = `README: ${readmeLine}`;
      const serve = /^portpicker serve (.+) &$/.exec(command);
      if (serve) {
        const args = serve[1].split(/\s+/);
        session.socket = flag(args, "--address");
        servers.push(await startServer(args));
        continue;
      }
      if (comment.includes("until ^C")) {
        const result: LineResult = await shell.background(line);
        assert.equal(result.code, 0, `${what}: no reply; ${result.stderr}`);
        checkReply(comment, result.stdout, session);
        leased.push(Number(/^OK (\d+)/.exec(result.stdout)![1]));
        continue;
      }
      const result: LineResult = await shell.run(line);
      const code = Number(/^exit (\d+)/.exec(comment)?.[1] ?? 0);
      assert.equal(
        result.code,
        code,
        `${what}: exit ${result.code}; ${result.stderr}`,
      );
      if (code !== 0) {
        assert.match(result.stderr, /^portpicker( [a-z]+)?: [^\n]+\n$/, what);
        continue;
      }
      if (/\| nc -U /.test(command)) {
        checkReply(comment, result.stdout, session);
        continue;
      }
      const assignment = /^(\w+)=\$\((portpicker\b.*)\)$/.exec(command);
      const args = words(assignment ? assignment[2] : command, vars);
      if (args[0] !== "portpicker") continue;
      const sub = args[1] ?? "";
      let stdout = result.stdout;
      if (assignment) {
        stdout = (await shell.run(`printf '%s\\n' "$${assignment[1]}"`))
          .stdout;
        vars.set(assignment[1], stdout.trim());
      }
      if (sub === "status" && !args.includes("--json")) {
        const head = stdout.split("\n")[0];
        assert.match(head, /^\d+ of \d+ ports held on \S+/, what);
        if (/^\d+ of \d+ ports held on \S+$/.test(comment)) {
          assert.equal(head, comment, what);
        }
      } else if (sub === "return") {
        const lockDir = flag(args, "--lock-dir");
        for (const port of positionals(args).slice(1)) {
          assert.ok(
            !lockDir || !existsSync(join(lockDir, `${port}.claim`)),
            `${what}: the claim of ${port} is gone`,
          );
        }
      } else if (sub === "run") {
        // One distinct port per --env name, as the command printed them.
        const names = (flag(args, "--env") ?? "PORT").split(",");
        const ports = stdout.trim().split(/\s+/).map(Number);
        assert.ok(
          ports.every((p) => p >= 1 && p <= 65535),
          `${what}: ${stdout}`,
        );
        assert.equal(new Set(ports).size, names.length, `${what}: ${stdout}`);
      } else if (!["serve", "wait", "-h", "--help", "-V"].includes(sub)) {
        checkPick(args, stdout, shell.pid);
      }
    }
    await shell.close();
    shell = undefined;
    // ^C ended each lease: the server says so.
    for (const port of leased) {
      await Promise.any(
        servers.map((s) =>
          s.waitFor(new RegExp(`Lease of ports ${port} ended`))
        ),
      );
    }
  } finally {
    await shell?.close().catch(() => {});
    for (const server of servers) {
      assert.equal(await server.stop(), 0, `server: ${server.stderr()}`);
    }
    fresh?.release();
    dir.remove();
  }
}

// ---------------------------------------------------------------------------
// Output blocks, and the tests.

async function checkOutput(block: Block): Promise<void> {
  const [name, ...args] = block.marker!.value.split(/\s+/);
  assert.equal(name, "portpicker", "output of: a portpicker command");
  const result = await runCli(args);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout.trimEnd(), block.code.trimEnd());
}

for (
  const block of FILES.flatMap((file) =>
    readmeBlocks(file).map((b) => ({ ...b, file }))
  )
) {
  const first = block.code.split("\n").find((l) => l.trim() !== "") ?? "";
  const name = `${block.file} line ${block.line}: ${block.lang} ${
    first.slice(0, 60)
  }`;
  const marker = block.marker;
  if (marker?.kind === "not run") {
    test(name, { skip: `not run: ${marker.value}` }, () => {});
    continue;
  }
  if (marker?.kind === "output of") {
    test(name, () => checkOutput(block));
    continue;
  }
  const runtimes = marker?.kind === "runs on"
    ? marker.value.split(/[\s,]+/)
    : RUNTIMES;
  for (const runtime of runtimes) {
    assert.ok(RUNTIMES.includes(runtime as Runtime), `runs on: ${runtime}?`);
  }
  const skip = runtimes.includes(RUNTIME)
    ? false
    : `runs on ${runtimes.join(", ")} only`;
  if (block.lang === "ts") {
    test(name, { skip }, () => runTypeScript(block));
  } else if (block.lang === "sh") {
    test(name, { skip }, () => runShell(block));
  } else {
    test(name, () => {
      assert.fail(
        `a ${
          block.lang || "plain"
        } block that is not run: mark it <!-- not run: why -->`,
      );
    });
  }
}
