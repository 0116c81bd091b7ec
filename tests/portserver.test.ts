/**
 * The port server (`cli.ts serve`), run as a real process on the runtime
 * running the test, talked to over real Unix sockets.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import {
  existsSync,
  lstatSync,
  readdirSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { connect, type Socket } from "node:net";
import { join } from "node:path";
import { getPortFromPortServer } from "../mod.ts";
import {
  holdWithPython,
  type Proc,
  PYTHON,
  run,
  runtimeCommand,
  start,
  tempDir,
  uniqueName,
} from "./helpers.ts";
import {
  ADDRESS_KINDS,
  alive,
  askPort,
  drain,
  exchange,
  freshAddress,
  loggedStats,
  poolSpec,
  randomPool,
  signalAndWait,
  sleeper,
  socketPath,
  startServer,
  startTimeOf,
  statsOnSigusr1,
  statsWhen,
  withServer,
} from "./server_helpers.ts";

/** A live process: this test's own. */
const PID = process.pid;

/** Numbers in increasing order. */
function sorted(ports: number[]): number[] {
  return [...ports].sort((a, b) => a - b);
}

function inPool(port: number, range: readonly [number, number]): boolean {
  return port >= range[0] && port <= range[1];
}

/** Stops every process given, SIGKILL, ignoring the ones already gone. */
async function killAll(...procs: (Proc | undefined)[]): Promise<void> {
  await Promise.all(procs.map((p) => p?.stop("SIGKILL")));
}

/** Asserts a good answer: a port of `range`. */
async function assertServes(
  address: string,
  range: readonly [number, number],
  what: string,
): Promise<number> {
  const port = await askPort(address, PID);
  assert.ok(port !== undefined, `${what}: no port for a live pid`);
  assert.ok(inPool(port, range), `${what}: port ${port} not in ${range}`);
  return port;
}

// ---------------------------------------------------------------------------
// The wire protocol.

test("wire: `pid\\n` and `pid` without a newline each get exactly `port\\n`, then EOF", async () => {
  await withServer(
    { size: 10, name: "ps-wire" },
    async ({ range, address }) => {
      const seen = new Set<number>();
      for (
        const [what, payload, end] of [
          ["pid and newline", `${PID}\n`, false],
          ["pid, no newline, connection left open", String(PID), false],
          ["pid, no newline, then half-closed", String(PID), true],
        ] as const
      ) {
        const reply = await exchange(address, payload, { end });
        const text = reply.bytes.toString("latin1");
        assert.match(text, /^\d+\n$/, `${what}: ${JSON.stringify(text)}`);
        assert.equal(reply.error, undefined, `${what}: ${reply.error}`);
        const port = Number(text.trim());
        assert.ok(inPool(port, range), `${what}: ${port} not in ${range}`);
        assert.ok(!seen.has(port), `${what}: ${port} handed out twice`);
        seen.add(port);
      }
    },
  );
});

for (const kind of ADDRESS_KINDS) {
  test(
    `getPortFromPortServer (mod.ts) gets distinct pool ports from our server on a${
      kind === "abstract name" ? "n" : ""
    } ${kind}`,
    async () => {
      const range = await randomPool(10);
      const { address, remove } = freshAddress(kind, "ps-lib");
      const server = await startServer([
        "--pool",
        poolSpec(range),
        "--address",
        address,
      ]);
      try {
        const ports: number[] = [];
        for (let i = 0; i < 4; i++) {
          const port = await getPortFromPortServer(address);
          assert.ok(port !== undefined, "no port");
          ports.push(port);
        }
        assert.ok(
          ports.every((p) => inPool(p, range)),
          `${ports} not in ${range}`,
        );
        assert.equal(new Set(ports).size, 4, `not distinct: ${ports}`);
      } finally {
        await server.stop();
        remove();
      }
    },
  );
}

// ---------------------------------------------------------------------------
// Many clients at once.

/**
 * A child that waits for "go", asks for 50 ports for its own pid, binds each
 * on TCP and UDP (dual-stack, no SO_REUSEADDR) and keeps them all bound,
 * prints the replies and the bind failures as JSON, then waits for EOF.
 */
