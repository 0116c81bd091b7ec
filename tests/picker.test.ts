/**
 * The library on real sockets: what a picked port is, the per-process state,
 * reservations, argument checks, and the Python port server as a peer.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  addReservedPort,
  forgetPorts,
  getPortFromPortServer,
  isPortFree,
  NoFreePortFoundError,
  pickUnusedPort,
  pickUnusedPorts,
  reservePort,
  returnPort,
} from "../mod.ts";
import {
  bindAllFamiliesWithPython,
  canBindWithPython,
  freeRange,
  HOLD_KINDS,
  holdManyWithPython,
  holdWithPython,
  MOD_URL,
  portsOf,
  type Proc,
  run,
  runScript,
  scriptCommand,
  startPythonPortserver,
  tempDir,
  timeWaitWithPython,
  tool,
  uniqueName,
  waitUntil,
} from "./helpers.ts";

/** Binds `port` on TCP and UDP, IPv4 and IPv6-only, all at once; fails if any bind fails. */
async function bindAllFamilies(port: number): Promise<void> {
  const error = await bindAllFamiliesWithPython(port);
  assert.equal(error, null, `port ${port} does not bind everywhere: ${error}`);
}

/** Runs `body` and returns what it threw (failing when it does not throw). */
async function thrown(body: () => unknown): Promise<unknown> {
  try {
    await body();
  } catch (error) {
    return error;
  }
  assert.fail("expected an error");
}

/** Asserts `error` is a NoFreePortFoundError for `range` after `tried` ports. */
function assertNoFreePort(
  error: unknown,
  range: [number, number],
  tried: number,
): void {
  assert.ok(
    error instanceof NoFreePortFoundError,
    `not a NoFreePortFoundError: ${error}`,
  );
  assert.deepEqual([...error.range], range);
  assert.equal(error.tried, tried);
  assert.match(error.message, new RegExp(`\\b${range[0]}-${range[1]}\\b`));
  assert.match(error.message, new RegExp(`\\b${tried}\\b`));
}

test("a picked port binds on TCP and UDP, IPv4 and IPv6", async () => {
  for (let i = 0; i < 3; i++) {
    const port = await pickUnusedPort();
    assert.ok(
      Number.isInteger(port) && port >= 1 && port <= 65535,
      `bad port ${port}`,
    );
    await bindAllFamilies(port);
    returnPort(port);
  }
});

test("a port picked in a range binds on TCP and UDP, IPv4 and IPv6", async () => {
  const range = await freeRange(10);
  const port = await pickUnusedPort({ range });
  assert.ok(port >= range[0] && port <= range[1], `${port} outside ${range}`);
  await bindAllFamilies(port);
  returnPort(port);
});

test("1000 picks in one process are distinct", async () => {
  const ports: number[] = [];
  for (let i = 0; i < 1000; i++) ports.push(await pickUnusedPort());
  assert.equal(new Set(ports).size, 1000);
  for (const port of ports) returnPort(port);
});

test("a range with 15 of 20 ports held gives exactly the 5 free ones, then NoFreePortFoundError", async () => {
  const range = await freeRange(20);
  const all = portsOf(range);
  const shuffled = [...all].sort(() => Math.random() - 0.5);
  const held = shuffled.slice(0, 15);
  const free = new Set(shuffled.slice(15));
  const holder = await holdManyWithPython(held);
  const picked: number[] = [];
  try {
    for (let i = 0; i < 5; i++) picked.push(await pickUnusedPort({ range }));
    assert.deepEqual(new Set(picked), free);
    const error = await thrown(() => pickUnusedPort({ range }));
    assertNoFreePort(error, range, 15);
  } finally {
    await holder.release();
    for (const port of picked) returnPort(port);
  }
});

for (const kind of HOLD_KINDS) {
  test(`isPortFree is false while a ${kind} socket holds the port, true after`, async () => {
    const holder = await holdWithPython(kind);
    let released = false;
    try {
      assert.equal(await isPortFree(holder.port), false);
      await holder.release();
      released = true;
      assert.equal(await isPortFree(holder.port), true);
    } finally {
      if (!released) await holder.release();
    }
  });
}

