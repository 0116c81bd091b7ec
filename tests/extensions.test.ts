/**
 * The features beyond the Python original, on real processes and sockets:
 * lock directories, reserved ports, this project's extended protocol (raw,
 * through the library and through the CLI), the fallbacks on Debian's Python
 * server. The README's `nc` examples run in readme.test.ts.
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
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import {
  getPortServerStatus,
  isPortFree,
  leasePorts,
  NoFreePortFoundError,
  pickUnusedPort,
  pickUnusedPorts,
  type PortServerStatus,
  processStartTime,
  returnPort,
  returnPortsToServer,
} from "../mod.ts";
import {
  askPort,
  exchange,
  poolSpec,
  randomPool,
  socketPath,
  startServer,
  withServer,
} from "./server_helpers.ts";
import {
  assertOneLineError,
  assertSubcommandError,
  cliCommandAllowing,
  exitCodeOf,
  killHolder,
  MOD_URL,
  privateNetwork,
  type Proc,
  run,
  runCli,
  runCliAllowing,
  RUNTIME,
  runtimeCommand,
  scriptCommand,
  scriptCommandAllowing,
  sleep,
  start,
  startPythonPortserver,
  tempDir,
  tool,
  uniqueName,
} from "./helpers.ts";

const PID = process.pid;

/**
 * For the tests that start Deno, Bun and Node processes themselves: whichever
 * runtime runs the test, they test the same thing, so they run once, from
 * Deno's suite.
 */
const ONCE = {
  skip: RUNTIME === "deno"
    ? false
    : "drives Deno, Bun and Node itself: run once, from Deno's suite",
};
const ISO_TIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

// The permissions a user gives Deno (Bun and Node have none to give). A lock
// directory needs -A: a claim names its owner's start time, from
// /proc/<pid>/stat, which Deno 2 reads only with -A. So does the server,
// which reads the start times of the processes it serves.
/** Picking, and talking to a port server named by --portserver. */
const NET = ["--allow-net"];
/** The same with PORTSERVER_ADDRESS read from the environment. */
const NET_ENV = ["--allow-net", "--allow-env"];

// ---------------------------------------------------------------------------
// Helpers of this file.

function assertInPool(ports: number[], pool: readonly [number, number]): void {
  for (const port of ports) {
    assert.ok(
      Number.isInteger(port) && port >= pool[0] && port <= pool[1],
      `${port} is not in the pool ${poolSpec(pool)}`,
    );
  }
}

function assertDistinct(ports: number[], count: number): void {
  assert.equal(ports.length, count, `${ports}`);
  assert.equal(new Set(ports).size, count, `not distinct: ${ports}`);
}

/**
 * Sends `request` on a new connection, half-closes, and returns everything
 * the server wrote until it closed the connection.
 */
function ask(
  address: string,
  request: string | Uint8Array,
  timeoutMs = 5_000,
): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const socket = connect({ path: socketPath(address) }, () => {
      socket.end(request);
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no close within ${timeoutMs} ms after ${request}`));
    }, timeoutMs);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", () => {});
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString("utf8"));
    });
  });
}

/**
 * Sends `request` without closing, and resolves with the first line the
 * server wrote and the still open socket (a lease).
 */
function openLease(
  address: string,
  request: string,
): Promise<{ line: string; socket: Socket }> {
  return new Promise((resolve, reject) => {
    let text = "";
    const socket = connect({ path: socketPath(address) }, () => {
      socket.write(request);
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no reply line to ${request}`));
    }, 5_000);
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      text += chunk.toString("utf8");
      if (text.includes("\n")) {
        clearTimeout(timer);
        resolve({ line: text, socket });
      }
    });
    socket.on("close", () => {
      clearTimeout(timer);
      reject(new Error(`closed before a line: ${JSON.stringify(text)}`));
    });
  });
}

/** STATUS, raw: the server's one line of JSON. */
async function rawStatus(address: string): Promise<PortServerStatus> {
  const reply = await ask(address, "STATUS\n");
  assert.match(reply, /^\{[^\n]*\}\n$/, `STATUS reply ${reply}`);
  return JSON.parse(reply) as PortServerStatus;
}

/** The server's allocations by port. */
async function held(
  address: string,
): Promise<Map<number, PortServerStatus["allocations"][number]>> {
  const status = await getPortServerStatus(address);
  return new Map(status.allocations.map((a) => [a.port, a]));
}

/** Polls `check` until it holds; fails after `timeoutMs`. Returns the ms it took. */
async function eventually(
  what: string,
  check: () => Promise<boolean> | boolean,
  timeoutMs = 2_000,
): Promise<number> {
  const began = Date.now();
  while (!(await check())) {
    if (Date.now() - began > timeoutMs) {
      assert.fail(`${what}: not within ${timeoutMs} ms`);
    }
    await sleep(20);
  }
  return Date.now() - began;
}

/** Whether none of `ports` is held on the server any more. */
async function noneHeld(address: string, ports: number[]): Promise<boolean> {
  const now = await held(address);
  return ports.every((port) => !now.has(port));
}

/** The numbers of an `OK p1 p2 …` reply, checking its shape. */
function okPorts(reply: string, count: number): number[] {
  assert.match(reply, new RegExp(`^OK(?: \\d+){${count}}\\n$`), reply);
  return reply.trim().split(" ").slice(1).map(Number);
}

/** Claim files (`<port>.claim`) in a lock directory, by port. */
function claimFiles(dir: string): Map<number, string> {
  const out = new Map<number, string>();
  for (const name of readdirSync(dir)) {
    const match = /^(\d+)\.claim$/.exec(name);
    if (match) out.set(Number(match[1]), readFileSync(join(dir, name), "utf8"));
  }
  return out;
}

/**
 * How a child script runs on one of the three runtimes; Deno with -A, which
 * lock directories need there (see {@linkcode NET}).
 */
function commandOn(runtime: "deno" | "bun" | "node", path: string): string[] {
  return runtime === "deno"
    ? [tool("deno"), "run", "-A", "--no-config", "--unstable-net", path]
    : [tool(runtime), path];
}

