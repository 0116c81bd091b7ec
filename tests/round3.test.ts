/**
 * Hostile input, round three: each test reproduces one finding of the third
 * review (dead-pid claims, planted FIFOs and symlinks, hanging connects,
 * split requests, Deno's permissions, full disks, log floods, messages).
 */

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import {
  existsSync,
  readdirSync,
  readFileSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { waitForPort } from "../mod.ts";
import {
  freeRange,
  PYTHON,
  requirePython,
  ROOT,
  run,
  runCli,
  RUNTIME,
  start,
  tempDir,
  tmpfs,
  tool,
  uniqueName,
} from "./helpers.ts";
import {
  exchange,
  loggedStats,
  poolSpec,
  randomPool,
  statsOnSigusr1,
  withServer,
} from "./server_helpers.ts";

const CLI = join(ROOT, "cli.ts");
/** Deno with exactly the flags a user gives, never -A. */
const deno = (
  ...flags: string[]
) => [tool("deno"), "run", "--no-prompt", "--no-config", ...flags];

/** A pid that no process has: above every kernel's pid_max. */
const DEAD_PID = 4_000_000;

test("a claim for a pid that is not alive is refused, naming the pid; a planted one is stale at once", async () => {
  const dir = tempDir();
  try {
    const [port] = await freeRange(1);
    const refused = await runCli([
      String(DEAD_PID),
      "--range",
      `${port}-${port}`,
      "--lock-dir",
      dir.path,
    ]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(
      refused.stderr,
      new RegExp(`^portpicker: [^\\n]*pid ${DEAD_PID}[^\\n]*\\n$`),
    );
    assert.deepEqual(readdirSync(dir.path), []);
    writeFileSync(join(dir.path, `${port}.claim`), `${DEAD_PID} 0\n`);
    const taken = await runCli([
      "--range",
      `${port}-${port}`,
      "--lock-dir",
      dir.path,
    ]);
    assert.equal(taken.stdout, `${port}\n`, taken.stderr);
  } finally {
    dir.remove();
  }
});

for (const kind of ["fifo", "symlink to /dev/zero"]) {
  test(`a ${kind} named <port>.claim is garbage: neither read nor waited on; taken over once old`, async () => {
    const dir = tempDir();
    try {
      const [port] = await freeRange(1);
      const claim = join(dir.path, `${port}.claim`);
      const plant = () =>
        kind === "fifo"
          ? spawnSync("mkfifo", [claim])
          : symlinkSync("/dev/zero", claim);
      plant();
      const args = ["--range", `${port}-${port}`, "--lock-dir", dir.path];
      // Young garbage may be a claim being written: the port is not free.
      const young = await runCli(args, { timeoutMs: 30_000 });
      assert.equal(young.code, 1, young.stderr);
      assert.match(young.stderr, /No free port found/);
      // Older than a claim being written could be: taken over.
      spawnSync("touch", ["-h", "-d", "1 hour ago", claim]);
      const old = await runCli(args, { timeoutMs: 30_000 });
      assert.equal(old.stdout, `${port}\n`, old.stderr);
      assert.match(readFileSync(claim, "utf8"), /^\d+ \d+\n$/);
    } finally {
      dir.remove();
    }
  });
}

/** A listener that never accepts, made by Python: its queue fills at once. */
function pythonFullQueue(): { port: Promise<number>; stop(): void } {
  requirePython();
  const proc = start([
    PYTHON,
    "-c",
    `
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(0)
port = s.getsockname()[1]
held = []
for i in range(8):
    c = socket.socket(); c.setblocking(False)
    try: c.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    held.append(c)
print(port, flush=True)
time.sleep(600)
`,
  ]);
  return {
    port: proc.waitFor(/^\d+\n/).then(() => Number(proc.stdout().trim())),
    stop: () => void proc.stop("SIGKILL"),
  };
}

test("wait: a connect that hangs (full accept queue) ends with the timeout and with the signal", async () => {
  const listener = pythonFullQueue();
  try {
    const port = await listener.port;
    const cli = await runCli([
      "wait",
      String(port),
      "--timeout",
      "1",
      "--host",
      "127.0.0.1",
    ], { timeoutMs: 20_000 });
    assert.equal(cli.code, 1, `${cli.signal} ${cli.stderr}`);
    assert.match(
      cli.stderr,
      new RegExp(
        `^portpicker wait: Port ${port} did not accept connections[^\\n]*\\n$`,
      ),
    );
    await assert.rejects(
      waitForPort(port, { timeout: 500, hostname: "127.0.0.1" }),
      /did not accept/,
    );
    const reason = new Error("stopped by the test");
    const aborting = new AbortController();
    const waiting = waitForPort(port, {
      timeout: 60_000,
      hostname: "127.0.0.1",
      signal: aborting.signal,
    });
    setTimeout(() => aborting.abort(reason), 200);
    await assert.rejects(waiting, (error) => error === reason);
  } finally {
    listener.stop();
  }
});

test("wait: an unresolvable host is one line at once, not a timeout", async () => {
  const result = await runCli([
    "wait",
    "80",
    "--host",
    "no-such-host.invalid",
    "--timeout",
    "600",
  ], { timeoutMs: 60_000 });
  assert.equal(result.code, 1, result.stderr);
  assert.match(
    result.stderr,
    /^portpicker wait: Cannot wait for port 80 on no-such-host\.invalid: [^\n]+\n$/,
  );
});

test("an extended request split after its first byte is answered, not taken for a classic one", async () => {
  await withServer({ size: 3, name: "@split" }, async ({ server, address }) => {
    const { bytes } = await exchange(address, {
      delayMs: 200,
      pieces: ["T", `AKE pid=${process.pid} count=1\n`],
    });
    assert.match(bytes.toString(), /^OK \d+\n$/);
    const status = await exchange(address, {
      delayMs: 100,
      pieces: ["S", "TA", "TUS", "\n"],
    });
    assert.match(status.bytes.toString(), /^\{"address":/);
    assert.doesNotMatch(server.stderr(), /Could not parse/);
    // Cut short at the end of the connection: refused, not taken as a whole.
    const cut = await exchange(address, `TAKE pid=${process.pid}`, {
      end: true,
    });
    assert.equal(cut.bytes.toString(), "ERR a request without a newline\n");
  });
});

test("messages: an unreachable @name is printed as @name, without a NUL byte", async () => {
  const address = uniqueName("@nobody-here");
  const result = await runCli(["status", "--portserver", address]);
  assert.equal(result.code, 1, result.stderr);
  assert.match(
    result.stderr,
    new RegExp(
      `^portpicker status: Cannot reach the port server at ${address}: [^\\n]+\\n$`,
    ),
  );
  assert.doesNotMatch(result.stderr, /\0/);
});

test("the server's log is not flooded: 200 bad requests give at most a few lines, and the statistics count all", async () => {
  await withServer({ size: 2, name: "@flood" }, async ({ server, address }) => {
    for (let i = 0; i < 200; i++) await exchange(address, "nonsense\n");
    const stats = await statsOnSigusr1(server);
    assert.equal(stats["client-request-errors"], 200);
    const lines = server.stderr().match(/Could not parse request/g) ?? [];
    assert.ok(lines.length <= 2, server.stderr());
  });
});

test("a full disk under --state: one warning line, not one per refused request", async () => {
  const mount = tmpfs("64k");
  try {
    const state = join(mount.path, "state.json");
    await withServer(
      { size: 50, name: "@fulldisk", args: ["--state", state] },
      async ({ server, address }) => {
        mount.fill();
        let refused = 0;
        for (let i = 0; i < 40; i++) {
          const { bytes } = await exchange(
            address,
            `TAKE pid=${process.pid} count=1\n`,
          );
          if (bytes.toString().startsWith("ERR")) refused++;
        }
        assert.ok(refused > 0, server.stderr());
        const lines = server.stderr().match(/Not handing out ports/g) ?? [];
        assert.ok(lines.length >= 1 && lines.length <= 2, server.stderr());
        assert.equal(loggedStats(server).length, 0);
      },
    );
  } finally {
    mount.remove();
  }
});

test("a full disk under a lock directory: one line naming the file, and no draft left behind", async () => {
  const mount = tmpfs("16k");
  try {
    const locks = join(mount.path, "locks");
    // The directory itself cannot be made on a full disk: made first.
    mount.fill(locks);
    for (let i = 0; i < 3; i++) {
      const result = await runCli(["--lock-dir", locks]);
      assert.equal(result.code, 1, result.stdout + result.stderr);
      assert.match(
        result.stderr,
        new RegExp(`^portpicker: Cannot [^\\n]*${locks}/[^\\n]*\\n$`),
      );
    }
    assert.deepEqual(readdirSync(locks), []);
  } finally {
    mount.remove();
  }
});

// Deno's permissions: every row of the README's table, with exactly its
// flags. Deno 2.9 lets a program read /proc only with --allow-all (even
// --allow-read=/proc is refused): the server, lock directories and Linux's
// reserved ports need -A there, and say so without it.
if (RUNTIME === "deno") {
  test("Deno: the server started with -A answers Debian's Python client; without -A it says it needs it", async () => {
    requirePython();
    const narrow = [
      "--allow-net",
      "--allow-read",
      "--allow-write",
      "--allow-env",
    ];
    const refused = await run([
      ...deno(...narrow),
      CLI,
      "serve",
      "--address",
      uniqueName("@narrow"),
    ]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.match(
      refused.stderr,
      /^portpicker serve: Cannot read \/proc\/\d+\/stat: [^\n]*--allow-all[^\n]*\n$/,
    );
    const range = await randomPool(5);
    const address = uniqueName("@flags");
    const server = start([
      ...deno("-A"),
      CLI,
      "serve",
      "--pool",
      poolSpec(range),
      "--address",
      address,
    ]);
    try {
      await server.waitFor(/Serving on/);
      const python = await run([
        PYTHON,
        "-c",
        "import portpicker; print(portpicker.pick_unused_port())",
      ], {
        env: { PORTSERVER_ADDRESS: address },
      });
      const port = Number(python.stdout);
      assert.ok(
        port >= range[0] && port <= range[1],
        python.stdout + python.stderr + server.stderr(),
      );
    } finally {
      await server.stop();
    }
  });

  test("Deno: a lock directory with -A (one line naming --allow-all without it); return without write access names the file", async () => {
    const dir = tempDir();
    try {
      const [port] = await freeRange(1);
      const args = [
        "--range",
        `${port}-${port}`,
        "--lock-dir",
        dir.path,
        String(process.pid),
      ];
      const narrow = await run([
        ...deno("--allow-net", "--allow-read", "--allow-write"),
        CLI,
        ...args,
      ]);
      assert.equal(narrow.code, 1, narrow.stderr);
      assert.match(
        narrow.stderr,
        /^portpicker: Cannot read \/proc\/\d+\/stat: [^\n]*--allow-all[^\n]*\n$/,
      );
      const picked = await run([...deno("-A"), CLI, ...args]);
      assert.equal(picked.stdout, `${port}\n`, picked.stderr);
      const claim = join(dir.path, `${port}.claim`);
      assert.ok(existsSync(claim));
      const back = [
        "return",
        String(port),
        "--lock-dir",
        dir.path,
        "--pid",
        String(process.pid),
      ];
      const denied = await run([...deno("--allow-read"), CLI, ...back]);
      assert.equal(denied.code, 1, denied.stderr);
      assert.match(
        denied.stderr,
        new RegExp(
          `^portpicker return: Cannot remove ${claim}: [^\\n]*--allow-write[^\\n]*\\n$`,
        ),
      );
      assert.ok(existsSync(claim));
      const returned = await run([
        ...deno("--allow-read", "--allow-write"),
        CLI,
        ...back,
      ]);
      assert.equal(returned.code, 0, returned.stderr);
      assert.ok(!existsSync(claim));
    } finally {
      dir.remove();
    }
  });

  test("Deno: ip_local_reserved_ports is honoured with -A, in a private network namespace", async () => {
    const [first] = await freeRange(4);
    const last = first + 3;
    const script = `echo ${first}-${
      last - 1
    } > /proc/sys/net/ipv4/ip_local_reserved_ports && exec "$@"`;
    const command = [...deno("-A"), CLI, "--range", `${first}-${last}`];
    const result = await run([
      "unshare",
      "-n",
      "sh",
      "-c",
      script,
      "sh",
      ...command,
    ]);
    assert.equal(result.stdout, `${last}\n`, result.stderr);
  });

  test("Deno: wait without --allow-net names the permission, at once", async () => {
    const result = await run(
      [...deno(), CLI, "wait", "80", "--timeout", "600"],
      { timeoutMs: 60_000 },
    );
    assert.equal(result.code, 1, result.stderr);
    assert.match(
      result.stderr,
      /^portpicker wait: Cannot wait for port 80 [^\n]*--allow-net[^\n]*\n$/,
    );
  });

  test("Deno: status without --allow-env names the permission, not a missing server", async () => {
    const result = await run([...deno("--allow-net"), CLI, "status"], {
      env: { PORTSERVER_ADDRESS: "@x" },
    });
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, /--allow-env/);
  });

  test("Deno: reusePort with --allow-net --unstable-net hands the port over with no window", async () => {
    const dir = tempDir();
    try {
      const path = join(dir.path, "reuse.ts");
      writeFileSync(
        path,
        `
import { reservePort } from ${JSON.stringify(join(ROOT, "mod.ts"))};
const reservation = await reservePort({ reusePort: true });
const listener = Deno.listen({ port: reservation.port, reusePort: true });
await reservation.release();
console.log(listener.addr.port === reservation.port ? "handed over" : "lost");
listener.close();
`,
      );
      const result = await run([
        ...deno("--allow-net", "--unstable-net"),
        path,
      ]);
      assert.equal(result.stdout, "handed over\n", result.stderr);
      const stable = await run([...deno("--allow-net"), path]);
      assert.equal(stable.code, 1);
      assert.match(stable.stderr, /--unstable-net/);
    } finally {
      dir.remove();
    }
  });

  test("Deno: picking with only --allow-net prints nothing of ours on stderr", async () => {
    const result = await run([...deno("--allow-net"), CLI], {
      env: { PORTSERVER_ADDRESS: "" },
    });
    assert.match(result.stdout, /^\d+\n$/);
    assert.equal(result.stderr, "");
  });
}
