/**
 * The load client of the bench: the same client, run with Node, drives every
 * port server. C loops each send one request per connection, as the Python
 * client does (connect, the pid and a newline, read to the end), and time it.
 * Prints `{"rps", "p50Ms", "p99Ms", "ok", "empty", "errors"}`.
 *
 * Usage: node load.ts --address @name --pids A[,B] [--share X]
 *          --requests N --concurrency C [--warmup W [--handshake]]
 *
 * With two pids, request i is for A when (i % 10) < X / 10, else for B: the
 * two owners' ports are interleaved through the server's rotation.
 *
 * `--warmup W` first sends W untimed requests for pid 1, which every server
 * refuses without touching its pool: the client's and the server's code are
 * warm, and runs of 500 and 2000 requests compare fairly. `--handshake` then
 * prints `warm` and waits for a line on stdin before the timed requests, so
 * that the caller can read the server's CPU time right before them.
 */

import { connect } from "node:net";
import { once } from "node:events";
import process from "node:process";
import { parseArgs } from "node:util";

/** A request that takes longer than this is counted as an error. */
const REQUEST_TIMEOUT_MS = 10_000;

/** The outcome of one request. */
type Outcome = "ok" | "empty" | "error";

/** What the client prints. */
export interface LoadResult {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  ok: number;
  empty: number;
  errors: number;
}

/** `@name` is the Linux abstract namespace: a NUL, then the name. */
function socketPath(address: string): string {
  return address.startsWith("@") ? `\0${address.slice(1)}` : address;
}

/** One request on its own connection. */
function request(path: string, pid: number): Promise<Outcome> {
  return new Promise((resolve) => {
    let reply = "";
    let settled = false;
    const finish = (outcome: Outcome) => {
      if (settled) return;
      settled = true;
      socket.destroy();
      resolve(outcome);
    };
    const socket = connect({ path }, () => socket.write(`${pid}\n`));
    socket.setEncoding("latin1");
    socket.setTimeout(REQUEST_TIMEOUT_MS, () => finish("error"));
    socket.on("data", (chunk: string) => reply += chunk);
    socket.on("end", () => finish(/^\d+\n$/.test(reply) ? "ok" : "empty"));
    socket.on("error", () => finish("error"));
  });
}

/** The q-quantile of sorted values, nearest rank. */
function quantile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.ceil(q * sorted.length) - 1;
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank))];
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      address: { type: "string" },
      pids: { type: "string" },
      share: { type: "string", default: "100" },
      requests: { type: "string" },
      concurrency: { type: "string", default: "1" },
      warmup: { type: "string", default: "0" },
      handshake: { type: "boolean", default: false },
    },
  });
  const pids = (values.pids ?? "").split(",").map(Number);
  const share = Number(values.share);
  const total = Number(values.requests);
  const concurrency = Number(values.concurrency);
  const warmup = Number(values.warmup);
  if (
    !values.address || pids.length < 1 || pids.length > 2 ||
    !pids.every((p) => Number.isInteger(p) && p > 0) ||
    !Number.isInteger(total) || total < 0 ||
    !Number.isInteger(concurrency) || concurrency < 1 ||
    !Number.isInteger(warmup) || warmup < 0 ||
    !(share >= 0 && share <= 100)
  ) {
    throw new Error(
      "usage: load.ts --address ADDR --pids A[,B] [--share X] --requests N --concurrency C [--warmup W [--handshake]]",
    );
  }
  const path = socketPath(values.address);
  const pidFor = (i: number): number =>
    pids.length === 1 || (i % 10) < share / 10 ? pids[0] : pids[1];

  let warmed = 0;
  const warm = async (): Promise<void> => {
    while (warmed++ < warmup) await request(path, 1);
  };
  await Promise.all(Array.from({ length: concurrency }, warm));
  if (values.handshake) {
    console.log("warm");
    process.stdin.setEncoding("utf8");
    await once(process.stdin, "data");
    process.stdin.pause();
  }

  const latencies = new Float64Array(total);
  const counts: Record<Outcome, number> = { ok: 0, empty: 0, error: 0 };
  let next = 0;
  const loop = async (): Promise<void> => {
    // Requests are taken in index order, so the pids reach the server
    // interleaved as planned even with several loops.
    while (next < total) {
      const i = next++;
      const began = process.hrtime.bigint();
      counts[await request(path, pidFor(i))]++;
      latencies[i] = Number(process.hrtime.bigint() - began) / 1e6;
    }
  };
  const began = process.hrtime.bigint();
  await Promise.all(Array.from({ length: concurrency }, loop));
  const seconds = Number(process.hrtime.bigint() - began) / 1e9;
  latencies.sort();
  const result: LoadResult = {
    rps: total / seconds,
    p50Ms: quantile(latencies, 0.5),
    p99Ms: quantile(latencies, 0.99),
    ok: counts.ok,
    empty: counts.empty,
    errors: counts.error,
  };
  console.log(JSON.stringify(result));
}

await main();