function countMatches(text: string, pattern: RegExp): number {
  return [...text.matchAll(pattern)].length;
}

// ---------------------------------------------------------------------------
// 1. Lock directories.

const LOCK_CHILD = `
import process from "node:process";
import { existsSync } from "node:fs";
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
const range = JSON.parse(process.env.TEST_RANGE);
const lockDir = process.env.TEST_LOCK_OPTION;
const ports = [];
for (let i = 0; i < 100; i++) {
  ports.push(await pickUnusedPort(lockDir ? { range, lockDir } : { range }));
}
console.log(JSON.stringify(ports));
// Stay alive, holding the claims, until every child has picked.
while (!existsSync(process.env.TEST_GO)) {
  await new Promise((resolve) => setTimeout(resolve, 20));
}
`;

test(
  "lock directory: 16 processes on Deno, Bun and Node pick 100 ports each at once, all 1600 distinct; a normal exit removes the claims",
  ONCE,
  async () => {
    const range = await randomPool(2400);
    const tmp = tempDir();
    const lockDir = join(tmp.path, "locks");
    const go = join(tmp.path, "go");
    const script = join(tmp.path, "child.mts");
    writeFileSync(script, LOCK_CHILD);
    const runtimes = ["deno", "bun", "node"] as const;
    const children: Proc[] = [];
    try {
      for (let i = 0; i < 16; i++) {
        const byOption = i % 2 === 0;
        children.push(start(commandOn(runtimes[i % 3], script), {
          PORTSERVER_ADDRESS: undefined,
          PORTPICKER_LOCK_DIR: byOption ? undefined : lockDir,
          TEST_LOCK_OPTION: byOption ? lockDir : undefined,
          TEST_RANGE: JSON.stringify(range),
          TEST_GO: go,
        }));
      }
      await Promise.all(children.map((c) => c.waitFor(/^\[.*\]\n/, 60_000)));
      const owner = new Map<number, number>();
      for (const child of children) {
        const ports = JSON.parse(child.stdout()) as number[];
        assertDistinct(ports, 100);
        assertInPool(ports, range);
        for (const port of ports) {
          assert.ok(
            !owner.has(port),
            `port ${port} given to pids ${
              owner.get(port)
            } and ${child.child.pid}`,
          );
          owner.set(port, child.child.pid!);
        }
      }
      assert.equal(owner.size, 1600);
      // Every port is claimed, by the process that got it, while it lives.
      const claims = claimFiles(lockDir);
      assert.equal(claims.size, 1600);
      for (const [port, pid] of owner) {
        assert.equal(
          claims.get(port),
          `${pid} ${processStartTime(pid)}\n`,
          `claim of ${port}`,
        );
      }
      writeFileSync(go, "");
      for (const child of children) {
        assert.equal(await exitCodeOf(child, 30_000), 0, child.stderr());
      }
      assert.deepEqual(readdirSync(lockDir), [], "left in the lock directory");
    } finally {
      writeFileSync(go, "");
      await Promise.all(children.map((c) => c.stop("SIGKILL")));
      tmp.remove();
    }
  },
);

test("lock directory: a claim of a dead owner is reclaimed, and returnPort removes the claim", async () => {
  const [port] = await randomPool(1);
  const dir = tempDir();
  try {
    const claim = join(dir.path, `${port}.claim`);
    writeFileSync(claim, "999999 5\n");
    assert.equal(
      await pickUnusedPort({ range: [port, port], lockDir: dir.path }),
      port,
    );
    assert.equal(
      readFileSync(claim, "utf8"),
      `${PID} ${processStartTime(PID)}\n`,
    );
    returnPort(port);
    assert.equal(existsSync(claim), false, "returnPort left the claim");
    // Returned, the port may be picked (and claimed) again.
    assert.equal(
      await pickUnusedPort({ range: [port, port], lockDir: dir.path }),
      port,
    );
    assert.equal(existsSync(claim), true);
    returnPort(port);
    assert.equal(existsSync(claim), false);
  } finally {
    dir.remove();
  }
});

test("lock directory: a claim of a live process (pid 1, this process) or an unreadable one makes the port unavailable", async () => {
  const dir = tempDir();
  try {
    const [first] = await randomPool(3);
    const contents = [
      `1 ${processStartTime(1)}\n`,
      `${PID} ${processStartTime(PID)}\n`,
      "not a claim",
    ];
    for (const [i, content] of contents.entries()) {
      const port = first + i;
      const claim = join(dir.path, `${port}.claim`);
      writeFileSync(claim, content);
      await assert.rejects(
        pickUnusedPort({ range: [port, port], lockDir: dir.path }),
        (error) => {
          assert.ok(error instanceof NoFreePortFoundError, `${error}`);
          assert.equal(error.tried, 1);
          return true;
        },
      );
      assert.equal(readFileSync(claim, "utf8"), content);
      // Without the lock directory, the port is free.
      assert.equal(await isPortFree(port), true);
    }
  } finally {
    dir.remove();
  }
});

/** Picks, holds for a millisecond, checks its claim file, returns; repeats. */
const CONTENDER = `
import process from "node:process";
import { existsSync, readFileSync } from "node:fs";
import {
  NoFreePortFoundError,
  pickUnusedPort,
  processStartTime,
  returnPort,
} from ${JSON.stringify(MOD_URL)};
const env = process.env;
const range = JSON.parse(env.TEST_RANGE);
const mine = \`\${process.pid} \${processStartTime(process.pid)}\\n\`;
const read = (path) => {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "(no claim file)";
  }
};
console.log("ready");
while (!existsSync(env.TEST_GO)) await new Promise((r) => setTimeout(r, 2));
const deadline = Date.now() + Number(env.TEST_MS);
let picks = 0;
while (Date.now() < deadline && !existsSync(env.TEST_STOP)) {
  let port;
  try {
    port = await pickUnusedPort({ range, lockDir: env.TEST_DIR });
  } catch (error) {
    if (!(error instanceof NoFreePortFoundError)) throw error;
    await new Promise((r) => setImmediate(r));
    continue;
  }
  picks++;
  await new Promise((r) => setTimeout(r, 1));
  // This process is alive and has not returned the port: the claim is its own.
  const claim = read(\`\${env.TEST_DIR}/\${port}.claim\`);
  if (claim !== mine) console.log(\`LOST \${port} \${JSON.stringify(claim)}\`);
  returnPort(port);
}
console.log(\`picks \${picks}\`);
`;