const HOLDER_SCRIPT = `
import json, os, re, socket, sys
address = sys.argv[1]
path = "\\0" + address[1:] if address.startswith("@") else address
sys.stdin.readline()
replies = []
for _ in range(50):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"%d\\n" % os.getpid())
    buf = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        buf += chunk
    s.close()
    replies.append(buf.decode("latin1"))
held, failures = [], []
for reply in replies:
    if not re.fullmatch(r"\\d+\\n", reply):
        failures.append("reply %r" % reply)
        continue
    for typ in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, typ)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            s.bind(("", int(reply)))
            if typ == socket.SOCK_STREAM:
                s.listen(1)
            held.append(s)
        except OSError as e:
            failures.append("%s %s: %s" % (reply.strip(), typ.name, e))
print(json.dumps({"pid": os.getpid(), "replies": replies, "failures": failures}), flush=True)
sys.stdin.read()
`;

test("32 processes x 50 requests at once: 1600 distinct pool ports, each binds on TCP and UDP in its live holder", async () => {
  const range = await randomPool(1800);
  const address = uniqueName("ps-many");
  const server = await startServer([
    "--pool",
    poolSpec(range),
    "--address",
    address,
  ]);
  const holders: Proc[] = [];
  try {
    for (let i = 0; i < 32; i++) {
      holders.push(start([PYTHON, "-c", HOLDER_SCRIPT, address]));
    }
    for (const h of holders) h.child.stdin!.write("go\n");
    await Promise.all(holders.map((h) => h.waitFor(/^\{.*\}\n/, 60_000)));
    const all: number[] = [];
    for (const h of holders) {
      assert.ok(alive(h), "a holder died while holding its ports");
      const report = JSON.parse(h.stdout()) as {
        pid: number;
        replies: string[];
        failures: string[];
      };
      assert.deepEqual(report.failures, [], `holder ${report.pid}`);
      assert.equal(report.replies.length, 50);
      for (const reply of report.replies) all.push(Number(reply.trim()));
    }
    assert.equal(all.length, 1600);
    assert.equal(
      new Set(all).size,
      1600,
      "a port was handed to two live processes",
    );
    const outside = all.filter((p) => !inPool(p, range));
    assert.deepEqual(outside, [], `ports outside ${range}`);
    const stats = await statsOnSigusr1(server);
    assert.equal(stats["total-allocations"], 1600);
    assert.equal(stats["num-ports-allocated"], 1600);
    assert.equal(stats["denied-allocations"], 0);
  } finally {
    await killAll(server, ...holders);
  }
});

// ---------------------------------------------------------------------------
// Owners that die, and pid reuse.

test("a holder killed with SIGKILL gets its ports taken back; while it lives, they are refused to others", async () => {
  const range = await randomPool(3);
  const address = uniqueName("ps-kill");
  const server = await startServer([
    "--pool",
    poolSpec(range),
    "--address",
    address,
  ]);
  const holder = sleeper();
  try {
    const held = await drain(address, holder.child.pid!);
    assert.deepEqual(sorted(held), [range[0], range[0] + 1, range[1]]);
    const refused = await exchange(address, `${PID}\n`);
    assert.equal(
      refused.bytes.length,
      0,
      "a port of a live holder was handed out again",
    );
    assert.ok(alive(holder));
    await holder.stop("SIGKILL");
    const back = await drain(address, PID);
    assert.deepEqual(sorted(back), sorted(held));
  } finally {
    await killAll(server, holder);
  }
});