test("a port whose only socket is a connection in TIME_WAIT is free, and picked when preferred, as for Python (SO_REUSEADDR)", async () => {
  const port = await timeWaitWithPython();
  assert.equal(await isPortFree(port), true);
  assert.equal(await pickUnusedPort({ ports: [port] }), port);
  returnPort(port);
});

test("the picker skips a port held by a socket of any kind, and gives the one left free", async () => {
  const range = await freeRange(HOLD_KINDS.length + 1);
  const ports = portsOf(range);
  const free = ports[Math.floor(Math.random() * ports.length)];
  const held = ports.filter((port) => port !== free);
  const holders = await Promise.all(
    HOLD_KINDS.map((kind, i) => holdWithPython(kind, held[i])),
  );
  const picked: number[] = [];
  try {
    for (const holder of holders) {
      assert.equal(await isPortFree(holder.port), false, `${holder.port}`);
    }
    // Preferred but held: skipped for the free one.
    picked.push(await pickUnusedPort({ ports: held, range }));
    assert.deepEqual(picked, [free]);
    assertNoFreePort(
      await thrown(() => pickUnusedPort({ range })),
      range,
      held.length,
    );
  } finally {
    await Promise.all(holders.map((holder) => holder.release()));
    for (const port of picked) returnPort(port);
  }
});

/** The ports of every TCP and UDP socket of this host, in any state. */
function portsOfListedSockets(): Set<number> {
  const ports = new Set<number>();
  for (const file of ["tcp", "tcp6", "udp", "udp6"]) {
    let text = "";
    try {
      text = readFileSync(`/proc/net/${file}`, "utf8");
    } catch { /* no IPv6, say */ }
    for (const line of text.split("\n").slice(1)) {
      const local = line.trim().split(/\s+/)[1];
      if (local) ports.add(parseInt(local.split(":")[1], 16));
    }
  }
  return ports;
}

/** Below it, only a process with CAP_NET_BIND_SERVICE may bind a port. */
const UNPRIVILEGED_PORT_START = Number(
  readFileSync("/proc/sys/net/ipv4/ip_unprivileged_port_start", "utf8"),
);

test(
  "a port below ip_unprivileged_port_start is not free for a process that may not bind it, and never picked",
  {
    skip: UNPRIVILEGED_PORT_START <= 1
      ? "every port is unprivileged on this host"
      : false,
  },
  async () => {
    const listed = portsOfListedSockets();
    const candidates = portsOf([
      Math.max(1, UNPRIVILEGED_PORT_START - 50),
      UNPRIVILEGED_PORT_START - 1,
    ]).filter((port) => !listed.has(port));
    const root = process.getuid?.() === 0;
    // As root: a port this process can bind, so that only the privilege
    // makes the difference in the child.
    let privileged: number | undefined;
    for (const port of candidates) {
      if (!root || await isPortFree(port)) {
        privileged = port;
        break;
      }
    }
    assert.ok(privileged !== undefined, "no unused privileged port");
    const [unprivileged] = await freeRange(1);
    const result = await runScript(
      `
import { isPortFree, pickUnusedPort } from ${JSON.stringify(MOD_URL)};
const out = [await isPortFree(${privileged}), await isPortFree(${unprivileged})];
try {
  out.push(await pickUnusedPort({ range: [${privileged}, ${privileged}] }));
} catch (error) {
  out.push(error.message);
}
out.push(await pickUnusedPort({ ports: [${privileged}] }));
console.log(JSON.stringify(out));
`,
      {
        // Root keeps its uid (and its files) but loses the capability.
        command: (path) =>
          root
            ? [
              "setpriv",
              "--bounding-set=-net_bind_service",
              "--inh-caps=-net_bind_service",
              ...scriptCommand(path),
            ]
            : scriptCommand(path),
      },
    );
    assert.equal(result.code, 0, result.stderr);
    const [free, control, ranged, preferred] = JSON.parse(result.stdout);
    assert.equal(free, false, `port ${privileged} was free`);
    assert.equal(control, true, `port ${unprivileged} was not free`);
    assert.equal(
      ranged,
      `No free port found in ${privileged}-${privileged}: tried 1 of 1 ports`,
    );
    assert.ok(
      Number.isInteger(preferred) && preferred >= UNPRIVILEGED_PORT_START,
      `picked ${preferred}`,
    );
  },
);