/** Dead owners' claims keep appearing, as when workers crash: made exclusively. */
const CRASHED_OWNERS = `
import process from "node:process";
import { existsSync, linkSync, writeFileSync } from "node:fs";
const env = process.env;
const [first, last] = JSON.parse(env.TEST_RANGE);
const source = \`\${env.TEST_DIR}/../dead-claim\`;
writeFileSync(source, "999999 5\\n");
console.log("ready");
while (!existsSync(env.TEST_GO)) await new Promise((r) => setTimeout(r, 2));
const deadline = Date.now() + Number(env.TEST_MS);
let made = 0;
while (Date.now() < deadline && !existsSync(env.TEST_STOP)) {
  for (let port = first; port <= last; port++) {
    try {
      linkSync(source, \`\${env.TEST_DIR}/\${port}.claim\`);
      made++;
    } catch { /* claimed */ }
  }
  await new Promise((r) => setImmediate(r));
}
console.log(\`made \${made}\`);
`;

test(
  "lock directory: taking over dead owners' claims never takes a live claim away (4 processes contend for 3 ports)",
  ONCE,
  async () => {
    const range = await randomPool(3);
    const tmp = tempDir();
    const lockDir = join(tmp.path, "locks");
    mkdirSync(lockDir);
    const go = join(tmp.path, "go");
    const stop = join(tmp.path, "stop");
    writeFileSync(join(tmp.path, "contender.mts"), CONTENDER);
    writeFileSync(join(tmp.path, "crashed.mts"), CRASHED_OWNERS);
    const env = {
      PORTSERVER_ADDRESS: undefined,
      PORTPICKER_LOCK_DIR: undefined,
      TEST_RANGE: JSON.stringify(range),
      TEST_DIR: lockDir,
      TEST_GO: go,
      TEST_STOP: stop,
      TEST_MS: "6000",
    };
    const crashed = start(
      commandOn("node", join(tmp.path, "crashed.mts")),
      env,
    );
    const contenders = (["deno", "bun", "node", "bun"] as const).map((rt) =>
      start(commandOn(rt, join(tmp.path, "contender.mts")), env)
    );
    const all = [crashed, ...contenders];
    try {
      await Promise.all(all.map((p) => p.waitFor(/^ready\n/, 30_000)));
      writeFileSync(go, "");
      // Stop at the first lost claim; else run to the end.
      const running = () => all.some((p) => p.child.exitCode === null);
      const ended = Date.now() + 30_000;
      while (running() && Date.now() < ended) {
        if (contenders.some((p) => p.stdout().includes("LOST"))) {
          writeFileSync(stop, "");
        }
        await sleep(50);
      }
      writeFileSync(stop, "");
      for (const p of all) {
        assert.equal(await exitCodeOf(p, 10_000), 0, p.stderr());
      }
      const made = Number(/made (\d+)/.exec(crashed.stdout())?.[1]);
      const picks = contenders.map((p) =>
        Number(/picks (\d+)/.exec(p.stdout())?.[1])
      );
      assert.ok(made > 0, `no dead owner's claim made: ${crashed.stdout()}`);
      const pids = new Map(contenders.map((p) => [p.child.pid!, p]));
      const lost = contenders.flatMap((p) =>
        [...p.stdout().matchAll(/^LOST (\d+) "(.*)"$/gm)].map((m) => {
          const thief = Number(/^(\d+) /.exec(m[2])?.[1]);
          return `pid ${p.child.pid} lost its live claim of port ${m[1]} to ${
            pids.has(thief)
              ? `live contender pid ${thief}`
              : `a dead owner's claim "${m[2]}"`
          }`;
        })
      );
      assert.deepEqual(
        lost,
        [],
        `${lost.length} live claims taken away in ${
          picks.reduce((a, b) => a + b)
        } picks: ${lost.slice(0, 5).join("; ")}`,
      );
      for (const n of picks) assert.ok(n >= 50, `too few picks: ${picks}`);
    } finally {
      writeFileSync(stop, "");
      await Promise.all(all.map((p) => p.stop("SIGKILL")));
      tmp.remove();
    }
  },
);

test("lock directory: CLI --lock-dir skips a port claimed by a live process; its own claim names its parent and stays until `return`", async () => {
  const [port] = await randomPool(1);
  const dir = tempDir();
  try {
    const claim = join(dir.path, `${port}.claim`);
    writeFileSync(claim, `1 ${processStartTime(1)}\n`);
    const args = ["--lock-dir", dir.path, "--range", `${port}-${port}`];
    // On Deno, -A: what a lock directory needs there.
    const refused = await runCli(args);
    assertOneLineError(refused, 1, "a claimed port");
    assert.ok(refused.stderr.includes(`${port}-${port}`), refused.stderr);
    writeFileSync(claim, "999999 5\n");
    const result = await runCli(args);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `${port}\n`);
    // The CLI's parent (this process) holds the claim after the CLI exits.
    assert.equal(
      readFileSync(claim, "utf8"),
      `${PID} ${processStartTime(PID)}\n`,
    );
    const returned = await runCli([
      "return",
      String(port),
      ...args.slice(0, 2),
    ]);
    assert.equal(returned.code, 0, returned.stderr);
    assert.deepEqual(readdirSync(dir.path), [], "claim left after return");
  } finally {
    dir.remove();
  }
});

test(
  "lock directory on Deno: without -A, the CLI says in one line that it needs --allow-all, exit 1, and claims nothing",
  { skip: RUNTIME === "deno" ? false : "about Deno's permissions" },
  async () => {
    const [port] = await randomPool(1);
    const dir = tempDir();
    try {
      const result = await runCliAllowing(
        ["--allow-net", "--allow-read", "--allow-write"],
        ["--lock-dir", dir.path, "--range", `${port}-${port}`],
      );
      assertOneLineError(result, 1, "--lock-dir without -A");
      assert.match(result.stderr, /--allow-all/);
      assert.deepEqual(readdirSync(dir.path), [], "a claim was left");
    } finally {
      dir.remove();
    }
  },
);

test("lock directory: hold_seconds still holds the port with PORTPICKER_LOCK_DIR set", async () => {
  const [port] = await randomPool(1);
  const dir = tempDir();
  try {
    const result = await runCli(
      ["--range", `${port}-${port}`, String(PID), "600"],
      { env: { PORTPICKER_LOCK_DIR: dir.path } },
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout, `${port}\n`);
    assert.equal(result.stderr, "");
    try {
      assert.equal(await isPortFree(port), false, "not held after the exit");
      assert.deepEqual(readdirSync(dir.path), [`${port}.claim`], "no claim");
    } finally {
      killHolder(port, 600);
    }
    await eventually(
      "the port free once its holder is gone",
      () => isPortFree(port),
      30_000,
    );
  } finally {
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// 2. Reserved ports and the ephemeral range.

/** Reserved in the private network namespace of the test below. */
const RESERVED = "20000-20002,20004,20006-20007";
/** Around them: 20003 and 20005 are the only ports left. */
const AROUND_RESERVED: [number, number] = [20000, 20007];

/** What the library does in that namespace, as one line of JSON. */
const RESERVED_CHILD = `
import {
  NoFreePortFoundError,
  pickUnusedPort,
  pickUnusedPorts,
  reservedPorts,
} from ${JSON.stringify(MOD_URL)};
const range = ${JSON.stringify(AROUND_RESERVED)};
const reserved = [...reservedPorts()].sort((a, b) => a - b);
// Preferred ports that are reserved are passed over, in the order given.
const preferred = await pickUnusedPort({
  ports: [20000, 20001, 20002, 20004, 20006, 20007, 20005],
  range,
});
const rest = await pickUnusedPorts(1, { range });
let after;
try {
  after = await pickUnusedPort({ range });
} catch (error) {
  after = error instanceof NoFreePortFoundError ? "none" : String(error);
}
console.log(JSON.stringify({ reserved, preferred, rest, after }));
`;

test(
  `reserved ports: with ip_local_reserved_ports ${RESERVED} (in a private network namespace), reservedPorts() lists them, and the library, the CLI and the server hand out only 20003 and 20005 of ${
    poolSpec(AROUND_RESERVED)
  }`,
  async () => {
    const ns = await privateNetwork(RESERVED);
    const dir = tempDir();
    // No claims: the user's lock directory is the host's, and the other
    // runtimes' suites use the same ports in namespaces of their own.
    const env = {
      PORTSERVER_ADDRESS: undefined,
      PORTPICKER_LOCK_DIR: "",
    };
    let server: Proc | undefined;
    try {
      // The namespace's file, not the host's, was written.
      assert.notEqual(
        readFileSync("/proc/sys/net/ipv4/ip_local_reserved_ports", "utf8")
          .trim(),
        RESERVED,
      );
      const script = join(dir.path, "reserved.mts");
      writeFileSync(script, RESERVED_CHILD);
      // Deno 2 reads /proc (ip_local_reserved_ports) only with -A: without
      // it, reservedPorts() is empty there.
      const library = await run([...ns.enter, ...scriptCommand(script)], {
        env,
      });
      assert.equal(library.code, 0, library.stderr);
      assert.deepEqual(JSON.parse(library.stdout), {
        reserved: [20000, 20001, 20002, 20004, 20006, 20007],
        preferred: 20005,
        rest: [20003],
        after: "none",
      });

      const spec = poolSpec(AROUND_RESERVED);
      const cli = [...ns.enter, ...runtimeCommand("cli.ts")];
      const picked = await run([...cli, "--range", spec, "-n", "2"], { env });
      assert.equal(picked.code, 0, picked.stderr);
      assert.deepEqual(
        picked.stdout.trim().split("\n").map(Number).sort(),
        [20003, 20005],
      );
      const three = await run([...cli, "--range", spec, "-n", "3"], { env });
      assertOneLineError(three, 1, "3 ports of 2 unreserved");
      assert.match(three.stderr, /asked for 3, found 2/);

      const address = uniqueName("ext-reserved");
      server = start(
        [...cli, "serve", "--pool", spec, "--address", address],
        env,
      );
      await server.waitFor(/Serving on/, 30_000);
      const client = [...ns.enter, ...cliCommandAllowing(["--allow-net"])];
      const status = async () => {
        const result = await run(
          [...client, "status", "--json", "--portserver", address],
          { env },
        );
        assert.equal(result.code, 0, result.stderr);
        return JSON.parse(result.stdout) as PortServerStatus;
      };
      assert.equal((await status()).pool, 2, "reserved ports in the pool");
      const taken = await run(
        [...client, "-n", "2", "--portserver", address],
        { env },
      );
      assert.equal(taken.code, 0, taken.stderr);
      assert.deepEqual(
        taken.stdout.trim().split("\n").map(Number).sort(),
        [20003, 20005],
      );
      const after = await status();
      assert.equal(after.allocated, 2);
      assert.deepEqual(after.allocations.map((a) => a.port), [20003, 20005]);
    } finally {
      await server?.stop();
      await ns.close();
      dir.remove();
    }
  },
);

test("the server warns at start when its pool overlaps ip_local_port_range, and not otherwise", async () => {
  const [low, high] = readFileSync(
    "/proc/sys/net/ipv4/ip_local_port_range",
    "utf8",
  ).trim().split(/\s+/).map(Number);
  assert.ok(high - low >= 10, `ephemeral range ${low}-${high}`);
  const first = low + Math.floor(Math.random() * (high - low - 9));
  const inside: [number, number] = [first, first + 9];
  const outside = await randomPool(10);
  assert.ok(outside[1] < low || outside[0] > high);
  const warned = await startServer([
    "--pool",
    poolSpec(inside),
    "--address",
    uniqueName("ext-eph"),
  ]);
  const quiet = await startServer([
    "--pool",
    poolSpec(outside),
    "--address",
    uniqueName("ext-noeph"),
  ]);
  try {
    const lines = warned.stderr().split("\n").filter((l) => l.startsWith("W"));
    assert.equal(lines.length, 1, warned.stderr());
    assert.match(
      lines[0],
      new RegExp(
        `^W.* portserver\\] 10 ports of the pool lie in the kernel's ephemeral range ${low}-${high}\\b`,
      ),
    );
    assert.doesNotMatch(quiet.stderr(), /ephemeral range/);
  } finally {
    await warned.stop();
    await quiet.stop();
  }
});