test("pid reuse (simulated by a --state entry for a live pid with a wrong start time): that port is free; an entry with the true start time stays held", async () => {
  const range = await randomPool(2);
  const address = uniqueName("ps-reuse");
  const dir = tempDir();
  const holder = sleeper();
  let server: Proc | undefined;
  try {
    const holderPid = holder.child.pid!;
    const state = join(dir.path, "state.json");
    writeFileSync(
      state,
      JSON.stringify({
        version: 1,
        allocations: [
          // This process lives, but "started" at another time: its pid was reused.
          [range[0], PID, startTimeOf(PID) + 7],
          // The holder lives and started then: still the owner.
          [range[1], holderPid, startTimeOf(holderPid)],
        ],
      }),
    );
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--state",
      state,
    ]);
    assert.deepEqual(await drain(address, PID), [range[0]]);
    await holder.stop("SIGKILL");
    assert.equal(await askPort(address, PID), range[1]);
  } finally {
    await killAll(server, holder);
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// Bad requests.

test("each bad request is closed with nothing written, and a good request right after is served", async () => {
  await withServer(
    { size: 40, name: "ps-bad" },
    async ({ range, address, server }) => {
      const garbage = new Uint8Array(120);
      crypto.getRandomValues(garbage);
      garbage[5] = 0;
      garbage[60] = 10;
      garbage[61] = 0xff;
      const cases: [string, string | Uint8Array, boolean][] = [
        ["empty, closed at once by the client", "", true],
        ["a bare newline", "\n", false],
        ["99Z", "99Z\n", false],
        ["two numbers", "99 8\n", false],
        ["a 35-digit number", `${"9".repeat(35)}\n`, false],
        ["a live pid padded past 20 bytes", `${" ".repeat(20)}${PID}\n`, false],
        ["120 bytes of binary garbage", garbage, false],
        ["pid 0", "0\n", false],
        ["pid -5", "-5\n", false],
        ["pid 1 (init)", "1\n", false],
        ["a pid with no process", "2147483646\n", false],
        ["a pid with no process, no newline", "2147483646", false],
      ];
      const seen = new Set<number>();
      for (const [what, payload, end] of cases) {
        const reply = await exchange(address, payload, { end });
        assert.equal(
          reply.bytes.length,
          0,
          `${what}: the server wrote ${
            JSON.stringify(reply.bytes.toString("latin1"))
          }`,
        );
        const port = await assertServes(address, range, `after ${what}`);
        assert.ok(!seen.has(port), `${port} handed out twice`);
        seen.add(port);
      }
      assert.ok(alive(server));
      const stats = await statsOnSigusr1(server);
      assert.equal(
        stats["total-allocations"],
        cases.length,
        "a bad request got a port",
      );
    },
  );
});

test("a client that sends nothing is dropped after --timeout; others are served meanwhile", async () => {
  // 5 s: room for the good requests to be served first on a loaded machine.
  await withServer(
    { size: 10, name: "ps-silent", args: ["--timeout", "5"] },
    async ({ range, address, server }) => {
      let served = false;
      const droppedAfterServed: boolean[] = [];
      const silent = Array.from(
        { length: 5 },
        () =>
          exchange(address, "", { timeoutMs: 30_000 }).then((reply) => {
            droppedAfterServed.push(served);
            return reply;
          }),
      );
      for (let i = 0; i < 3; i++) {
        await assertServes(address, range, `good request ${i}`);
      }
      served = true;
      for (const reply of await Promise.all(silent)) {
        assert.equal(reply.bytes.length, 0);
      }
      assert.deepEqual(
        droppedAfterServed,
        [true, true, true, true, true],
        "the silent clients were dropped before the good ones were served",
      );
      assert.ok(alive(server));
      await assertServes(address, range, "afterwards");
    },
  );
});

test("a slow sender (a byte every 300 ms) neither blocks others nor gets a port from a partial request", async () => {
  await withServer(
    { size: 10, name: "ps-slow" },
    async ({ range, address, server }) => {
      // The first byte alone is no pid: as the Python server, ours answers the first chunk.
      const slow = exchange(address, {
        delayMs: 300,
        pieces: [..." 2147483646\n"],
      }, {
        timeoutMs: 8000,
      });
      await server.waitFor(/Could not parse request: invalid pid " "/);
      for (let i = 0; i < 3; i++) {
        await assertServes(address, range, `good request ${i}`);
      }
      const reply = await slow;
      assert.equal(
        reply.bytes.length,
        0,
        `wrote ${reply.bytes.toString("latin1")}`,
      );
      assert.ok(alive(server));
      await assertServes(address, range, "afterwards");
    },
  );
});

test("clients that vanish mid-request (`12` then gone; `pid\\n` then gone before the reply) do not hurt the server", async () => {
  await withServer(
    { size: 10, name: "ps-vanish" },
    async ({ range, address, server }) => {
      for (const payload of ["12", `${PID}\n`, "12", `${PID}\n`]) {
        await new Promise<void>((resolve) => {
          const socket = connect({ path: socketPath(address) }, () => {
            // Gone once the request is sent, before any reply.
            socket.end(payload, () => socket.destroy());
          });
          socket.on("error", () => {});
          socket.on("close", () => resolve());
        });
        await assertServes(
          address,
          range,
          `after ${JSON.stringify(payload)} and gone`,
        );
      }
      // Each was answered (a port, or a denial for pid 12) and written to
      // a closed connection: 4 of them and the 4 good requests.
      await statsWhen(
        server,
        (s) => s["total-allocations"] + s["denied-allocations"] === 8,
      );
      assert.ok(alive(server));
      await assertServes(address, range, "afterwards");
    },
  );
});

/** Opens one connection, retrying while the listen backlog is full. */
function floodClient(
  address: string,
  payload: string,
): Promise<{ bytes: string; error?: string }> {
  return new Promise((resolve) => {
    const attempt = (tries: number) => {
      let connected = false;
      let bytes = "";
      let error: string | undefined;
      const socket = connect({ path: socketPath(address) }, () => {
        connected = true;
        if (payload) socket.write(payload);
      });
      socket.on("data", (chunk: Buffer) => bytes += chunk.toString("latin1"));
      socket.on(
        "error",
        (e: Error & { code?: string }) => error = e.code ?? e.message,
      );
      socket.on("close", () => {
        if (
          !connected && tries < 200 && /EAGAIN|ECONNREFUSED/.test(error ?? "")
        ) {
          setTimeout(() => attempt(tries + 1), 20 + Math.random() * 30);
        } else {
          resolve({ bytes, error: connected ? undefined : error });
        }
      });
    };
    attempt(0);
  });
}

test("2000 connections at once (1000 silent, 1000 good requests): every good one gets a distinct port, the server survives and answers", async () => {
  await withServer(
    { size: 1200, name: "ps-flood" },
    async ({ range, address, server }) => {
      const results = await Promise.all(
        Array.from(
          { length: 2000 },
          (_, i) => floodClient(address, i % 2 ? `${PID}\n` : ""),
        ),
      );
      const failed = results.filter((r) => r.error);
      assert.deepEqual(
        failed.slice(0, 5),
        [],
        `${failed.length} connections never opened`,
      );
      const silent = results.filter((_, i) => i % 2 === 0);
      assert.ok(
        silent.every((r) => r.bytes === ""),
        "a silent client got bytes",
      );
      const ports = results.filter((_, i) => i % 2 === 1).map((r) => r.bytes);
      const bad = ports.filter((r) => !/^\d+\n$/.test(r));
      assert.deepEqual(
        bad.slice(0, 5),
        [],
        `${bad.length} good requests got no port`,
      );
      const numbers = ports.map(Number);
      assert.equal(new Set(numbers).size, 1000, "a port was handed out twice");
      assert.ok(numbers.every((p) => inPool(p, range)));
      assert.ok(alive(server));
      await assertServes(address, range, "after the flood");
    },
  );
});

// ---------------------------------------------------------------------------
// Restarts and the state file.

test("SIGKILLed and restarted with the same --state, the server never hands out a live holder's ports", async () => {
  const range = await randomPool(6);
  const address = uniqueName("ps-state");
  const dir = tempDir();
  const state = join(dir.path, "state.json");
  const args = [
    "--pool",
    poolSpec(range),
    "--address",
    address,
    "--state",
    state,
  ];
  const holder = sleeper();
  let server: Proc | undefined;
  try {
    server = await startServer(args);
    const held: number[] = [];
    for (let i = 0; i < 3; i++) {
      const port = await askPort(address, holder.child.pid!);
      assert.ok(port !== undefined);
      held.push(port);
    }
    await server.stop("SIGKILL");
    server = await startServer(args);
    const others = await drain(address, PID);
    assert.equal(others.length, 3, `got ${others}`);
    for (const port of others) {
      assert.ok(
        !held.includes(port),
        `${port} of the live holder handed out again`,
      );
      assert.ok(inPool(port, range));
    }
    // Once the holder is gone, its ports come back.
    await holder.stop("SIGKILL");
    assert.deepEqual(sorted(await drain(address, PID)), sorted(held));
  } finally {
    await killAll(server, holder);
    dir.remove();
  }
});

test("a corrupt --state file is moved aside with a warning, and the server starts and serves", async () => {
  const range = await randomPool(5);
  const address = uniqueName("ps-corrupt");
  const dir = tempDir();
  const state = join(dir.path, "state.json");
  writeFileSync(state, "{ this is not json");
  let server: Proc | undefined;
  try {
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--state",
      state,
    ]);
    assert.match(server.stderr(), /corrupt/i);
    const aside = readdirSync(dir.path).filter((f) =>
      f.startsWith("state.json.corrupt-")
    );
    assert.equal(aside.length, 1, `files: ${readdirSync(dir.path)}`);
    await assertServes(address, range, "after a corrupt state");
  } finally {
    await killAll(server);
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// Signals and statistics.

test("SIGUSR1 logs statistics that match the requests; SIGINT stops it cleanly with the same statistics", async () => {
  const base = (await randomPool(10))[0];
  // Two ranges: 5 + 3 ports.
  const spec = `${base}-${base + 4},${base + 7}-${base + 9}`;
  const address = uniqueName("ps-stats");
  const server = await startServer(["--pool", spec, "--address", address]);
  try {
    for (let i = 0; i < 3; i++) assert.ok(await askPort(address, PID));
    for (const bad of ["99Z\n", "\n"]) {
      assert.equal((await exchange(address, bad)).bytes.length, 0);
    }
    for (const denied of ["0\n", "1\n", "2147483646\n", "-5\n"]) {
      assert.equal((await exchange(address, denied)).bytes.length, 0);
    }
    const stats = await statsOnSigusr1(server);
    assert.equal(stats["client-request-errors"], 2);
    assert.equal(stats["denied-allocations"], 4);
    assert.equal(stats["total-allocations"], 3);
    assert.equal(stats["num-ports-managed"], 8);
    assert.equal(stats["num-ports-allocated"], 3);
    assert.ok(alive(server), "SIGUSR1 stopped the server");
    assert.deepEqual(await signalAndWait(server, "SIGINT"), {
      code: 0,
      signal: null,
    });
    assert.match(server.stderr(), /Goodbye\./);
    const last = loggedStats(server).at(-1)!;
    assert.deepEqual(last, stats);
  } finally {
    await killAll(server);
  }
});

test("SIGTERM and SIGINT stop it cleanly (exit 0, statistics, Goodbye.) and remove the socket file", async () => {
  const range = await randomPool(4);
  const dir = tempDir();
  try {
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      const path = join(dir.path, `${signal}.sock`);
      const server = await startServer([
        "--pool",
        poolSpec(range),
        "--address",
        path,
      ]);
      try {
        assert.ok(lstatSync(path).isSocket());
        await assertServes(path, range, signal);
        const end = await signalAndWait(server, signal);
        assert.deepEqual(end, { code: 0, signal: null }, server.stderr());
        assert.match(server.stderr(), /total-allocations 1\n/);
        assert.match(server.stderr(), /Goodbye\.\n$/);
        assert.ok(
          !existsSync(path),
          `${signal}: the socket file is still there`,
        );
      } finally {
        await killAll(server);
      }
    }
  } finally {
    dir.remove();
  }
});

/** A client connection kept open until destroyed; resolves once `ready` shows. */
function openClient(
  address: string,
  request: string,
  ready: RegExp,
): Promise<Socket> {
  return new Promise((resolve, reject) => {
    let got = "";
    const socket = connect({ path: socketPath(address) }, () => {
      if (request) socket.write(request);
      else resolve(socket);
    });
    socket.on("data", (chunk: Buffer) => {
      got += chunk.toString("latin1");
      if (ready.test(got)) resolve(socket);
    });
    socket.on("error", reject);
  });
}

/**
 * Starts a server, connects a client that sends `request` (nothing when
 * empty) and waits for `ready`, then asserts that SIGTERM stops the server
 * cleanly while that client is still connected: the server would keep a
 * silent client for a minute (--timeout 60), and a lease for ever.
 */
async function assertSigtermStopsWithClient(
  name: string,
  request: string,
  ready: RegExp,
): Promise<void> {
  const range = await randomPool(4);
  const address = uniqueName(name);
  const server = await startServer([
    "--pool",
    poolSpec(range),
    "--address",
    address,
    "--timeout",
    "60",
  ]);
  let client: Socket | undefined;
  try {
    client = await openClient(address, request, ready);
    const closed = new Promise((resolve) => client!.once("close", resolve));
    const end = await signalAndWait(server, "SIGTERM", 15_000).catch((
      e: Error,
    ) => e);
    assert.ok(!(end instanceof Error), `${end}; stderr: ${server.stderr()}`);
    assert.deepEqual(end, { code: 0, signal: null }, server.stderr());
    await closed;
  } finally {
    client?.destroy();
    await killAll(server);
  }
}

test("SIGTERM with a silent client connected stops it, not after the request timeout", async () => {
  await assertSigtermStopsWithClient("ps-stop-idle", "", /never/);
});

test("SIGTERM with a LEASE connection open stops it instead of waiting for the lease holder", async () => {
  await assertSigtermStopsWithClient(
    "ps-stop-lease",
    "LEASE count=1\n",
    /^OK \d+\n$/,
  );
});

test("a --state file that cannot be written (missing directory) makes the server exit 1 at start, not fail every request", async () => {
  const range = await randomPool(3);
  const address = uniqueName("ps-nostate");
  const dir = tempDir();
  const state = join(dir.path, "missing", "state.json");
  try {
    // Killed after 4 s if it serves instead of exiting.
    const result = await run([
      ...runtimeCommand("cli.ts"),
      "serve",
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--state",
      state,
    ], { timeoutMs: 4000 });
    assert.equal(
      result.code,
      1,
      `exit ${result.code} ${result.signal}: it served with a --state it cannot write; stderr: ${result.stderr}`,
    );
    assert.match(result.stderr, /^[^\n]*state[^\n]*\n$/i, result.stderr);
  } finally {
    dir.remove();
  }
});

test("pool ports in use by another process (TCP only, UDP only) are skipped; the rest are handed out round-robin", async () => {
  const range = await randomPool(5);
  const address = uniqueName("ps-inuse");
  const tcp = await holdWithPython("tcp4", range[0] + 1);
  const udp = await holdWithPython("udp6only", range[0] + 3);
  let server: Proc | undefined;
  const holder = sleeper();
  try {
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
    ]);
    // Round-robin: the holder's port, once it dies, comes back last.
    assert.equal(await askPort(address, holder.child.pid!), range[0]);
    await holder.stop("SIGKILL");
    const ports = await drain(address, PID);
    assert.deepEqual(ports, [range[0] + 2, range[0] + 4, range[0]]);
    assert.match(
      server.stderr(),
      new RegExp(`${range[0] + 1} unexpectedly in use`),
    );
    assert.match(
      server.stderr(),
      new RegExp(`${range[0] + 3} unexpectedly in use`),
    );
  } finally {
    await killAll(server, holder);
    await tcp.release();
    await udp.release();
  }
});

