/**
 * Child of the bench: N ports from get-port (npm), run with Node, and prints
 * `{"rate": ports per second}`. get-port is a development dependency of the
 * bench only, never of the library.
 *
 * Usage: node getport.mjs N
 */

import process from "node:process";
import getPort from "get-port";

/** The same warm-up as pick.ts. */
const WARM_UP = 20;

const count = Number(process.argv.at(-1));
if (!Number.isInteger(count) || count < 1) {
  throw new Error(`usage: getport.mjs N (got ${process.argv.at(-1)})`);
}
for (let i = 0; i < WARM_UP; i++) await getPort();
const began = performance.now();
for (let i = 0; i < count; i++) await getPort();
const seconds = (performance.now() - began) / 1000;
console.log(JSON.stringify({ rate: count / seconds }));