// ---------------------------------------------------------------------------
// 3. The extended protocol, raw.

test("protocol: TAKE count=3 label=x, STATUS, RETURN, and TAKE again gets the returned port", async () => {
  await withServer(
    { size: 4, name: "ext-take" },
    async ({ range: pool, address }) => {
      const before = Date.now();
      const taken = okPorts(
        await ask(address, `TAKE pid=${PID} count=3 label=x\n`),
        3,
      );
      assertDistinct(taken, 3);
      assertInPool(taken, pool);
      // All or none: 1 port left, 2 asked for.
      assert.match(
        await ask(address, `TAKE pid=${PID} count=2\n`),
        /^ERR [^\n]+\n$/,
      );
      const status = await rawStatus(address);
      assert.equal(status.address, address);
      assert.equal(status.pool, 4);
      assert.equal(status.allocated, 3);
      assert.deepEqual(
        status.allocations.map((a) => a.port),
        [...taken].sort(),
      );
      for (const a of status.allocations) {
        assert.equal(a.pid, PID);
        assert.equal(a.label, "x");
        assert.equal(a.lease, false);
        assert.match(a.since, ISO_TIME);
        const since = Date.parse(a.since);
        assert.ok(
          since >= before - 1000 && since <= Date.now() + 1000,
          a.since,
        );
      }
      assert.equal(
        await ask(address, `RETURN pid=${PID} ports=${taken[0]}\n`),
        `OK ${taken[0]}\n`,
      );
      const after = await rawStatus(address);
      assert.deepEqual(
        after.allocations.map((a) => a.port),
        taken.slice(1).sort(),
      );
      // The last free port, then the returned one.
      const again = okPorts(await ask(address, `TAKE pid=${PID} count=2\n`), 2);
      assert.ok(again.includes(taken[0]), `${again} lacks ${taken[0]}`);
      assert.deepEqual(
        [...again, ...taken.slice(1)].sort(),
        [pool[0], pool[0] + 1, pool[0] + 2, pool[1]],
      );
    },
  );
});

