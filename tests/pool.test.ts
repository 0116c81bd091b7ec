/**
 * The server's pool, in process: no sockets, no /proc; whether a port is
 * free and whether a process lives are decided by the test.
 */

import assert from "node:assert/strict";
import test from "node:test";
import { parseStatus, PROTOCOL_LIMITS } from "../mod.ts";
import {
  type AliveCheck,
  PortPool,
  StartTimes,
  startTimeTtlMs,
} from "../portserver.ts";

const free = () => Promise.resolve(true);
const everyoneAlive: AliveCheck = () => true;

function range(first: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => first + i);
}

test("ports are handed out round-robin; a port given back is the last to be reused", async () => {
  const pool = new PortPool(range(20000, 3));
  const a = pool.ownerOf(100, 1);
  const first = await pool.take(2, a, undefined, free, everyoneAlive);
  assert.deepEqual(first.ports, [20000, 20001]);
  assert.deepEqual(pool.release([20000], a), [20000]);
  const next = await pool.take(1, a, undefined, free, everyoneAlive);
  assert.deepEqual(next.ports, [20002]);
  const last = await pool.take(1, a, undefined, free, everyoneAlive);
  assert.deepEqual(last.ports, [20000]);
  assert.equal(pool.allocated, 3);
});

test("take is all or none: too few free ports gives none and keeps the order", async () => {
  const pool = new PortPool(range(20000, 3));
  const a = pool.ownerOf(100, 1);
  const taken = await pool.take(4, a, undefined, free, everyoneAlive);
  assert.equal(taken.ports, undefined);
  assert.equal(pool.allocated, 0);
  const all = await pool.take(3, a, undefined, free, everyoneAlive);
  assert.deepEqual(all.ports, [20000, 20001, 20002]);
});

test("a port found in use is skipped, reported, and tried again later", async () => {
  const pool = new PortPool(range(20000, 3));
  const a = pool.ownerOf(100, 1);
  const busy = (port: number) => Promise.resolve(port !== 20000);
  const taken = await pool.take(2, a, undefined, busy, everyoneAlive);
  assert.deepEqual(taken.ports, [20001, 20002]);
  assert.deepEqual(taken.inUse, [20000]);
  assert.equal(taken.checked, 3);
  assert.deepEqual(
    (await pool.take(1, a, undefined, free, everyoneAlive)).ports,
    [20000],
  );
});

test("when the free ports run out, dead owners' ports are reclaimed once, with one look per owner", async () => {
  const pool = new PortPool(range(20000, 4));
  const live = pool.ownerOf(100, 1);
  const dead = pool.ownerOf(200, 1);
  await pool.take(2, live, undefined, free, everyoneAlive);
  await pool.take(2, dead, undefined, free, everyoneAlive);
  const looked: number[] = [];
  const alive: AliveCheck = (pid) => {
    looked.push(pid);
    return pid !== 200;
  };
  const other = pool.ownerOf(300, 1);
  const taken = await pool.take(2, other, "x", free, alive);
  assert.deepEqual(taken.ports, [20002, 20003]);
  assert.deepEqual(looked.sort(), [100, 200, 300]);
  const status = pool.status(everyoneAlive);
  assert.deepEqual(status.map((s) => [s.port, s.pid, s.label]), [
    [20000, 100, null],
    [20001, 100, null],
    [20002, 300, "x"],
    [20003, 300, "x"],
  ]);
});

test("a reused pid (another start time) drops the old owner's ports", async () => {
  const pool = new PortPool(range(20000, 2));
  const old = pool.ownerOf(100, 1);
  await pool.take(1, old, undefined, free, everyoneAlive);
  assert.equal(pool.holdsAll([20000], 100), true);
  const again = pool.ownerOf(100, 2);
  assert.notEqual(again, old);
  assert.equal(pool.allocated, 0);
  assert.equal(pool.holdsAll([20000], 100), false);
});

test("release frees only the owner's ports; holdsAll is all or none", async () => {
  const pool = new PortPool(range(20000, 3));
  const a = pool.ownerOf(100, 1);
  const b = pool.ownerOf(200, 1);
  await pool.take(1, a, undefined, free, everyoneAlive);
  await pool.take(1, b, undefined, free, everyoneAlive);
  assert.equal(pool.holdsAll([20000, 20001], 100), false);
  assert.deepEqual(pool.release([20000, 20001, 30000], a), [20000]);
  assert.equal(pool.holdsAll([20001], 200), true);
});