// ---------------------------------------------------------------------------
// Addresses and the command line.

test("a stale socket file left by a SIGKILLed server is replaced on restart", async () => {
  const range = await randomPool(4);
  const dir = tempDir();
  const path = join(dir.path, "ps.sock");
  let server: Proc | undefined;
  try {
    server = await startServer(["--pool", poolSpec(range), "--address", path]);
    await server.stop("SIGKILL");
    assert.ok(
      lstatSync(path).isSocket(),
      "the SIGKILLed server left no socket file",
    );
    server = await startServer(["--pool", poolSpec(range), "--address", path]);
    await assertServes(path, range, "after the restart");
  } finally {
    await killAll(server);
    dir.remove();
  }
});

for (const kind of ADDRESS_KINDS) {
  test(`a second server on a live server's ${kind} exits 1 with one line; the first keeps serving`, async () => {
    const range = await randomPool(4);
    const other = await randomPool(4);
    const { address, remove } = freshAddress(kind, "ps-twice");
    const first = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
    ]);
    try {
      const second = await run([
        ...runtimeCommand("cli.ts"),
        "serve",
        "--pool",
        poolSpec(other),
        "--address",
        address,
      ], { timeoutMs: 20_000 });
      assert.equal(second.code, 1, `exit ${second.code}; ${second.stderr}`);
      assert.equal(
        second.stderr,
        `portpicker serve: Another port server is already serving on ${address}\n`,
      );
      assert.ok(alive(first));
      await assertServes(address, range, "the first server");
    } finally {
      await killAll(first);
      remove();
    }
  });
}