test("protocol: RETURN of a port held by another pid is refused with ERR not held by pid", async () => {
  const pool = await randomPool(3);
  const address = uniqueName("ext-ret");
  const server = await startServer([
    "--pool",
    poolSpec(pool),
    "--address",
    address,
  ]);
  const other = start(["sleep", "600"]);
  try {
    const otherPid = other.child.pid!;
    const [port] = okPorts(await ask(address, `TAKE pid=${otherPid}\n`), 1);
    assert.equal(
      await ask(address, `RETURN pid=${PID} ports=${port}\n`),
      `ERR not held by pid ${PID}: ${port}\n`,
    );
    assert.equal((await held(address)).get(port)?.pid, otherPid);
    assert.equal(
      await ask(address, `RETURN pid=${otherPid} ports=${port}\n`),
      `OK ${port}\n`,
    );
    assert.equal((await held(address)).has(port), false);
  } finally {
    await other.stop("SIGKILL");
    await server.stop();
  }
});

test("protocol: LEASE count=2 holds its ports while the connection is open, past the server's request timeout, and frees them right after the client closes it", async () => {
  await withServer(
    { size: 5, name: "ext-lease", args: ["--timeout", "0.2"] },
    async ({ range: pool, address, server }) => {
      const { line, socket } = await openLease(
        address,
        "LEASE count=2 label=l\n",
      );
      const ports = okPorts(line, 2);
      let leaseClosed = false;
      socket.on("close", () => leaseClosed = true);
      try {
        assertDistinct(ports, 2);
        assertInPool(ports, pool);
        // A client connected after the lease, that sends nothing, is
        // dropped once the timeout is up: by then the lease is older.
        const idle = await exchange(address, "");
        assert.equal(idle.bytes.length, 0);
        const now = await held(address);
        assert.equal(leaseClosed, false, "the server closed the lease");
        for (const port of ports) {
          assert.deepEqual(
            { ...now.get(port), since: "" },
            {
              port,
              pid: null,
              lease: true,
              alive: true,
              since: "",
              label: "l",
            },
          );
          assert.match(now.get(port)!.since, ISO_TIME);
        }
      } finally {
        socket.end();
      }
      await server.waitFor(/Lease of ports \d+, \d+ ended\./);
      assert.ok(await noneHeld(address, ports), "lease not freed");
    },
  );
});