test("leases are not saved and not reclaimed; they end only with releaseOwner", async () => {
  const pool = new PortPool(range(20000, 2));
  const lease = pool.leaseOwner();
  await pool.take(2, lease, "l", free, everyoneAlive);
  assert.deepEqual(pool.saved(), []);
  assert.equal(pool.reclaim(() => false), 0);
  const [status] = pool.status(() => false);
  assert.deepEqual([status.pid, status.lease, status.alive], [
    null,
    true,
    true,
  ]);
  assert.deepEqual(pool.releaseOwner(lease), [20000, 20001]);
  assert.equal(pool.allocated, 0);
});

test("saved and restored: live owners keep their ports, the rest join the free ring", async () => {
  const pool = new PortPool(range(20000, 4));
  const a = pool.ownerOf(100, 7);
  const b = pool.ownerOf(200, 7);
  await pool.take(1, a, "web", free, everyoneAlive, 1000);
  await pool.take(1, b, undefined, free, everyoneAlive, 2000);
  const saved = pool.saved();
  assert.deepEqual(saved, [[20000, 100, 7, 1000, "web"], [
    20001,
    200,
    7,
    2000,
  ]]);

  const restored = new PortPool(range(20000, 4));
  const n = restored.restore(
    [...saved, [20000, 300, 7, 0], [40000, 100, 7, 0]],
    (pid) => pid !== 200,
  );
  assert.equal(n, 1);
  assert.equal(restored.holdsAll([20000], 100), true);
  const c = restored.ownerOf(400, 1);
  const taken = await restored.take(3, c, undefined, free, everyoneAlive);
  assert.deepEqual(taken.ports, [20001, 20002, 20003]);
});

test("status marks ports of dead holders as not alive", async () => {
  const pool = new PortPool(range(20000, 2));
  await pool.take(1, pool.ownerOf(100, 1), undefined, free, everyoneAlive);
  await pool.take(1, pool.ownerOf(200, 1), undefined, free, everyoneAlive);
  const status = pool.status((pid) => pid === 100);
  assert.deepEqual(status.map((s) => [s.port, s.alive]), [
    [20000, true],
    [20001, false],
  ]);
});

test("a pool of 65,535 ports hands every one out once", async () => {
  const pool = new PortPool(range(1, 65535));
  const a = pool.ownerOf(100, 1);
  const taken = new Set<number>();
  for (let i = 0; i < 66; i++) {
    const result = await pool.take(1000, a, undefined, free, everyoneAlive);
    for (const port of result.ports ?? []) taken.add(port);
    if (!result.ports) {
      const rest = await pool.take(535, a, undefined, free, everyoneAlive);
      for (const port of rest.ports!) taken.add(port);
      break;
    }
  }
  assert.equal(taken.size, 65535);
  assert.equal(pool.allocated, 65535);
});

test("the STATUS of a full pool of every port, each with a 100-character label, fits PROTOCOL_LIMITS.statusReply", async () => {
  const pool = new PortPool(range(1, 65535));
  const label = "x".repeat(100);
  // 65 owners of 1000 ports and one of 535, with the largest pids.
  for (let i = 0; i < 66; i++) {
    const owner = pool.ownerOf(0x7fffffff - i, 1e15);
    const count = i < 65 ? 1000 : 535;
    await pool.take(count, owner, label, free, everyoneAlive, 8.64e15);
  }
  assert.equal(pool.allocated, 65535);
  const allocations = pool.status(everyoneAlive);
  const reply = JSON.stringify({
    address: `@${"a".repeat(100)}`,
    pool: 65535,
    allocated: 65535,
    reclaimable: 0,
    allocations,
  }) + "\n";
  const bytes = new TextEncoder().encode(reply).length;
  assert.ok(
    bytes <= PROTOCOL_LIMITS.statusReply,
    `${bytes} bytes > ${PROTOCOL_LIMITS.statusReply}`,
  );
  assert.deepEqual(parseStatus(reply.trim()).allocations.length, 65535);
});

test("version changes whenever a port is taken or freed, and only then", async () => {
  const pool = new PortPool(range(20000, 2));
  const a = pool.ownerOf(100, 1);
  const v0 = pool.version;
  await pool.take(3, a, undefined, free, everyoneAlive);
  assert.equal(pool.version, v0, "a take that got nothing changed it");
  await pool.take(1, a, undefined, free, everyoneAlive);
  const v1 = pool.version;
  assert.notEqual(v1, v0);
  pool.release([20001], a);
  assert.equal(pool.version, v1, "freeing a port not held changed it");
  pool.release([20000], a);
  assert.notEqual(pool.version, v1);
});