test("a regular file at the address is left alone: exit 1 with one line", async () => {
  const range = await randomPool(4);
  const dir = tempDir();
  try {
    const path = join(dir.path, "not-a-socket");
    writeFileSync(path, "keep me");
    const result = await run([
      ...runtimeCommand("cli.ts"),
      "serve",
      "--pool",
      poolSpec(range),
      "--address",
      path,
    ]);
    assert.equal(result.code, 1, result.stderr);
    assert.match(result.stderr, /^[^\n]*not a socket[^\n]*\n$/, result.stderr);
    assert.equal(readFileSync(path, "utf8"), "keep me");
  } finally {
    dir.remove();
  }
});

test("an empty pool (--pool 0-0, --pool abc) exits 1; a usage error exits 2 with one line and no stack trace", async () => {
  const address = uniqueName("ps-args");
  for (const pool of ["0-0", "abc"]) {
    const result = await run([
      ...runtimeCommand("cli.ts"),
      "serve",
      "--pool",
      pool,
      "--address",
      address,
    ], { timeoutMs: 10_000 });
    assert.equal(
      result.code,
      1,
      `--pool ${pool}: exit ${result.code}; ${result.stderr}`,
    );
    assert.match(result.stderr, /No ports/, `--pool ${pool}`);
    assert.doesNotMatch(result.stderr, /Serving on|^\s+at /m, `--pool ${pool}`);
  }
  for (
    const args of [["--bogus"], ["--pool"], ["--address", address, "extra"]]
  ) {
    // A server that serves instead is killed after 10 s.
    const result = await run([...runtimeCommand("cli.ts"), "serve", ...args], {
      timeoutMs: 10_000,
    });
    const what = JSON.stringify(args);
    assert.equal(
      result.code,
      2,
      `${what}: exit ${result.code}; ${result.stderr}`,
    );
    assert.match(
      result.stderr,
      /^portpicker serve: [^\n]+\n$/,
      `${what}: ${result.stderr}`,
    );
    assert.equal(result.stdout, "", what);
  }
});

