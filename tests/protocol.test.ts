/**
 * The wire protocol: what the server answers to each request, good or bad,
 * over a real Unix socket (a server in this process, startPortServer); the
 * library's client functions against it; the label rule both halves share;
 * and LineReader, the framing both use.
 */

import assert from "node:assert/strict";
import test from "node:test";
import {
  getPortFromPortServer,
  getPortServerStatus,
  isLabel,
  leasePorts,
  LineReader,
  pickUnusedPorts,
  PROTOCOL_LIMITS,
  returnPortsToServer,
} from "../mod.ts";
import {
  exchange,
  sendRequest,
  withInProcessServer,
} from "./server_helpers.ts";

/** A live process: this test's own. */
const PID = process.pid;

// ---------------------------------------------------------------------------
// Extended requests.

test("each malformed extended request gets one ERR line that names what is wrong, and nothing is allocated", async () => {
  const tooMany = Array.from({ length: 1001 }, (_, i) => i + 1).join(",");
  const cases: [string, string][] = [
    ["TAKE pid=1 pid=2", 'duplicate key "pid" in TAKE'],
    ["TAKE pid=1 bogus=1", 'unexpected "bogus=1" in TAKE'],
    ["TAKE pid=1 count", 'unexpected "count" in TAKE'],
    ["TAKE count=1", "TAKE needs pid="],
    ["RETURN pid=5", "RETURN needs ports="],
    ["LEASE pid=5", 'unexpected "pid=5" in LEASE'],
    ["TAKE pid=1 count=0", 'invalid count "0": expected 1 to 1000'],
    ["TAKE pid=1 count=1001", 'invalid count "1001": expected 1 to 1000'],
    ["LEASE count=abc", 'invalid count "abc": expected 1 to 1000'],
    [
      "TAKE pid=12345678901",
      'invalid pid "12345678901": expected 0 to 9999999999',
    ],
    ["TAKE pid=-1", 'invalid pid "-1": expected 0 to 9999999999'],
    [
      `TAKE pid=1 label=${"x".repeat(101)}`,
      "a label has 1 to 100 printable characters",
    ],
    ["TAKE pid=1 label=", "a label has 1 to 100 printable characters"],
    ["TAKE pid=1 label=caf\u00e9", "not one line of printable ASCII"],
    ["TAKE pid=1\tcount=1", "not one line of printable ASCII"],
    ["RETURN pid=1 ports=1,1", "port 1 named twice"],
    ["RETURN pid=1 ports=0", 'invalid port "0"'],
    ["RETURN pid=1 ports=65536", 'invalid port "65536"'],
    ["RETURN pid=1 ports=1,,2", 'invalid port ""'],
    ["RETURN pid=1 ports=0x10", 'invalid port "0x10"'],
    [`RETURN pid=1 ports=${tooMany}`, "more than 1000 ports in RETURN"],
    ["STATUS now", 'unexpected "now" in STATUS'],
  ];
  await withInProcessServer(
    { size: 2, name: "proto-err" },
    async ({ address, server }) => {
      for (const [request, error] of cases) {
        assert.equal(
          await sendRequest(address, `${request}\n`),
          `ERR ${error}\n`,
          request,
        );
      }
      const stats = server.stats();
      assert.equal(stats.clientRequestErrors, cases.length);
      assert.equal(stats.totalAllocations, 0);
      assert.equal(stats.numPortsAllocated, 0);
    },
  );
});

test("the largest requests are taken whole; a request line of 8192 bytes is answered, one of 8193 is an ERR before its newline", async () => {
  await withInProcessServer(
    { size: 2, name: "proto-limits" },
    async ({ address }) => {
      const label = "x".repeat(100);
      assert.equal(
        await sendRequest(
          address,
          `TAKE pid=${PID} count=1000 label=${label}\n`,
        ),
        "ERR fewer than 1000 ports free\n",
      );
      // RETURN of 1000 five-digit ports by the largest pid: parsed, then refused.
      const ports = Array.from({ length: 1000 }, (_, i) => 64535 + i);
      const largest = `RETURN pid=9999999999 ports=${ports.join(",")}\n`;
      assert.ok(largest.length <= PROTOCOL_LIMITS.request);
      assert.equal(
        await sendRequest(address, largest),
        `ERR not held by pid 9999999999: ${ports.join(" ")}\n`,
      );
      // White space between words is free: pad STATUS to the limit.
      const exact = `STATUS${" ".repeat(PROTOCOL_LIMITS.request - 7)}\n`;
      assert.equal(exact.length, PROTOCOL_LIMITS.request);
      assert.match(await sendRequest(address, exact), /^\{"address":.*\}\n$/);
      assert.equal(
        await sendRequest(address, exact.replace("\n", " \n")),
        `ERR a line longer than ${PROTOCOL_LIMITS.request} bytes\n`,
      );
      // Without a newline, the ERR comes as soon as the limit is passed.
      assert.equal(
        await sendRequest(address, exact.replace("\n", "  ")),
        `ERR a line longer than ${PROTOCOL_LIMITS.request} bytes and no newline yet\n`,
      );
    },
  );
});

