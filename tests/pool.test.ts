/**
 * The server's pool as its clients feel it: which port a request gets, when
 * ports of a dead owner come back, what all or none means for TAKE and
 * RETURN, and what a lease holds. Each test runs a real server in this
 * process (startPortServer) and talks to it over a real Unix socket; owners
 * are real processes.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";
import { join } from "node:path";
import { PROTOCOL_LIMITS } from "../mod.ts";
import { startPortServer } from "../portserver.ts";
import {
  holdWithPython,
  releaseRange,
  tempDir,
  uniqueName,
} from "./helpers.ts";
import {
  okPorts,
  openConnection,
  randomPool,
  sendRequest,
  sleeper,
  withInProcessServer,
} from "./server_helpers.ts";

/** A live process: this test's own. */
const PID = process.pid;

/** The STATUS reply, parsed. */
async function status(address: string) {
  const reply = await sendRequest(address, "STATUS\n");
  assert.match(reply, /^\{.*\}\n$/, reply);
  return JSON.parse(reply) as {
    address: string;
    pool: number;
    allocated: number;
    reclaimable: number;
    allocations: {
      port: number;
      pid: number | null;
      lease: boolean;
      alive: boolean;
      since: string;
      label: string | null;
    }[];
  };
}

/** Who holds what, by port: `[port, pid, alive]`. */
async function holders(address: string) {
  return (await status(address)).allocations.map((a) => [
    a.port,
    a.pid,
    a.alive,
  ]);
}

test("ports are handed out round-robin: a port given back is the last to be reused", async () => {
  await withInProcessServer(
    { size: 3, name: "pool-rr" },
    async ({ range: [r0], address }) => {
      const take = async (count: number) =>
        okPorts(await sendRequest(address, `TAKE pid=${PID} count=${count}\n`));
      assert.deepEqual(await take(2), [r0, r0 + 1]);
      assert.equal(
        await sendRequest(address, `RETURN pid=${PID} ports=${r0}\n`),
        `OK ${r0}\n`,
      );
      assert.deepEqual(await take(1), [r0 + 2]);
      assert.deepEqual(await take(1), [r0]);
      assert.equal(
        await sendRequest(address, `TAKE pid=${PID}\n`),
        "ERR all ports in use\n",
      );
    },
  );
});

test("TAKE is all or none: more ports than are free gives none and keeps the order", async () => {
  await withInProcessServer(
    { size: 3, name: "pool-all" },
    async ({ range: [r0], address, server }) => {
      assert.equal(
        await sendRequest(address, `TAKE pid=${PID} count=4\n`),
        "ERR fewer than 4 ports free\n",
      );
      assert.equal((await status(address)).allocated, 0);
      assert.equal(server.stats().deniedAllocations, 1);
      assert.deepEqual(
        okPorts(await sendRequest(address, `TAKE pid=${PID} count=3\n`)),
        [r0, r0 + 1, r0 + 2],
      );
    },
  );
});

test("a pool port in use by another process is skipped and logged, and handed out once it is free again", async () => {
  await withInProcessServer(
    { size: 3, name: "pool-busy" },
    async ({ range: [r0], address, server, log }) => {
      const busy = await holdWithPython("dual", r0);
      try {
        assert.deepEqual(
          okPorts(await sendRequest(address, `TAKE pid=${PID} count=2\n`)),
          [r0 + 1, r0 + 2],
        );
        assert.equal(server.stats().numPortsCheckedForLastRequest, 3);
        assert.ok(
          log.some((l) => l.endsWith(`] Port ${r0} unexpectedly in use.`)),
          log.join("\n"),
        );
      } finally {
        await busy.release();
      }
      assert.equal(
        await sendRequest(address, `TAKE pid=${PID}\n`),
        `OK ${r0}\n`,
      );
    },
  );
});

test("the ports of a dead owner stay held (alive false) while free ports remain, and are reclaimed when the pool runs dry", async () => {
  await withInProcessServer(
    { size: 4, name: "pool-dead" },
    async ({ range: [r0], address }) => {
      const live = sleeper();
      const dead = sleeper();
      try {
        const livePid = live.child.pid!;
        const deadPid = dead.child.pid!;
        assert.equal(
          await sendRequest(address, `TAKE pid=${livePid}\n`),
          `OK ${r0}\n`,
        );
        assert.equal(
          await sendRequest(address, `TAKE pid=${deadPid} count=2\n`),
          `OK ${r0 + 1} ${r0 + 2}\n`,
        );
        await dead.stop("SIGKILL");
        assert.deepEqual(await holders(address), [
          [r0, livePid, true],
          [r0 + 1, deadPid, false],
          [r0 + 2, deadPid, false],
        ]);
        // A free port remains: the dead owner's ports are not touched.
        assert.equal(
          await sendRequest(address, `TAKE pid=${PID}\n`),
          `OK ${r0 + 3}\n`,
        );
        const before = await status(address);
        assert.deepEqual([before.allocated, before.reclaimable], [4, 2]);
        // None free now: the dead owner's ports are reclaimed, the live one's kept.
        assert.equal(
          await sendRequest(address, `TAKE pid=${PID} count=2\n`),
          `OK ${r0 + 1} ${r0 + 2}\n`,
        );
        assert.deepEqual(await holders(address), [
          [r0, livePid, true],
          [r0 + 1, PID, true],
          [r0 + 2, PID, true],
          [r0 + 3, PID, true],
        ]);
        assert.equal(
          await sendRequest(address, `TAKE pid=${PID}\n`),
          "ERR all ports in use\n",
        );
      } finally {
        await live.stop("SIGKILL");
        await dead.stop("SIGKILL");
      }
    },
  );
});