test("the Python flag names work: --portserver_static_pool, --portserver_address, --portserver_unix_socket_address", async () => {
  const range = await randomPool(4);
  const dir = tempDir();
  try {
    const pool = poolSpec(range);
    const cases: [address: string, args: string[]][] = [
      [uniqueName("ps-py"), [
        "--portserver_static_pool",
        pool,
        "--portserver_address",
      ]],
      [join(dir.path, "a.sock"), [
        `--portserver_static_pool=${pool}`,
        "--portserver_address",
      ]],
      [join(dir.path, "b.sock"), [
        "--portserver_static_pool",
        pool,
        "--portserver_unix_socket_address",
      ]],
      [uniqueName("ps-py"), [
        `--portserver_static_pool=${pool}`,
        "--portserver_unix_socket_address",
      ]],
    ];
    for (const [address, flags] of cases) {
      // The address flag last, as --flag=value (Python's form).
      const args = [...flags.slice(0, -1), `${flags.at(-1)}=${address}`];
      const server = await startServer(args);
      try {
        assert.ok(
          server.stderr().includes(`Serving on ${address}\n`),
          server.stderr(),
        );
        await assertServes(address, range, args.join(" "));
      } finally {
        await killAll(server);
      }
    }
  } finally {
    dir.remove();
  }
});