test("protocol: a lease of a client process killed with SIGKILL is freed", async () => {
  const pool = await randomPool(5);
  const address = uniqueName("ext-lease-kill");
  const server = await startServer([
    "--pool",
    poolSpec(pool),
    "--address",
    address,
  ]);
  const dir = tempDir();
  let client: Proc | undefined;
  try {
    const script = join(dir.path, "lease.mts");
    writeFileSync(
      script,
      `import { leasePorts } from ${JSON.stringify(MOD_URL)};
const lease = await leasePorts(2, { portserverAddress: ${
        JSON.stringify(address)
      }, label: "killed" });
console.log(lease.ports.join(" "));
setInterval(() => {}, 1000);
`,
    );
    client = start(scriptCommandAllowing(NET, script), {
      PORTSERVER_ADDRESS: undefined,
    });
    // Printed once the server's OK came: the lease is held from then on.
    await client.waitFor(/^\d+ \d+\n/, 30_000);
    const ports = client.stdout().trim().split(" ").map(Number);
    assertInPool(ports, pool);
    const now = await held(address);
    for (const port of ports) {
      assert.equal(now.get(port)?.lease, true, `${port} not leased`);
      assert.equal(now.get(port)?.pid, null);
      assert.equal(now.get(port)?.label, "killed");
    }
    await client.stop("SIGKILL");
    await eventually("killed lease freed", () => noneHeld(address, ports));
  } finally {
    await client?.stop("SIGKILL");
    await server.stop();
    dir.remove();
  }
});

test("protocol: each bad extended request gets one ERR line and the server goes on serving; a classic request still gets exactly digits and a newline", async () => {
  await withServer(
    { size: 3, name: "ext-bad" },
    async ({ address, server }) => {
      const bad = [
        `TAKE pid=${PID} count=0\n`,
        `TAKE pid=${PID} count=1001\n`,
        `TAKE pid=${PID} label=${"a".repeat(101)}\n`,
        `TAKE count=1\n`,
        `TAKE pid=${PID} label=caf\u00e9\n`,
        `TAKE pid=${PID} colour=red\n`,
        `TAKE pid=1\n`,
        `TAKE pid=999999999\n`,
        `LEASE count=abc\n`,
        `RETURN pid=${PID}\n`,
        `STATUS now\n`,
      ];
      for (const request of bad) {
        const reply = await ask(address, request);
        assert.match(
          reply,
          /^ERR [^\n]+\n$/,
          `${JSON.stringify(request)}: ${reply}`,
        );
        assert.match(await ask(address, `${PID}\n`), /^\d+\n$/);
        const freed = Number((await rawStatus(address)).allocations[0].port);
        assert.equal(
          await ask(address, `RETURN pid=${PID} ports=${freed}\n`),
          `OK ${freed}\n`,
        );
      }
      // A word that is not a verb is a bad classic request: closed, nothing written.
      assert.equal(await ask(address, "FROB pid=1\n"), "");
      // A label of 100 characters is fine.
      okPorts(
        await ask(address, `TAKE pid=${PID} label=${"b".repeat(100)}\n`),
        1,
      );
      assert.match(await ask(address, `${PID}\n`), /^\d+\n$/);
      assert.equal(server.child.exitCode, null);
    },
  );
});

// ---------------------------------------------------------------------------
// 4. The library on our server.

test("library: pickUnusedPort with a label, pickUnusedPorts(5) in one TAKE, getPortServerStatus", async () => {
  await withServer(
    { size: 20, name: "ext-lib", args: ["--verbose"] },
    async ({ range: pool, address, server }) => {
      const port = await pickUnusedPort({
        portserverAddress: address,
        label: "api-1",
      });
      assertInPool([port], pool);
      const status = await getPortServerStatus(address);
      assert.deepEqual(Object.keys(status).sort(), [
        "address",
        "allocated",
        "allocations",
        "pool",
        "reclaimable",
      ]);
      assert.equal(status.address, address);
      assert.equal(status.pool, 20);
      assert.equal(status.allocated, 1);
      assert.equal(status.allocations.length, 1);
      const [a] = status.allocations;
      assert.deepEqual({ ...a, since: "" }, {
        port,
        pid: PID,
        lease: false,
        alive: true,
        since: "",
        label: "api-1",
      });
      assert.match(a.since, ISO_TIME);

      const ports = await pickUnusedPorts(5, { portserverAddress: address });
      assertDistinct(ports, 5);
      assertInPool(ports, pool);
      assert.ok(!ports.includes(port));
      await server.waitFor(/Allocated ports (\d+, ){4}\d+ to pid/, 5_000);
      const log = server.stderr();
      assert.equal(countMatches(log, /Request TAKE /g), 2, log);
      assert.equal(
        countMatches(
          log,
          new RegExp(`Request TAKE pid=${PID} count=5\\.`, "g"),
        ),
        1,
        log,
      );
      assert.equal(countMatches(log, /Request on behalf of pid/g), 2, log);
      const now = await held(address);
      for (const p of ports) {
        assert.equal(now.get(p)?.pid, PID);
        assert.equal(now.get(p)?.label, null);
      }
    },
  );
});

test("library: returnPort of a server port frees it on the server and does not keep it in the free set", async () => {
  await withServer(
    { size: 10, name: "ext-libret", args: ["--verbose"] },
    async ({ range: pool, address, server }) => {
      const port = await pickUnusedPort({ portserverAddress: address });
      assertInPool([port], pool);
      assert.equal((await held(address)).get(port)?.pid, PID);
      returnPort(port);
      await eventually(
        "the server frees the returned port",
        () => noneHeld(address, [port]),
      );
      await server.waitFor(
        new RegExp(`Pid ${PID} returned ports ${port}\\.`),
        2_000,
      );
      const next = await pickUnusedPort({ portserverAddress: address });
      assert.notEqual(
        next,
        port,
        "the returned port was handed out again locally",
      );
      assert.equal(
        (await held(address)).get(next)?.pid,
        PID,
        "not from the server",
      );
      await server.waitFor(new RegExp(`Allocated ports ${next} to pid`), 2_000);
      assert.equal(countMatches(server.stderr(), /Request TAKE /g), 2);
    },
  );
});

