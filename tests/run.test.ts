/**
 * `portpicker run -- COMMAND`: ports in the command's environment, held for
 * exactly its lifetime; its exit status, signals passed on, and the shell's
 * 127 and 126. A real child, a real second process, a real server.
 */

import assert from "node:assert/strict";
import {
  chownSync,
  existsSync,
  mkdirSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import {
  exitCodeOf,
  freeRange,
  MOD_URL,
  releaseRange,
  run,
  runCli,
  runtimeCommand,
  scriptCommand,
  start,
  tempDir,
  tmpfs,
  tool,
} from "./helpers.ts";
import { withServer } from "./server_helpers.ts";

/** `portpicker run ARGS` as a long-running process. */
function startRun(
  args: string[],
  env: Record<string, string | undefined> = {},
) {
  return start([...runtimeCommand("cli.ts"), "run", ...args], {
    PORTSERVER_ADDRESS: undefined,
    PORTPICKER_LOCK_DIR: undefined,
    ...env,
  });
}

test("run: one distinct port per --env name, and the command's exit status", async () => {
  const result = await runCli([
    "run",
    "--env",
    "WEB,DB",
    "--",
    "sh",
    "-c",
    'echo "$WEB $DB"; exit 3',
  ]);
  assert.equal(result.code, 3, result.stderr);
  const [web, db] = result.stdout.trim().split(" ").map(Number);
  assert.ok(web > 0 && db > 0 && web !== db, result.stdout);
  const plain = await runCli(["run", "--", "sh", "-c", 'echo "$PORT"']);
  assert.equal(plain.code, 0, plain.stderr);
  assert.match(plain.stdout, /^\d+\n$/);
});

test("run: a port claimed for the command is refused to another process while it runs, then freed", async () => {
  const dir = tempDir();
  try {
    const [port] = await freeRange(1);
    const args = ["--range", `${port}-${port}`, "--lock-dir", dir.path];
    const running = startRun([
      ...args,
      "--",
      "sh",
      "-c",
      'echo "got $PORT"; read line',
    ]);
    await running.waitFor(/got \d+\n/);
    assert.equal(running.stdout(), `got ${port}\n`);
    assert.ok(existsSync(join(dir.path, `${port}.claim`)));
    const other = await runCli([...args, String(process.pid)]);
    assert.equal(other.code, 1, other.stdout);
    assert.match(other.stderr, /No free port found/);
    running.child.stdin!.end("done\n");
    assert.equal(await running.stop("SIGCONT"), 0, running.stderr());
    assert.deepEqual(readdirSync(dir.path), []);
    const after = await runCli([...args, String(process.pid)]);
    assert.equal(after.stdout, `${port}\n`, after.stderr);
  } finally {
    dir.remove();
  }
});

test("run: SIGTERM, SIGINT and SIGHUP reach the command; a signal's death is 128 + its number", async () => {
  for (
    const [signal, number] of [["SIGTERM", 15], ["SIGINT", 2], [
      "SIGHUP",
      1,
    ]] as const
  ) {
    // The command traps it and says so: it was passed on.
    const trapped = startRun([
      "--",
      "sh",
      "-c",
      `trap 'echo caught; exit 7' ${
        signal.slice(3)
      }; echo ready; while :; do sleep 0.05; done`,
    ]);
    await trapped.waitFor(/ready\n/);
    assert.equal(
      await trapped.stop(signal),
      7,
      `${signal}: ${trapped.stderr()}`,
    );
    assert.match(trapped.stdout(), /caught\n/);
    // Not trapped: the command dies of it, and run says so as a shell would.
    const killed = startRun(["--", "sh", "-c", "echo ready; exec sleep 600"]);
    await killed.waitFor(/ready\n/);
    assert.equal(
      await killed.stop(signal),
      128 + number,
      `${signal}: ${killed.stderr()}`,
    );
  }
});

test("run: a command not found is 127, one that cannot be run 126, each one line", async () => {
  const dir = tempDir();
  try {
    const missing = await runCli(["run", "--", join(dir.path, "nothing-here")]);
    assert.equal(missing.code, 127, missing.stderr);
    assert.match(
      missing.stderr,
      /^portpicker run: cannot run "[^"]+": command not found\n$/,
    );
    const script = join(dir.path, "not-executable.sh");
    writeFileSync(script, "echo hi\n", { mode: 0o644 });
    const denied = await runCli(["run", "--", script]);
    assert.equal(denied.code, 126, denied.stderr);
    assert.match(
      denied.stderr,
      /^portpicker run: cannot run "[^"]+": [^\n]+\n$/,
    );
  } finally {
    dir.remove();
  }
});