test("checking, picking and reserving ports leaves no TCP or UDP socket open", async () => {
  const holder = await holdWithPython("dual");
  const timeWait = await timeWaitWithPython();
  const [free] = await freeRange(1);
  try {
    const result = await runScript(
      `
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import {
  isPortFree,
  pickUnusedPort,
  pickUnusedPorts,
  reservePort,
  returnPort,
} from ${JSON.stringify(MOD_URL)};
/** This process's open TCP and UDP sockets (the runtime has others). */
function inetSockets() {
  const inodes = new Set();
  for (const file of ["tcp", "tcp6", "udp", "udp6"]) {
    let text = "";
    try {
      text = readFileSync("/proc/net/" + file, "utf8");
    } catch { /* no IPv6 */ }
    for (const line of text.split("\\n").slice(1)) {
      const inode = line.trim().split(/\\s+/)[9];
      if (inode) inodes.add(inode);
    }
  }
  let count = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      const inode = /^socket:\\[(\\d+)\\]$/.exec(readlinkSync("/proc/self/fd/" + fd));
      if (inode && inodes.has(inode[1])) count++;
    } catch { /* closed meanwhile: the directory's own */ }
  }
  return count;
}
async function round() {
  const answers = [];
  for (const port of [${free}, ${timeWait}, ${holder.port}]) {
    answers.push(await isPortFree(port));
  }
  try {
    await pickUnusedPort({ range: [${holder.port}, ${holder.port}] });
    answers.push("picked a held port");
  } catch (error) {
    answers.push(error.name);
  }
  returnPort(await pickUnusedPort());
  for (const port of await pickUnusedPorts(3)) returnPort(port);
  const reservation = await reservePort();
  await reservation.release();
  returnPort(reservation.port);
  {
    await using disposed = await reservePort({ range: [${free}, ${free}] });
    returnPort(disposed.port);
  }
  return answers;
}
const before = inetSockets();
const answers = await round();
for (let i = 0; i < 100; i++) await round();
console.log(JSON.stringify({ answers, before, after: inetSockets() }));
`,
      {
        // Deno lets only -A, with nothing denied, read /proc/self/fd.
        command: (path) => scriptCommand(path),
      },
    );
    assert.equal(result.code, 0, result.stderr);
    const { answers, before, after } = JSON.parse(result.stdout);
    assert.deepEqual(answers, [true, true, false, "NoFreePortFoundError"]);
    assert.equal(after, before, "TCP and UDP sockets open after 101 rounds");
  } finally {
    await holder.release();
  }
});

test("a reserved port is handed out first, without a check; returned, it comes first again", async () => {
  // Busy: handed out all the same, since reserved ports are not checked.
  const holder = await holdWithPython("dual");
  try {
    addReservedPort(holder.port);
    assert.equal(await pickUnusedPort(), holder.port);
    const other = await pickUnusedPort();
    returnPort(other);
    assert.notEqual(other, holder.port);
    returnPort(holder.port);
    assert.equal(await pickUnusedPort(), holder.port);
  } finally {
    await holder.release();
  }
});

test("a reserved port outside the range is kept for a later pick", async () => {
  const range = await freeRange(2);
  const reserved = range[1] + 100;
  addReservedPort(reserved);
  const picked = await pickUnusedPort({ range: [range[0], range[0]] });
  assert.equal(picked, range[0]);
  returnPort(picked);
  assert.equal(await pickUnusedPort(), reserved);
});

test("a locally picked port, returned, may be picked again", async () => {
  const [port] = await freeRange(1);
  assert.equal(await pickUnusedPort({ range: [port, port] }), port);
  assertNoFreePort(
    await thrown(() => pickUnusedPort({ range: [port, port] })),
    [port, port],
    0,
  );
  returnPort(port);
  assert.equal(await pickUnusedPort({ range: [port, port] }), port);
  returnPort(port);
});