test("library: leasePorts(2) with a label, release(), and await using", async () => {
  await withServer(
    { size: 6, name: "ext-liblease" },
    async ({ range: pool, address }) => {
      const lease = await leasePorts(2, {
        portserverAddress: address,
        label: "e2e",
      });
      assertDistinct([...lease.ports], 2);
      assertInPool([...lease.ports], pool);
      let now = await held(address);
      for (const port of lease.ports) {
        assert.equal(now.get(port)?.lease, true);
        assert.equal(now.get(port)?.pid, null);
        assert.equal(now.get(port)?.label, "e2e");
      }
      await lease.release();
      await eventually(
        "released lease freed",
        () => noneHeld(address, [...lease.ports]),
      );

      let ports: number[] = [];
      {
        await using scoped = await leasePorts(1, {
          portserverAddress: address,
        });
        ports = [...scoped.ports];
        assertInPool(ports, pool);
        now = await held(address);
        assert.equal(now.get(ports[0])?.lease, true);
        assert.equal(now.get(ports[0])?.label, null);
      }
      await eventually(
        "await using lease freed",
        () => noneHeld(address, ports),
      );
      await assert.rejects(
        leasePorts(7, { portserverAddress: address }),
        /refused the lease/,
      );
    },
  );
});

test("library: returnPortsToServer frees a held port and throws for a port not held", async () => {
  await withServer(
    { size: 4, name: "ext-libretsrv" },
    async ({ range: pool, address }) => {
      const [a, b] = okPorts(
        await ask(address, `TAKE pid=${PID} count=2\n`),
        2,
      );
      assert.deepEqual(await returnPortsToServer(address, [a]), [a]);
      assert.equal((await held(address)).has(a), false);
      const free = [pool[0], pool[0] + 1, pool[0] + 2, pool[1]].find((p) =>
        p !== a && p !== b
      )!;
      await assert.rejects(
        returnPortsToServer(address, [free]),
        (error: Error) => {
          assert.ok(error instanceof Error);
          assert.match(
            error.message,
            new RegExp(`not held by pid ${PID}: ${free}`),
          );
          return true;
        },
      );
      await assert.rejects(
        returnPortsToServer(address, [b], { pid: PID + 1 }),
        /not held by pid/,
      );
      assert.equal((await held(address)).get(b)?.pid, PID);
    },
  );
});

// ---------------------------------------------------------------------------
// 5. Debian's Python server.

test("Python server: a labelled pickUnusedPort falls back to the classic request once; pickUnusedPorts(3) gets 3 ports", async () => {
  const pool = await randomPool(8);
  const address = uniqueName("ext-py");
  const server = await startPythonPortserver(address, poolSpec(pool));
  try {
    const port = await pickUnusedPort({
      portserverAddress: address,
      label: "web",
    });
    assertInPool([port], pool);
    await server.waitFor(/Request on behalf of pid/);
    const log = server.stderr();
    assert.equal(countMatches(log, /Could not parse request/g), 1, log);
    assert.ok(
      log.indexOf("Could not parse request") <
        log.indexOf(`Request on behalf of pid ${PID}`),
      log,
    );
    const ports = await pickUnusedPorts(3, { portserverAddress: address });
    assertDistinct(ports, 3);
    assertInPool(ports, pool);
    assert.ok(!ports.includes(port));
    await eventually(
      "four classic requests logged",
      () => countMatches(server.stderr(), /Request on behalf of pid/g) === 4,
    );
    assert.equal(countMatches(server.stderr(), /Could not parse request/g), 1);
  } finally {
    await server.stop();
  }
});

test("Python server: returnPort keeps the classic behaviour (the port goes to the free set)", async () => {
  const pool = await randomPool(4);
  const address = uniqueName("ext-py-ret");
  const server = await startPythonPortserver(address, poolSpec(pool));
  try {
    const port = await pickUnusedPort({ portserverAddress: address });
    assertInPool([port], pool);
    returnPort(port);
    assert.equal(await pickUnusedPort(), port);
    // Nothing more was asked of the server: no RETURN, no second request.
    // A request of another pid, sent now, comes after anything this process
    // sent before: once it is logged, so is all that came before it.
    const marker = server.child.pid!;
    assert.match(String(await askPort(address, marker)), /^\d+$/);
    await server.waitFor(new RegExp(`Request on behalf of pid ${marker}\\b`));
    const log = server.stderr();
    assert.equal(countMatches(log, /Could not parse request/g), 1, log);
    assert.equal(countMatches(log, /Request on behalf of pid/g), 2, log);
    assert.equal(
      countMatches(log, new RegExp(`Request on behalf of pid ${PID}\\b`, "g")),
      1,
      log,
    );
  } finally {
    await server.stop();
  }
});

test("Python server: leasePorts, getPortServerStatus and returnPortsToServer throw naming the Python portserver; CLI status exits 1 with one line", async () => {
  const pool = await randomPool(4);
  const address = uniqueName("ext-py-status");
  const server = await startPythonPortserver(address, poolSpec(pool));
  try {
    await assert.rejects(
      leasePorts(1, { portserverAddress: address }),
      (error) => {
        assert.ok(error instanceof Error);
        assert.match(error.message, /Python portserver/);
        return true;
      },
    );
    await assert.rejects(getPortServerStatus(address), (error) => {
      assert.ok(error instanceof Error);
      assert.match(error.message, /Python portserver/);
      return true;
    });
    await assert.rejects(
      returnPortsToServer(address, [pool[0]]),
      /Python portserver/,
    );
    const result = await runCliAllowing(NET, [
      "status",
      "--portserver",
      address,
    ]);
    assertSubcommandError(result, 1, "status", "status on the Python server");
    assert.match(result.stderr, /Python portserver/);
    // The Python server still serves, the CLI too (the label is lost there).
    const port = await pickUnusedPort({ portserverAddress: address });
    assertInPool([port], pool);
    const cli = await runCliAllowing(NET_ENV, ["-n", "2", "--label", "web"], {
      env: { PORTSERVER_ADDRESS: address },
    });
    assert.equal(cli.code, 0, cli.stderr);
    assert.equal(cli.stderr, "");
    const ports = cli.stdout.trim().split("\n").map(Number);
    assertDistinct(ports, 2);
    assertInPool(ports, pool);
  } finally {
    await server.stop();
  }
});

// ---------------------------------------------------------------------------
// 6. The CLI on our server.

