/**
 * Child of the bench: picks N ports with pickUnusedPort, no port server, then
 * checks one free port N times with isPortFree, and prints `{"rate": ports
 * per second, "checkRate": checks per second}`. Runs on Deno, Bun and Node.
 *
 * A pick needs at least one such check (a port is free only when it binds on
 * both protocols), so the check rate is the most a picker on this runtime
 * could reach.
 *
 * Usage: pick.ts N
 */

import process from "node:process";
import { isPortFree, pickUnusedPort } from "../mod.ts";

/** Enough picks for the JIT and the lazily loaded socket modules to settle. */
const WARM_UP = 20;

const count = Number(process.argv.at(-1));
if (!Number.isInteger(count) || count < 1) {
  throw new Error(`usage: pick.ts N (got ${process.argv.at(-1)})`);
}
for (let i = 0; i < WARM_UP; i++) await pickUnusedPort();
const began = performance.now();
for (let i = 0; i < count; i++) await pickUnusedPort();
const seconds = (performance.now() - began) / 1000;

const port = await pickUnusedPort();
for (let i = 0; i < WARM_UP; i++) await isPortFree(port);
const checksBegan = performance.now();
for (let i = 0; i < count; i++) {
  if (!await isPortFree(port)) throw new Error(`port ${port} was taken`);
}
const checkSeconds = (performance.now() - checksBegan) / 1000;
console.log(
  JSON.stringify({ rate: count / seconds, checkRate: count / checkSeconds }),
);
