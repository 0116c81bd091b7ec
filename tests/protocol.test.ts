/**
 * The wire protocol, in process: round trips of every request and reply,
 * framing with a message split at every byte, each limit and one past it.
 */

import assert from "node:assert/strict";
import test from "node:test";
import {
  formatReply,
  formatRequest,
  isExtendedRequest,
  LineReader,
  parseClassicReply,
  parseClassicRequest,
  parseReply,
  parseRequest,
  parseStatus,
  PROTOCOL_LIMITS,
  type ServerRequest,
} from "../mod.ts";

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

const LARGEST_RETURN: ServerRequest = {
  verb: "RETURN",
  pid: 0x7fffffff,
  ports: Array.from({ length: 1000 }, (_, i) => 64535 + i),
};

test("every request round-trips through formatRequest and parseRequest", () => {
  const requests: ServerRequest[] = [
    { verb: "STATUS" },
    { verb: "TAKE", pid: 1234, count: 1 },
    { verb: "TAKE", pid: 1234, count: 1000, label: "x".repeat(100) },
    { verb: "LEASE", count: 3 },
    { verb: "LEASE", count: 2, label: "e2e" },
    { verb: "RETURN", pid: 99, ports: [1, 65535] },
    LARGEST_RETURN,
  ];
  for (const request of requests) {
    const line = formatRequest(request);
    assert.ok(line.endsWith("\n"));
    assert.ok(line.length <= PROTOCOL_LIMITS.request, `${line.length} bytes`);
    assert.deepEqual(parseRequest(line.slice(0, -1)), request);
  }
});

test("parseRequest refuses unknown, repeated and missing keys, and bad values, naming them", () => {
  const cases: [string, RegExp][] = [
    ["TAKE pid=1 pid=2", /duplicate key "pid"/],
    ["TAKE pid=1 bogus=1", /unexpected "bogus=1"/],
    ["TAKE count=1", /TAKE needs pid=/],
    ["RETURN pid=5", /RETURN needs ports=/],
    ["LEASE pid=5", /unexpected "pid=5"/],
    ["TAKE pid=1 count=0", /invalid count "0"/],
    ["TAKE pid=1 count=1001", /invalid count "1001"/],
    ["TAKE pid=12345678901", /invalid pid/],
    ["TAKE pid=1 label=" + "x".repeat(101), /label/],
    ["RETURN pid=1 ports=1,1", /port 1 named twice/],
    ["RETURN pid=1 ports=0", /invalid port "0"/],
    ["RETURN pid=1 ports=65536", /invalid port "65536"/],
    ["RETURN pid=1 ports=1,,2", /invalid port ""/],
    ["STATUS now", /unexpected "now"/],
    ["FROB", /unknown request "FROB"/],
    ["TAKE pid=1\u00e9", /printable ASCII/],
  ];
  for (const [line, error] of cases) {
    const parsed = parseRequest(line);
    assert.ok("error" in parsed, `${line} was accepted`);
    assert.match(parsed.error, error, line);
  }
  const tooMany = Array.from({ length: 1001 }, (_, i) => i + 1).join(",");
  const parsed = parseRequest(`RETURN pid=1 ports=${tooMany}`);
  assert.ok("error" in parsed && /more than 1000 ports/.test(parsed.error));
});

test("replies round-trip; a malformed reply is an error naming it, never a prefix", () => {
  const ports = Array.from({ length: 1000 }, (_, i) => 64535 + i);
  const ok = formatReply({ ok: true, ports });
  assert.ok(ok.length <= PROTOCOL_LIMITS.reply, `${ok.length} bytes`);
  assert.deepEqual(parseReply(ok.slice(0, -1), 1000), { ok: true, ports });
  assert.deepEqual(
    parseReply(formatReply({ ok: false, error: "all ports in use" }).trim(), 1),
    { ok: false, error: "all ports in use" },
  );
  for (
    const [line, count] of [
      ["OK 0", 1],
      ["OK 99999", 1],
      ["OK 12abc", 1],
      ["OK 15000", 2],
      ["OK 15000 15000", 2],
      ["OK", 1],
      ["15000", 1],
      ["OK  15000", 1],
    ] as const
  ) {
    assert.throws(
      () => parseReply(line, count, "@srv"),
      /Bad reply from the port server at @srv/,
      line,
    );
  }
});

test("classic requests and replies are parsed as the Python server and client do", () => {
  const pid = (text: string) => parseClassicRequest(bytes(text));
  assert.equal(pid("1234\n"), 1234);
  assert.equal(pid("8"), 8);
  assert.equal(pid(" +1_000 \n"), 1000);
  assert.equal(pid("-5\n"), -5);
  for (const bad of ["", "\n", "99Z\n", "99 8\n", "1".repeat(21)]) {
    assert.equal(pid(bad), undefined, JSON.stringify(bad));
  }
  assert.equal(pid("1".repeat(19) + "\n"), Number("1".repeat(19)));
  assert.equal(parseClassicReply("15000"), 15000);
  for (const bad of ["", "0", "65536", "12abc", "80x", "-1", " 80"]) {
    assert.equal(parseClassicReply(bad), undefined, bad);
  }
  assert.equal(isExtendedRequest(bytes("STATUS\n")), true);
  assert.equal(isExtendedRequest(bytes("TAKE pid=1\n")), true);
  assert.equal(isExtendedRequest(bytes("TAKEN\n")), false);
  assert.equal(isExtendedRequest(bytes("1234\n")), false);
});

test("LineReader: the largest RETURN split at every byte gives the whole line once", () => {
  const line = formatRequest(LARGEST_RETURN);
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
  assert.equal(reader.size, limit);
  assert.throws(() => reader.push(bytes("x")), /longer than 64 bytes/);
});

test("LineReader: bytes after the newline are not part of the line; an incomplete line stays pending", () => {
  const reader = new LineReader(100);
  assert.equal(reader.push(bytes("OK 150")), undefined);
  assert.equal(new TextDecoder().decode(reader.bytes()), "OK 150");
  assert.equal(reader.push(bytes("00\nrest")), "OK 15000");
  assert.equal(reader.size, 0);
});

test("parseStatus checks every field of the status schema", () => {
  const good = {
    address: "@x",
    pool: 2,
    allocated: 1,
    reclaimable: 0,
    allocations: [{
      port: 20000,
      pid: 42,
      lease: false,
      alive: true,
      since: "2026-01-01T00:00:00.000Z",
      label: null,
    }],
  };
  assert.deepEqual(parseStatus(JSON.stringify(good)), good);
  const broken: unknown[] = [
    { ...good, pool: -1 },
    { ...good, reclaimable: undefined },
    { ...good, allocations: [{ ...good.allocations[0], port: 0 }] },
    { ...good, allocations: [{ ...good.allocations[0], alive: "yes" }] },
    { ...good, allocations: [{ ...good.allocations[0], pid: "42" }] },
  ];
  for (const status of broken) {
    assert.throws(
      () => parseStatus(JSON.stringify(status), "@x"),
      /Bad status from the port server at @x/,
    );
  }
  assert.throws(() => parseStatus("{", "@x"), /not JSON/);
});