test("take answers at once while every check does, and goes on asynchronously from the first that does not", async () => {
  const pool = new PortPool(range(20000, 4));
  const a = pool.ownerOf(100, 1);
  const now = pool.take(2, a, undefined, () => true, everyoneAlive);
  assert.ok(!(now instanceof Promise), "a promise for synchronous checks");
  assert.deepEqual(now.ports, [20000, 20001]);
  // 20002 is checked synchronously and busy; 20003 asynchronously and free;
  // then the ring comes round to 20002 again, asynchronously.
  const checked: string[] = [];
  const mixed = pool.take(2, a, "m", (port) => {
    if (port === 20002 && checked.length === 0) {
      checked.push(`${port} now`);
      return false;
    }
    checked.push(`${port} later`);
    return Promise.resolve(true);
  }, everyoneAlive);
  assert.ok(mixed instanceof Promise);
  const taken = await mixed;
  assert.deepEqual(checked, ["20002 now", "20003 later", "20002 later"]);
  assert.deepEqual(taken.ports, [20003, 20002]);
  assert.deepEqual(taken.inUse, [20002]);
  assert.equal(taken.checked, 3);
  assert.equal(pool.allocated, 4);
});

test("a pool rejects a value that is not a port, naming it; repeats are ignored", () => {
  for (const bad of [0, 65536, 1.5, NaN]) {
    assert.throws(() => new PortPool([20000, bad]), new RegExp(String(bad)));
  }
  const pool = new PortPool([20001, 20000, 20001, 20002, 20000]);
  assert.equal(pool.size, 3);
  const a = pool.ownerOf(100, 1);
  const taken = pool.take(3, a, undefined, () => true, everyoneAlive);
  assert.deepEqual((taken as { ports: number[] }).ports, [20001, 20000, 20002]);
});

test("StartTimes reads a pid once per ttlMs, keeps only live processes, and stays bounded", () => {
  const reads: number[] = [];
  const live = new Set([100, 200]);
  const times = new StartTimes((pid) => {
    reads.push(pid);
    return live.has(pid) ? pid * 10 : 0;
  }, 5);
  assert.equal(times.get(100, 0), 1000);
  assert.equal(times.get(100, 4.9), 1000);
  assert.deepEqual(reads, [100]);
  assert.equal(times.get(100, 5), 1000);
  assert.deepEqual(reads, [100, 100]);
  // A process that does not exist is read every time, never kept.
  assert.equal(times.get(300, 6), 0);
  assert.equal(times.get(300, 6), 0);
  assert.deepEqual(reads, [100, 100, 300, 300]);
  // One that died is read again once its time is up, and dropped.
  live.delete(200);
  assert.equal(times.get(200, 0), 0);
  live.add(200);
  assert.equal(times.get(200, 10), 2000);
  live.delete(200);
  assert.equal(times.get(200, 12), 2000, "kept within ttlMs");
  assert.equal(times.get(200, 15), 0, "read again after ttlMs");
  // Thousands of pids: expired entries are pruned, so the map stays small.
  const many = new StartTimes(() => 1, 1);
  for (let pid = 2; pid < 100_000; pid++) many.get(pid, pid);
  assert.ok(many.size <= 4096, `${many.size} pids kept`);
  assert.equal(many.get(99_999, 99_999.5), 1);
});

test("startTimeTtlMs: pid_max microseconds, at most 1 s; 0 (no caching) when pid_max is unknown", () => {
  assert.equal(startTimeTtlMs(32768), 32.768);
  assert.equal(startTimeTtlMs(4_194_304), 1000);
  assert.equal(startTimeTtlMs(0), 0);
  assert.equal(startTimeTtlMs(-5), 0);
});

test("a check that fails, at once or later, puts its port and the ports found so far back", async () => {
  const pool = new PortPool(range(20000, 4));
  const a = pool.ownerOf(100, 1);
  const failing = (bad: number, late: boolean) => (port: number) => {
    if (port !== bad) return late ? Promise.resolve(true) : true;
    if (late) return Promise.reject(new Error(`EMFILE on ${port}`));
    throw new Error(`EMFILE on ${port}`);
  };
  assert.throws(
    () => pool.take(3, a, undefined, failing(20002, false), everyoneAlive),
    /EMFILE on 20002/,
  );
  await assert.rejects(
    async () =>
      await pool.take(4, a, undefined, failing(20001, true), everyoneAlive),
    /EMFILE on 20001/,
  );
  assert.equal(pool.allocated, 0);
  const all = await pool.take(4, a, undefined, () => true, everyoneAlive);
  assert.deepEqual(all.ports?.toSorted(), [20000, 20001, 20002, 20003]);
});