test("returning a port never given does not make it free for this process", async () => {
  // Earlier tests leave ports given to this process, and the kernel may hand
  // one of them to the holder: start as a fresh process, on a port of ours.
  forgetPorts();
  const holder = await holdWithPython("dual", (await freeRange(1))[0]);
  try {
    returnPort(holder.port);
    const range: [number, number] = [holder.port, holder.port];
    assertNoFreePort(await thrown(() => pickUnusedPort({ range })), range, 1);
  } finally {
    await holder.release();
  }
});

/** Asserts no socket of any kind can bind `port` now. */
async function assertHeldEverywhere(port: number): Promise<void> {
  for (const kind of HOLD_KINDS) {
    assert.equal(
      await canBindWithPython(kind, port),
      false,
      `a ${kind} socket could bind ${port}`,
    );
  }
}

test("reservePort holds the port, on TCP and UDP, IPv4 and IPv6, until release()", async () => {
  const reservation = await reservePort();
  try {
    assert.equal(await isPortFree(reservation.port), false);
    await assertHeldEverywhere(reservation.port);
  } finally {
    await reservation.release();
  }
  assert.equal(await isPortFree(reservation.port), true);
  await bindAllFamilies(reservation.port);
  await reservation.release(); // twice is harmless
  returnPort(reservation.port);
});

test("reservePort in a range holds a port of the range", async () => {
  const range = await freeRange(3);
  const reservation = await reservePort({ range });
  try {
    assert.ok(reservation.port >= range[0] && reservation.port <= range[1]);
    assert.equal(await isPortFree(reservation.port), false);
  } finally {
    await reservation.release();
  }
  assert.equal(await isPortFree(reservation.port), true);
  // Released, it stays given to this process until returned.
  const only: [number, number] = [reservation.port, reservation.port];
  assertNoFreePort(
    await thrown(() => pickUnusedPort({ range: only })),
    only,
    0,
  );
  returnPort(reservation.port);
  assert.equal(await pickUnusedPort({ range: only }), reservation.port);
  returnPort(reservation.port);
});

test("await using releases the reservation at the end of the block", async () => {
  let port = 0;
  {
    await using reservation = await reservePort();
    port = reservation.port;
    assert.equal(await isPortFree(port), false);
  }
  assert.equal(await isPortFree(port), true);
  returnPort(port);
});

test("using releases the reservation at the end of the block", async () => {
  let port = 0;
  {
    using reservation = await reservePort();
    port = reservation.port;
    assert.equal(await isPortFree(port), false);
  }
  // The synchronous dispose starts the release; where a socket closes in the
  // background (Deno's node:dgram), the port is free once it has closed.
  await waitUntil(() => isPortFree(port), `port ${port} is free`);
  returnPort(port);
});

test("pickUnusedPorts returns count distinct ports, free once it returns", async () => {
  const ports = await pickUnusedPorts(8);
  assert.equal(ports.length, 8);
  assert.equal(new Set(ports).size, 8);
  for (const port of ports) {
    assert.equal(await isPortFree(port), true, `${port} still held`);
  }
  for (const port of ports) returnPort(port);
});

test("pickUnusedPorts takes every free port of a range, each once", async () => {
  const range = await freeRange(4);
  const ports = await pickUnusedPorts(4, { range });
  assert.deepEqual(new Set(ports), new Set(portsOf(range)));
  for (const port of ports) assert.equal(await isPortFree(port), true);
  for (const port of ports) returnPort(port);
});

test("pickUnusedPorts asking for more than the range has throws NoFreePortFoundError", async () => {
  const range = await freeRange(2);
  const error = await thrown(() => pickUnusedPorts(3, { range }));
  assertNoFreePort(error, range, 2);
  assert.match(
    (error as Error).message,
    /^Not enough free ports in \d+-\d+: asked for 3, found 2 of its 2 ports$/,
  );
  // The ports found are given back, and not left bound.
  for (const port of portsOf(range)) assert.equal(await isPortFree(port), true);
  const ports = await pickUnusedPorts(2, { range });
  assert.deepEqual(new Set(ports), new Set(portsOf(range)));
  for (const port of ports) returnPort(port);
});

