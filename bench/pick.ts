/**
 * Child of the bench, on Deno, Bun or Node, with no port server.
 *
 * `pick.ts N` picks N ports with pickUnusedPort, then checks one free port N
 * times with isPortFree, each after 20 untimed calls, and prints `{"rate":
 * ports/s, "checkRate": checks/s}`. A pick needs at least one such check (a
 * port is free only when it binds on both protocols), so the check rate is
 * the most a picker on this runtime could reach.
 *
 * `pick.ts getport N`, on Node, takes N ports from get-port (npm) alike and
 * prints `{"rate": ports/s}`. get-port is a development dependency of the
 * bench only, never of the library.
 *
 * `pick.ts exhaust CAP` picks until NoFreePortFoundError (or CAP ports, when
 * CAP > 0) and prints `{"distinct", "exhausted", "seconds"}`.
 */

import process from "node:process";
import { isPortFree, NoFreePortFoundError, pickUnusedPort } from "../mod.ts";

const [mode, arg] = process.argv.slice(-2);
const n = Number(arg);

/** Calls per second of `f`, after 20 untimed calls. */
async function rate(f: () => Promise<unknown>): Promise<number> {
  for (let i = 0; i < 20; i++) await f();
  const began = performance.now();
  for (let i = 0; i < n; i++) await f();
  return n / (performance.now() - began) * 1000;
}

if (mode === "exhaust") {
  const ports = new Set<number>();
  let exhausted = false;
  const began = performance.now();
  try {
    while (n === 0 || ports.size < n) ports.add(await pickUnusedPort());
  } catch (error) {
    if (!(error instanceof NoFreePortFoundError)) throw error;
    exhausted = true;
  }
  const seconds = (performance.now() - began) / 1000;
  console.log(JSON.stringify({ distinct: ports.size, exhausted, seconds }));
} else if (mode === "getport") {
  const { default: getPort } = await import("get-port");
  console.log(JSON.stringify({ rate: await rate(getPort) }));
} else {
  const picks = await rate(pickUnusedPort);
  const port = await pickUnusedPort();
  const checks = await rate(async () => {
    if (!await isPortFree(port)) throw new Error(`port ${port} was taken`);
  });
  console.log(JSON.stringify({ rate: picks, checkRate: checks }));
}