test("an extended request split across reads, at any byte, is answered as a whole; CRLF ends a line too", async () => {
  await withInProcessServer(
    { size: 2, name: "proto-split", options: { timeoutMs: 30_000 } },
    async ({ range: [r0], address }) => {
      const status = "STATUS\n";
      for (let cut = 1; cut < status.length; cut++) {
        const reply = await sendRequest(address, {
          delayMs: 30,
          pieces: [status.slice(0, cut), status.slice(cut)],
        });
        assert.match(reply, /^\{"address":.*\}\n$/, `cut at ${cut}`);
      }
      const take = `TAKE pid=${PID} count=1 label=split\n`;
      assert.equal(
        await sendRequest(address, { delayMs: 10, pieces: [...take] }),
        `OK ${r0}\n`,
      );
      assert.equal(
        await sendRequest(address, `RETURN pid=${PID} ports=${r0}\r\n`),
        `OK ${r0}\n`,
      );
    },
  );
});

// ---------------------------------------------------------------------------
// Classic requests: Python's server reads the pid with int(), and answers a
// request it cannot parse by closing with nothing written.

/** `n` written with `_` between its digits, as Python's int() takes it. */
function underscored(n: number): string {
  return [...String(n)].join("_");
}

test("classic requests are read as Python's int() reads them: a bad one is closed unanswered, a good one is answered at once, newline or not", async () => {
  await withInProcessServer(
    { size: 5, name: "proto-classic" },
    async ({ range, address, server }) => {
      const unparsable = [
        "\n",
        "99Z\n",
        "99 8\n",
        "1_\n",
        "1__2\n",
        "0x10\n",
        "\u0661\u0662\n", // Arabic-Indic digits: int() takes them, not as bytes
        `${"9".repeat(35)}\n`,
        `${" ".repeat(20)}${PID}\n`, // past 20 bytes
      ];
      for (const request of unparsable) {
        assert.equal(await sendRequest(address, request), "", request);
      }
      assert.equal(server.stats().clientRequestErrors, unparsable.length);
      // Nothing at all, then the end: no request, no error.
      const empty = await exchange(address, "", { end: true });
      assert.equal(empty.bytes.length, 0);

      // Parsed: answered with a port, or refused for the pid, never an error.
      const parsed = [
        "8", // no newline: the connection left open, answered all the same
        " +12_3 \n",
        "-5\n",
        `${"1".repeat(19)}\n`,
      ];
      for (const request of parsed) {
        assert.match(
          await sendRequest(address, request),
          /^(\d+\n)?$/,
          request,
        );
      }
      const stats = server.stats();
      assert.equal(stats.clientRequestErrors, unparsable.length);
      assert.equal(
        stats.totalAllocations + stats.deniedAllocations,
        parsed.length,
      );

      // Every form of int() at once, for this process: a port, held by it.
      const reply = await sendRequest(
        address,
        `\t+${underscored(PID)}\x0b\n`,
      );
      assert.match(reply, /^\d+\n$/);
      const port = Number(reply);
      assert.ok(port >= range[0] && port <= range[1], `${port}`);
      const held = (await getPortServerStatus(address)).allocations
        .find((a) => a.port === port);
      assert.equal(held?.pid, PID);
    },
  );
});

// ---------------------------------------------------------------------------
// Both halves together.

test("the label rule: the server takes exactly the labels isLabel takes, and the library refuses the others before asking", async () => {
  const labels = [
    "a",
    "x".repeat(100),
    "web-1_2.3:4/5",
    "!~{}\"'",
    "",
    "x".repeat(101),
    "two words",
    "caf\u00e9",
    "tab\there",
  ];
  await withInProcessServer(
    { size: 1, name: "proto-label" },
    async ({ range: [r0], address, server }) => {
      for (const label of labels) {
        const reply = await sendRequest(
          address,
          `TAKE pid=${PID} label=${label}\n`,
        );
        const what = JSON.stringify(label);
        if (isLabel(label)) {
          assert.equal(reply, `OK ${r0}\n`, what);
          const [held] = (await getPortServerStatus(address)).allocations;
          assert.equal(held.label, label, what);
          await returnPortsToServer(address, [r0]);
        } else {
          assert.match(reply, /^ERR /, what);
          await assert.rejects(
            leasePorts(1, { portserverAddress: address, label }),
            (e: Error) => e instanceof TypeError && /label/.test(e.message),
            what,
          );
          await assert.rejects(
            pickUnusedPorts(1, { portserverAddress: address, label }),
            (e: Error) => e instanceof TypeError && /label/.test(e.message),
            what,
          );
        }
      }
      const refused = labels.filter((l) => !isLabel(l));
      assert.equal(refused.length, 5);
      // Only the raw requests above reached the server, not the library's.
      assert.equal(server.stats().clientRequestErrors, refused.length);
    },
  );
});