test("run: usage errors are one line, exit 2", async () => {
  for (
    const args of [["run"], ["run", "--env", "1X", "--", "true"], [
      "run",
      "--env",
      "A,A",
      "--",
      "true",
    ], ["run", "--range", "9-1", "--", "true"]]
  ) {
    const result = await runCli(args);
    assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    assert.match(result.stderr, /^portpicker run: [^\n]+ \(see --help\)\n$/);
  }
});

test("run: with a port server, the ports are a lease that ends with run, even when run is SIGKILLed", async () => {
  await withServer({ size: 3, name: "@run" }, async ({ server, address }) => {
    const running = startRun([
      "--env",
      "A,B",
      "--label",
      "job",
      "--",
      "sh",
      "-c",
      'echo "got $A $B $$"; exec sleep 600',
    ], {
      PORTSERVER_ADDRESS: address,
    });
    await running.waitFor(/got \d+ \d+ \d+\n/);
    const [a, b, command] = /got (\d+) (\d+) (\d+)/.exec(running.stdout())!
      .slice(1).map(Number);
    const status = await runCli(["status", "--json", "--portserver", address]);
    const held = JSON.parse(status.stdout).allocations.map((
      x: { port: number; lease: boolean; label: string },
    ) => [x.port, x.lease, x.label]);
    assert.deepEqual(held, [[Math.min(a, b), true, "job"], [
      Math.max(a, b),
      true,
      "job",
    ]]);
    process.kill(running.child.pid!, "SIGKILL");
    await exitCodeOf(running, 15_000);
    // The command outlives a killed run: it is the test's to end.
    process.kill(command, "SIGKILL");
    await server.waitFor(/Lease of ports [\d, ]+ ended/);
    const after = JSON.parse(
      (await runCli(["status", "--json", "--portserver", address])).stdout,
    );
    assert.equal(after.allocated, 0);
  });
});

// ---------------------------------------------------------------------------
// Unique across processes with no set-up: the user's lock directory.

/** A script that picks `count` ports of `range`, prints them, and lives until its stdin ends. */
const PICK_AND_WAIT = (count: number, range: [number, number]) => `
import process from "node:process";
import { pickUnusedPorts } from ${JSON.stringify(MOD_URL)};
const ports = await pickUnusedPorts(${count}, { range: [${range[0]}, ${
  range[1]
}] });
console.log(ports.join(" "));
for await (const _ of process.stdin) break;
`;

test("with no configuration, living processes on Deno, Bun and Node never share a port of one small range", async () => {
  const dir = tempDir();
  try {
    const range = await freeRange(40);
    const script = join(dir.path, "pick.mts");
    writeFileSync(script, PICK_AND_WAIT(4, range));
    const env = {
      XDG_RUNTIME_DIR: dir.path,
      PORTPICKER_LOCK_DIR: undefined,
      PORTSERVER_ADDRESS: undefined,
    };
    const commands = [
      [tool("deno"), "run", "-A", "--no-config", script],
      [tool("bun"), script],
      [tool("node"), script],
    ];
    // One after another, each alive until the end: 9 processes, 36 ports.
    const procs = [];
    for (let i = 0; i < 9; i++) {
      const proc = start(commands[i % 3], env);
      procs.push(proc);
      await proc.waitFor(/^\d+ \d+ \d+ \d+\n/);
    }
    const ports = procs.flatMap((p) =>
      p.stdout().trim().split(" ").map(Number)
    );
    assert.equal(ports.length, 36);
    assert.equal(new Set(ports).size, 36, `shared: ${ports.join(" ")}`);
    assert.equal(readdirSync(join(dir.path, "portpicker")).length, 36);
    for (const proc of procs) proc.child.stdin!.end();
    for (const proc of procs) {
      assert.equal(await proc.stop("SIGCONT"), 0, proc.stderr());
    }
    // A normal exit removes a process's claims.
    assert.deepEqual(readdirSync(join(dir.path, "portpicker")), []);
    releaseRange(range);
  } finally {
    dir.remove();
  }
});