test("CLI: -n 3 --label web, status (table and --json), return", async () => {
  const pool = await randomPool(10);
  const address = uniqueName("ext-cli");
  const server = await startServer([
    "--pool",
    poolSpec(pool),
    "--address",
    address,
  ]);
  const env = { PORTSERVER_ADDRESS: address };
  try {
    const picked = await runCliAllowing(
      NET_ENV,
      ["-n", "3", "--label", "web"],
      { env },
    );
    assert.equal(picked.code, 0, picked.stderr);
    assert.match(picked.stdout, /^(\d+\n){3}$/);
    const ports = picked.stdout.trim().split("\n").map(Number);
    assertDistinct(ports, 3);
    assertInPool(ports, pool);

    const table = await runCliAllowing(NET_ENV, ["status"], { env });
    assert.equal(table.code, 0, table.stderr);
    const lines = table.stdout.trimEnd().split("\n");
    assert.equal(lines[0], `3 of 10 ports held on ${address}`);
    assert.match(lines[1], /^PORT\s+PID\s+SINCE\s+LABEL$/);
    assert.equal(lines.length, 5, table.stdout);
    const rows = lines.slice(2).map((line) => {
      const m = /^(\d+)\s+(\d+)\s+(\S+)\s+(\S+)$/.exec(line);
      assert.ok(m, `bad row ${JSON.stringify(line)}`);
      assert.equal(Number(m[2]), PID);
      assert.match(m[3], ISO_TIME);
      assert.equal(m[4], "web");
      return Number(m[1]);
    });
    assert.deepEqual(rows, [...ports].sort());

    const json = await runCliAllowing(NET_ENV, ["status", "--json"], { env });
    assert.equal(json.code, 0, json.stderr);
    assert.match(json.stdout, /^\{[^\n]*\}\n$/);
    const status = JSON.parse(json.stdout) as PortServerStatus;
    assert.equal(status.address, address);
    assert.equal(status.pool, 10);
    assert.equal(status.allocated, 3);
    for (const a of status.allocations) {
      assert.ok(ports.includes(a.port));
      assert.equal(a.pid, PID);
      assert.equal(a.label, "web");
      assert.equal(a.lease, false);
    }

    const returned = await runCliAllowing(
      NET_ENV,
      ["return", String(ports[0])],
      { env },
    );
    assert.equal(returned.code, 0, returned.stderr);
    assert.equal(returned.stdout, "");
    assert.equal((await held(address)).has(ports[0]), false);
    assert.equal((await held(address)).get(ports[1])?.pid, PID);

    // A lease shows as "lease" in the PID column.
    const lease = await leasePorts(1, { portserverAddress: address });
    try {
      const withLease = await runCliAllowing(NET_ENV, ["status"], { env });
      assert.equal(withLease.code, 0, withLease.stderr);
      assert.match(
        withLease.stdout,
        new RegExp(`^${lease.ports[0]}\\s+lease\\s+\\S+$`, "m"),
      );
      assert.match(withLease.stdout, /^3 of 10 ports held on /);
    } finally {
      await lease.release();
    }

    const again = await runCliAllowing(NET_ENV, ["return", String(ports[0])], {
      env,
    });
    assertSubcommandError(again, 1, "return", "return of a port not held");
    assert.match(again.stderr, /not held by pid/);
  } finally {
    await server.stop();
  }
});

test("status: ports of a holder that died are marked (alive false, reclaimable), in JSON and in the CLI's table", async () => {
  await withServer({ size: 5, name: "ext-dead" }, async ({ address }) => {
    const holder = start(["sleep", "600"]);
    const pid = holder.child.pid!;
    const reply = await ask(address, `TAKE pid=${pid} count=2 label=gone\n`);
    const ports = okPorts(reply, 2);
    await holder.stop("SIGKILL");
    const status = await getPortServerStatus(address);
    assert.equal(status.allocated, 2);
    assert.equal(status.reclaimable, 2);
    for (const a of status.allocations) {
      assert.deepEqual([a.pid, a.alive, a.label], [pid, false, "gone"]);
    }
    const table = await runCliAllowing(NET, [
      "status",
      "--portserver",
      address,
    ]);
    assert.equal(table.code, 0, table.stderr);
    const lines = table.stdout.trimEnd().split("\n");
    assert.equal(
      lines[0],
      `2 of 5 ports held on ${address}, 2 of them by holders that died (reclaimable)`,
    );
    for (const port of ports) {
      assert.match(
        table.stdout,
        new RegExp(
          `^${port}\\s+${pid}\\s+\\S+\\s+gone\\s+dead, reclaimable$`,
          "m",
        ),
      );
    }
  });
});

test("CLI: return with no port, status or return with no server, and bad --label are usage errors (exit 2, one line naming the command)", async () => {
  await withServer({ size: 2, name: "ext-cli-usage" }, async ({ address }) => {
    const server = { PORTSERVER_ADDRESS: address };
    // [arguments, environment, what the line says]
    const cases: [string[], Record<string, string | undefined>, RegExp][] = [
      [["return"], server, /needs at least one PORT/],
      [["status"], {}, /PORTSERVER_ADDRESS/],
      [["return", "20000"], {}, /PORTSERVER_ADDRESS/],
      [["--label", "a b"], server, /^portpicker: Invalid label "a b"/],
      [["--label", ""], server, /^portpicker: Invalid label ""/],
      [["--label", "x".repeat(101)], server, /^portpicker: Invalid label "x/],
      [["--label", "caf\u00e9"], server, /^portpicker: Invalid label "caf/],
    ];
    for (const [args, env, says] of cases) {
      const result = await runCliAllowing(NET_ENV, args, { env });
      const what = JSON.stringify(args);
      if (args[0].startsWith("-")) assertOneLineError(result, 2, what);
      else assertSubcommandError(result, 2, args[0], what);
      assert.match(result.stderr, says, what);
    }
    assert.equal((await getPortServerStatus(address)).allocated, 0);
  });
});
