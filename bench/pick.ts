/**
 * Child of the bench: picks N ports with pickUnusedPort, no port server, and
 * prints `{"rate": ports per second}`. Runs on Deno, Bun and Node.
 *
 * Usage: pick.ts N
 */

import process from "node:process";
import { pickUnusedPort } from "../mod.ts";

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
console.log(JSON.stringify({ rate: count / seconds }));