test("the user's lock directory: a file, a symlink or another user's directory in its place is refused in one line, and picking goes on", async () => {
  const dir = tempDir();
  try {
    const place = join(dir.path, "portpicker");
    const elsewhere = join(dir.path, "elsewhere");
    mkdirSync(elsewhere);
    const plants: [string, () => void, RegExp][] = [
      ["a file", () => writeFileSync(place, "x"), /it is not a directory/],
      ["a symlink", () => symlinkSync(elsewhere, place), /it is a symlink/],
      [
        "another user's directory",
        () => (mkdirSync(place), chownSync(place, 65534, 65534)),
        /it belongs to uid 65534, not \d+/,
      ],
    ];
    for (const [what, plant, why] of plants) {
      rmSync(place, { recursive: true, force: true });
      plant();
      const result = await runCli([String(process.pid)], {
        env: { XDG_RUNTIME_DIR: dir.path, PORTPICKER_LOCK_DIR: undefined },
      });
      assert.equal(result.code, 0, `${what}: ${result.stderr}`);
      assert.match(result.stdout, /^\d+\n$/, what);
      assert.match(
        result.stderr,
        new RegExp(
          `^portpicker: not claiming ports in ${place}: ${why.source}\\n$`,
        ),
        what,
      );
      assert.deepEqual(readdirSync(elsewhere), [], `${what}: nothing claimed`);
    }
  } finally {
    dir.remove();
  }
});

test("an empty PORTPICKER_LOCK_DIR, or lockDir: false, makes no claims; the user's directory is made mode 0700", async () => {
  const dir = tempDir();
  try {
    const script = join(dir.path, "pick.mts");
    writeFileSync(
      script,
      `
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
await pickUnusedPort({ lockDir: false });
console.log("picked");
`,
    );
    const env = { XDG_RUNTIME_DIR: dir.path, PORTPICKER_LOCK_DIR: undefined };
    const off = await run(scriptCommand(script), { env });
    assert.equal(off.stdout, "picked\n", off.stderr);
    const empty = await runCli([String(process.pid)], {
      env: { ...env, PORTPICKER_LOCK_DIR: "" },
    });
    assert.equal(empty.code, 0, empty.stderr);
    assert.ok(
      !existsSync(join(dir.path, "portpicker")),
      "no claim, no directory",
    );
    const claimed = await runCli([String(process.pid)], { env });
    assert.equal(claimed.code, 0, claimed.stderr);
    const place = join(dir.path, "portpicker");
    assert.equal(statSync(place).mode & 0o777, 0o700);
    assert.deepEqual(readdirSync(place), [`${claimed.stdout.trim()}.claim`]);
  } finally {
    dir.remove();
  }
});

test("the user's lock directory on a full disk: one line, and the port all the same", async () => {
  const dir = tmpfs("16k");
  try {
    dir.fill(join(dir.path, "portpicker"));
    const result = await runCli([String(process.pid)], {
      env: { XDG_RUNTIME_DIR: dir.path, PORTPICKER_LOCK_DIR: undefined },
    });
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^\d+\n$/);
    assert.match(
      result.stderr,
      new RegExp(
        `^portpicker: not claiming ports in ${dir.path}/portpicker: Cannot [^\\n]+\\n$`,
      ),
    );
    assert.deepEqual(readdirSync(join(dir.path, "portpicker")), []);
  } finally {
    dir.remove();
  }
});