test("RETURN is all or none: one port the pid does not hold refuses the whole request, naming it", async () => {
  await withInProcessServer(
    { size: 3, name: "pool-return" },
    async ({ range: [r0], address }) => {
      const other = sleeper();
      try {
        const otherPid = other.child.pid!;
        assert.equal(
          await sendRequest(address, `TAKE pid=${otherPid}\n`),
          `OK ${r0}\n`,
        );
        assert.equal(
          await sendRequest(address, `TAKE pid=${PID} count=2\n`),
          `OK ${r0 + 1} ${r0 + 2}\n`,
        );
        const held = await holders(address);
        const refusals: [string, string][] = [
          [`${r0 + 1},${r0}`, `ERR not held by pid ${PID}: ${r0}\n`],
          [`${r0 + 1},65535`, `ERR not held by pid ${PID}: 65535\n`],
        ];
        for (const [ports, reply] of refusals) {
          assert.equal(
            await sendRequest(address, `RETURN pid=${PID} ports=${ports}\n`),
            reply,
          );
          assert.deepEqual(await holders(address), held, ports);
        }
        // A pid that holds nothing.
        assert.equal(
          await sendRequest(address, `RETURN pid=${PID + 1} ports=${r0 + 1}\n`),
          `ERR not held by pid ${PID + 1}: ${r0 + 1}\n`,
        );
        assert.equal(
          await sendRequest(
            address,
            `RETURN pid=${PID} ports=${r0 + 2},${r0 + 1}\n`,
          ),
          `OK ${r0 + 2} ${r0 + 1}\n`,
        );
        assert.deepEqual(await holders(address), [[r0, otherPid, true]]);
      } finally {
        await other.stop("SIGKILL");
      }
    },
  );
});

test("a lease is kept out of the state file, is not reclaimed when the pool runs dry, and ends with its connection", async () => {
  const dir = tempDir();
  const statePath = join(dir.path, "state.json");
  try {
    await withInProcessServer(
      { size: 3, name: "pool-lease", options: { statePath } },
      async ({ range: [r0], address, waitForLog }) => {
        const lease = await openConnection(address, "LEASE count=2 label=l\n");
        try {
          assert.equal(lease.reply, `OK ${r0} ${r0 + 1}\n`);
          assert.equal(
            await sendRequest(address, `TAKE pid=${PID}\n`),
            `OK ${r0 + 2}\n`,
          );
          const saved = JSON.parse(readFileSync(statePath, "utf8"));
          assert.deepEqual(
            saved.allocations.map((a: number[]) => [a[0], a[1]]),
            [[r0 + 2, PID]],
          );
          const leased = (await status(address)).allocations.slice(0, 2);
          assert.deepEqual(
            leased.map((a) => [a.port, a.pid, a.lease, a.alive, a.label]),
            [[r0, null, true, true, "l"], [r0 + 1, null, true, true, "l"]],
          );
          assert.equal(
            await sendRequest(address, `TAKE pid=${PID}\n`),
            "ERR all ports in use\n",
          );
        } finally {
          await lease.close();
        }
        await waitForLog(new RegExp(`Lease of ports ${r0}, ${r0 + 1} ended`));
        assert.equal(
          await sendRequest(address, `TAKE pid=${PID} count=2\n`),
          `OK ${r0} ${r0 + 1}\n`,
        );
      },
    );
  } finally {
    dir.remove();
  }
});

test("pool ranges: a range that is not ports is refused, naming it; overlapping ranges give each port once, in port order", async () => {
  const [a, b] = await randomPool(4);
  for (const bad of [[0, 5], [a, 65536], [b, a], [a, 1.5]]) {
    await assert.rejects(
      startPortServer({ address: "@pool-never-served", pool: [bad as never] }),
      (error: Error) =>
        error instanceof TypeError &&
        error.message.startsWith(`Invalid pool range ${bad}: expected`),
      String(bad),
    );
  }
  const server = await startPortServer({
    address: uniqueName("pool-overlap"),
    pool: [[a + 2, b], [a, a + 2], [a + 1, a + 1]],
    log: () => {},
  });
  try {
    assert.equal(server.stats().numPortsManaged, 4);
    assert.equal(
      await sendRequest(server.address, `TAKE pid=${PID} count=4\n`),
      `OK ${a} ${a + 1} ${a + 2} ${b}\n`,
    );
  } finally {
    await server.stop();
    releaseRange([a, b]);
  }
});

test("the STATUS of every port held with a 100-character label, each entry as wide as the server writes one, fits PROTOCOL_LIMITS.statusReply", async () => {
  const label = "x".repeat(100);
  await withInProcessServer(
    { size: 1, name: "pool-wide" },
    async ({ address }) => {
      okPorts(await sendRequest(address, `TAKE pid=${PID} label=${label}\n`));
      const one = await status(address);
      const [entry] = one.allocations;
      assert.equal(entry.label, label);
      // The widest values: 5-digit ports, 10-digit pids.
      const allocations = Array.from({ length: 65535 }, (_, i) => ({
        ...entry,
        port: i + 1,
        pid: 0x7fffffff,
      }));
      const full = JSON.stringify({
        ...one,
        address: `@${"a".repeat(100)}`,
        pool: 65535,
        allocated: 65535,
        reclaimable: 0,
        allocations,
      }) + "\n";
      const bytes = new TextEncoder().encode(full).length;
      assert.ok(
        bytes <= PROTOCOL_LIMITS.statusReply,
        `${bytes} bytes > ${PROTOCOL_LIMITS.statusReply}`,
      );
    },
  );
});