test("preferred ports are tried first, in order; a busy one is skipped", async () => {
  const range = await freeRange(6);
  const [a, b, c] = [range[0] + 4, range[0] + 1, range[0] + 3];
  assert.deepEqual(await pickUnusedPorts(2, { ports: [a, b], range }), [a, b]);
  returnPort(a);
  returnPort(b);
  assert.equal(await pickUnusedPort({ ports: [c] }), c);
  returnPort(c);
  const holder = await holdWithPython("dual");
  try {
    assert.equal(await pickUnusedPort({ ports: [holder.port, b] }), b);
    returnPort(b);
  } finally {
    await holder.release();
  }
});

test("excluded ports are never returned", async () => {
  const range = await freeRange(3);
  const exclude = [range[0], range[1]];
  assert.equal(await pickUnusedPort({ range, exclude }), range[0] + 1);
  assertNoFreePort(
    await thrown(() => pickUnusedPort({ range, exclude })),
    range,
    0,
  );
  // Excluding beats preferring.
  returnPort(range[0] + 1);
  assert.equal(
    await pickUnusedPort({ ports: [range[0]], range, exclude }),
    range[0] + 1,
  );
  returnPort(range[0] + 1);
});

/** Asserts `body` throws `type` with the value named in the message. */
async function assertInvalid(
  body: () => unknown,
  type: typeof TypeError | typeof RangeError,
  value: string,
): Promise<void> {
  const error = await thrown(body);
  assert.ok(error instanceof type, `expected ${type.name}, got ${error}`);
  const escaped = value.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  assert.match(
    (error as Error).message,
    new RegExp(`(^|[^\\d.])${escaped}($|[^\\d.])`),
  );
}

test("invalid ports throw TypeError or RangeError naming the value", async () => {
  const bad: [unknown, typeof TypeError, string][] = [
    [0, RangeError, "0"],
    [65536, RangeError, "65536"],
    [-1, RangeError, "-1"],
    [1.5, TypeError, "1.5"],
    ["80", TypeError, '"80"'],
    [NaN, TypeError, "NaN"],
  ];
  for (const [value, type, shown] of bad) {
    const port = value as number;
    await assertInvalid(() => isPortFree(port), type, shown);
    await assertInvalid(() => addReservedPort(port), type, shown);
    await assertInvalid(() => returnPort(port), type, shown);
    await assertInvalid(() => pickUnusedPort({ ports: [port] }), type, shown);
    await assertInvalid(() => pickUnusedPort({ exclude: [port] }), type, shown);
    await assertInvalid(
      () => pickUnusedPort({ range: [port, 30000] }),
      type,
      shown,
    );
    await assertInvalid(
      () => pickUnusedPort({ range: [1, port] }),
      type,
      shown,
    );
  }
});

test("ports takes a port or any iterable of ports; exclude any iterable; anything else is a TypeError naming the option", async () => {
  const range = await freeRange(4);
  const [a, b, c, d] = portsOf(range);
  assert.equal(await pickUnusedPort({ ports: a, range }), a);
  assert.equal(await pickUnusedPort({ ports: new Set([b]), range }), b);
  function* gen() {
    yield c;
  }
  assert.equal(await pickUnusedPort({ ports: gen(), range }), c);
  assert.equal(
    await pickUnusedPort({ range, exclude: new Set([a, b, c]) }),
    d,
  );
  for (const port of [a, b, c, d]) returnPort(port);
  const bad: [object, RegExp][] = [
    [{ ports: "123" }, /Invalid ports "123": expected a port or an iterable/],
    [{ ports: null }, /Invalid ports null/],
    [{ ports: { length: 1 } }, /Invalid ports Object/],
    [{ exclude: null }, /Invalid excluded ports null: expected an iterable/],
    [{ exclude: 5 }, /Invalid excluded ports 5/],
    [{ exclude: "80" }, /Invalid excluded ports "80"/],
  ];
  for (const [options, message] of bad) {
    const error = await thrown(() => pickUnusedPort(options as never));
    assert.ok(error instanceof TypeError, String(error));
    assert.match((error as Error).message, message);
  }
});

test("forgetPorts: a port given to this process can be picked again, as in a new process", async () => {
  const range = await freeRange(1);
  const [port] = portsOf(range);
  assert.equal(await pickUnusedPort({ range }), port);
  await thrown(() => pickUnusedPort({ range }));
  addReservedPort(range[0] - 1);
  forgetPorts();
  assert.equal(await pickUnusedPort({ range }), port);
  forgetPorts();
});