test("the library's client functions against our server: each request is understood and each reply read right", async () => {
  await withInProcessServer(
    { size: 10, name: "proto-lib" },
    async ({ range, address, waitForLog }) => {
      const [r0] = range;
      const view = async () =>
        (await getPortServerStatus(address)).allocations.map((
          a,
        ) => [a.port, a.pid, a.lease, a.alive, a.label]);

      // One TAKE of 3 (the range keeps ports this process already has out).
      const picked = await pickUnusedPorts(3, {
        portserverAddress: address,
        label: "rt-pick",
        range,
      });
      assert.deepEqual(picked, [r0, r0 + 1, r0 + 2]);
      const status = await getPortServerStatus(address);
      assert.deepEqual(
        [status.address, status.pool, status.allocated, status.reclaimable],
        [address, 10, 3, 0],
      );
      assert.ok(status.allocations.every((a) => !isNaN(Date.parse(a.since))));

      const lease = await leasePorts(2, {
        portserverAddress: address,
        label: "rt-lease",
      });
      assert.deepEqual(lease.ports, [r0 + 3, r0 + 4]);
      assert.deepEqual(await view(), [
        [r0, PID, false, true, "rt-pick"],
        [r0 + 1, PID, false, true, "rt-pick"],
        [r0 + 2, PID, false, true, "rt-pick"],
        [r0 + 3, null, true, true, "rt-lease"],
        [r0 + 4, null, true, true, "rt-lease"],
      ]);

      assert.deepEqual(await returnPortsToServer(address, picked), picked);
      const one = await getPortFromPortServer(address);
      assert.equal(one, r0 + 5);
      assert.deepEqual(await view(), [
        [r0 + 3, null, true, true, "rt-lease"],
        [r0 + 4, null, true, true, "rt-lease"],
        [r0 + 5, PID, false, true, null],
      ]);

      await lease.release();
      await waitForLog(/Lease of ports .* ended/);
      assert.deepEqual(await view(), [[r0 + 5, PID, false, true, null]]);

      assert.deepEqual(await returnPortsToServer(address, [one!]), [one]);
      // A refusal is read as one, naming the port.
      await assert.rejects(
        returnPortsToServer(address, [one!]),
        new RegExp(`not held by pid ${PID}: ${one}`),
      );
      assert.deepEqual(await view(), []);
    },
  );
});

// ---------------------------------------------------------------------------
// LineReader: the framing both halves use.

const bytes = (text: string) => new TextEncoder().encode(text);

/** Feeds `text` to a reader in pieces cut at `cuts`; the lines it gave. */
function feed(reader: LineReader, text: string, cuts: number[]): string[] {
  const all = bytes(text);
  const lines: string[] = [];
  let from = 0;
  for (const to of [...cuts, all.length]) {
    const line = reader.push(all.subarray(from, to));
    if (line !== undefined) lines.push(line);
    from = to;
  }
  return lines;
}

test("LineReader: the largest RETURN split at every byte gives the whole line once", () => {
  const ports = Array.from({ length: 1000 }, (_, i) => 64535 + i);
  const line = `RETURN pid=9999999999 ports=${ports.join(",")}\n`;
  for (let cut = 0; cut <= line.length; cut++) {
    const reader = new LineReader(PROTOCOL_LIMITS.request);
    assert.deepEqual(feed(reader, line, [cut]), [line.slice(0, -1)], `${cut}`);
  }
  // Every byte its own chunk.
  const reader = new LineReader(PROTOCOL_LIMITS.request);
  const cuts = Array.from({ length: line.length - 1 }, (_, i) => i + 1);
  assert.deepEqual(feed(reader, line, cuts), [line.slice(0, -1)]);
});

test("LineReader: a line of exactly the limit is taken; one byte more is an error before the newline", () => {
  const limit = 64;
  const exact = "x".repeat(limit - 1) + "\n";
  for (const cut of [0, 10, limit - 1]) {
    const reader = new LineReader(limit);
    assert.deepEqual(feed(reader, exact, [cut]), ["x".repeat(limit - 1)]);
  }
  const over = "x".repeat(limit) + "\n";
  for (const cut of [0, 10, limit]) {
    const reader = new LineReader(limit);
    assert.throws(() => feed(reader, over, [cut]), RangeError, `${cut}`);
  }
  // Without a newline, the error comes as soon as the limit is passed.
  const reader = new LineReader(limit);
  assert.equal(reader.push(bytes("x".repeat(limit))), undefined);
  assert.equal(reader.pending.length, limit);
  assert.throws(() => reader.push(bytes("x")), /longer than 64 bytes/);
});

test("LineReader: bytes after the newline are not part of the line; an incomplete line stays pending", () => {
  const reader = new LineReader(100);
  assert.equal(reader.push(bytes("OK 150")), undefined);
  assert.equal(new TextDecoder().decode(reader.pending), "OK 150");
  assert.equal(reader.push(bytes("00\nrest")), "OK 15000");
  assert.equal(reader.pending.length, 0);
});