test("a backwards range, a bad count or a bad pid throws naming the value", async () => {
  const error = await thrown(() => pickUnusedPort({ range: [20, 10] }));
  assert.ok(error instanceof RangeError);
  assert.match(error.message, /\b20\b/);
  assert.match(error.message, /\b10\b/);
  await assertInvalid(() => pickUnusedPorts(0), RangeError, "0");
  await assertInvalid(() => pickUnusedPorts(-2), RangeError, "-2");
  await assertInvalid(() => pickUnusedPorts(1.5), TypeError, "1.5");
  await assertInvalid(
    () => pickUnusedPorts("2" as unknown as number),
    TypeError,
    '"2"',
  );
  await assertInvalid(() => pickUnusedPort({ pid: -1 }), RangeError, "-1");
  await assertInvalid(() => pickUnusedPort({ pid: 0 }), RangeError, "0");
  await assertInvalid(() => pickUnusedPort({ pid: 2.5 }), TypeError, "2.5");
  await assertInvalid(() => reservePort({ pid: -1 }), RangeError, "-1");
  await assertInvalid(
    () => getPortFromPortServer("@x", { pid: -1 }),
    RangeError,
    "-1",
  );
});

function inRange(port: number, range: readonly [number, number]): boolean {
  return port >= range[0] && port <= range[1];
}

/** The pids a Python port server was asked for, from its log. */
function requestedPids(server: Proc): number[] {
  return [...server.stderr().matchAll(/Request on behalf of pid (\d+)/g)].map((
    m,
  ) => Number(m[1]));
}

/** Asks the server `n` times for this process, and checks the ports it gave. */
async function askPythonServer(
  address: string,
  pool: [number, number],
  n: number,
) {
  const ports: number[] = [];
  for (let i = 0; i < n; i++) {
    const port = await getPortFromPortServer(address, { pid: process.pid });
    assert.ok(port !== undefined, "the server gave no port");
    ports.push(port);
  }
  assert.equal(new Set(ports).size, n);
  for (const port of ports) {
    assert.ok(
      port >= pool[0] && port <= pool[1],
      `${port} outside the pool ${pool}`,
    );
  }
}

test("getPortFromPortServer gets distinct ports of the pool from the Python server (abstract name)", async () => {
  const address = uniqueName("py-abstract");
  const pool = await freeRange(6);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    await askPythonServer(address, pool, 4);
    await server.waitFor(
      new RegExp(`Request on behalf of pid ${process.pid}\\b`),
      5_000,
    );
  } finally {
    await server.stop();
  }
});

test("getPortFromPortServer gets distinct ports of the pool from the Python server (socket file)", async () => {
  const dir = tempDir();
  const address = join(dir.path, "portserver.sock");
  const pool = await freeRange(6);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    await askPythonServer(address, pool, 4);
  } finally {
    await server.stop();
    dir.remove();
  }
});

test("pickUnusedPort uses the port server's port, and picks locally once it refuses", async () => {
  const address = uniqueName("py-refuse");
  const pool = await freeRange(2);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    const result = await runScript(`
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
const ports = [];
for (let i = 0; i < 3; i++) ports.push(await pickUnusedPort({ portserverAddress: ${
      JSON.stringify(address)
    } }));
console.log(JSON.stringify(ports));
`);
    assert.equal(result.code, 0, result.stderr);
    const ports = JSON.parse(result.stdout) as number[];
    assert.equal(new Set(ports).size, 3);
    assert.deepEqual(new Set(ports.slice(0, 2)), new Set(portsOf(pool)));
    assert.ok(
      ports[2] < pool[0] || ports[2] > pool[1],
      `${ports[2]} from the exhausted pool`,
    );
    const lines = result.stderr.split("\n").filter((line) => line.trim());
    assert.deepEqual(lines, ["Portserver failed to find a port."]);
    // The log line may reach us after the reply: wait for it.
    await server.waitFor(/All ports in use/, 5_000);
  } finally {
    await server.stop();
  }
});

test("a port from the port server, returned, goes to the free set and is handed out first", async () => {
  const address = uniqueName("py-return");
  const pool = await freeRange(3);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  let port: number | undefined;
  try {
    port = await pickUnusedPort({ portserverAddress: address });
    assert.ok(inRange(port, pool), `${port} not from the pool ${pool}`);
    returnPort(port);
    // Without asking any server, and even outside the kernel's range.
    assert.equal(await pickUnusedPort(), port);
    // The server logs each request as it reads it, one connection after the
    // other: once the line of a last request (for another live pid, the
    // server's own) has come, the lines of all earlier ones have too.
    const marker = server.child.pid!;
    assert.ok(await getPortFromPortServer(address, { pid: marker }));
    await server.waitFor(
      new RegExp(`Request on behalf of pid ${marker}\\b`),
      5_000,
    );
    assert.deepEqual(requestedPids(server), [process.pid, marker]);
  } finally {
    await server.stop();
  }
});

test("getPortFromPortServer with an empty address asks no server and returns undefined", async () => {
  assert.equal(await getPortFromPortServer(""), undefined);
});

test("getPortFromPortServer returns undefined when the Python server refuses", async () => {
  const address = uniqueName("py-refuse-direct");
  const pool = await freeRange(1);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[0]}`);
  try {
    assert.equal(
      await getPortFromPortServer(address, { pid: process.pid }),
      pool[0],
    );
    assert.equal(
      await getPortFromPortServer(address, { pid: process.pid }),
      undefined,
    );
    // The log line may reach us after the reply: wait for it.
    await server.waitFor(/All ports in use/, 5_000);
  } finally {
    await server.stop();
  }
});

test("with no server at the address, pickUnusedPort still picks a port, and says why", async () => {
  const dir = tempDir();
  const missing = [uniqueName("nobody"), join(dir.path, "nobody.sock")];
  try {
    const result = await runScript(`
import { getPortFromPortServer, pickUnusedPort } from ${
      JSON.stringify(MOD_URL)
    };
const out = [];
for (const address of ${JSON.stringify(missing)}) {
  out.push(await pickUnusedPort({ portserverAddress: address }));
  out.push(await getPortFromPortServer(address) ?? null);
}
console.log(JSON.stringify(out));
`);
    assert.equal(result.code, 0, result.stderr);
    const [p1, none1, p2, none2] = JSON.parse(result.stdout);
    assert.ok(Number.isInteger(p1) && Number.isInteger(p2) && p1 !== p2);
    assert.equal(none1, null);
    assert.equal(none2, null);
    const lines = result.stderr.split("\n").filter((line) => line.trim());
    assert.equal(lines.length, 4, result.stderr);
    for (const line of lines) {
      assert.match(line, /^Socket error when connecting to portserver: \S/);
    }
  } finally {
    dir.remove();
  }
});

test("PORTSERVER_ADDRESS is used when set", async () => {
  const address = uniqueName("py-env");
  const pool = await freeRange(3);
  const server = await startPythonPortserver(address, `${pool[0]}-${pool[1]}`);
  try {
    const result = await runScript(
      `
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
console.log(JSON.stringify({ pid: process.pid, port: await pickUnusedPort() }));
`,
      { env: { PORTSERVER_ADDRESS: address } },
    );
    assert.equal(result.code, 0, result.stderr);
    const { pid, port } = JSON.parse(result.stdout);
    assert.ok(
      port >= pool[0] && port <= pool[1],
      `${port} outside the pool ${pool}`,
    );
    await server.waitFor(
      new RegExp(`Request on behalf of pid ${pid}\\b`),
      5_000,
    );
  } finally {
    await server.stop();
  }
});

test("portserverAddress wins over PORTSERVER_ADDRESS", async () => {
  const first = uniqueName("py-option");
  const second = uniqueName("py-env2");
  const [a, b] = [await freeRange(2), await freeRange(2)];
  const s1 = await startPythonPortserver(first, `${a[0]}-${a[1]}`);
  const s2 = await startPythonPortserver(second, `${b[0]}-${b[1]}`);
  try {
    const result = await runScript(
      `
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
console.log(await pickUnusedPort({ portserverAddress: ${
        JSON.stringify(first)
      } }));
`,
      { env: { PORTSERVER_ADDRESS: second } },
    );
    assert.equal(result.code, 0, result.stderr);
    const port = Number(result.stdout);
    assert.ok(port >= a[0] && port <= a[1], `${port} not from ${first} (${a})`);
    assert.doesNotMatch(s2.stderr(), /Request on behalf/);
  } finally {
    await s1.stop();
    await s2.stop();
  }
});

test("Deno with only --allow-net picks a port, silently without PORTSERVER_ADDRESS, which it may not read", async () => {
  const dir = tempDir();
  try {
    const path = join(dir.path, "deno-net-only.mts");
    writeFileSync(
      path,
      `
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
const a = await pickUnusedPort();
const b = await pickUnusedPort();
console.log(a);
console.error(a === b ? "same port twice" : "distinct");
`,
    );
    const result = await run([
      tool("deno"),
      "run",
      "--allow-net",
      "--no-config",
      "--no-prompt",
      path,
    ], {
      env: { PORTSERVER_ADDRESS: uniqueName("deno-env"), NO_COLOR: "1" },
    });
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /^\d+\n$/);
    // No warning, and no connection attempt to the server it was not told
    // of: only the script's own line.
    assert.equal(result.stderr, "distinct\n");
  } finally {
    dir.remove();
  }
});

test("a port handed out from the free set is not handed out again before it is returned", async () => {
  // Separate process: the per-process state stays clean here whatever happens.
  const [port] = await freeRange(1);
  const result = await runScript(`
import { addReservedPort, pickUnusedPort, returnPort } from ${
    JSON.stringify(MOD_URL)
  };
const out = [];
const attempt = async () => {
  try {
    out.push(await pickUnusedPort({ range: [${port}, ${port}] }));
  } catch (error) {
    out.push(error.name);
  }
};
addReservedPort(${port});
out.push(await pickUnusedPort());
await attempt(); // still given: no port left in the range
returnPort(${port});
await attempt(); // returned: from the free set again
console.log(JSON.stringify(out));
`);
  assert.equal(result.code, 0, result.stderr);
  assert.deepEqual(JSON.parse(result.stdout), [
    port,
    "NoFreePortFoundError",
    port,
  ]);
});

test("a port from the port server is not handed out again before it is returned", async () => {
  const address = uniqueName("py-twice");
  const [port] = await freeRange(1);
  const server = await startPythonPortserver(address, `${port}-${port}`);
  try {
    const result = await runScript(`
import { pickUnusedPort } from ${JSON.stringify(MOD_URL)};
const out = [await pickUnusedPort({ portserverAddress: ${
      JSON.stringify(address)
    } })];
try {
  out.push(await pickUnusedPort({ range: [${port}, ${port}] }));
} catch (error) {
  out.push(error.name);
}
console.log(JSON.stringify(out));
`);
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual(JSON.parse(result.stdout), [port, "NoFreePortFoundError"]);
  } finally {
    await server.stop();
  }
});

test("Deno without --allow-net: picking rejects with an error naming --allow-net, no crash", async () => {
  const dir = tempDir();
  try {
    const path = join(dir.path, "deno-no-net.mts");
    writeFileSync(
      path,
      `
import { isPortFree, pickUnusedPort } from ${JSON.stringify(MOD_URL)};
for (const call of [() => isPortFree(27001), () => pickUnusedPort(), () => pickUnusedPort({ range: [27000, 27009] })]) {
  try {
    console.log("returned", await call());
  } catch (error) {
    console.log("rejected", error.message);
  }
}
`,
    );
    // Both UDP paths: node:dgram (stable Deno) and Deno.listenDatagram.
    for (const flags of [[], ["--unstable-net"]]) {
      const result = await run([
        tool("deno"),
        "run",
        "--no-config",
        "--no-prompt",
        ...flags,
        path,
      ], {
        env: { NO_COLOR: "1" },
      });
      const what = `deno run ${
        flags.join(" ")
      }: exit ${result.code}, ${result.stderr}`;
      assert.equal(result.code, 0, what);
      const lines = result.stdout.trim().split("\n");
      assert.equal(lines.length, 3, what);
      for (const line of lines) {
        assert.match(line, /^rejected .*--allow-net/, what);
      }
      assert.match(lines[0], /\b27001\b/);
    }
  } finally {
    dir.remove();
  }
});
