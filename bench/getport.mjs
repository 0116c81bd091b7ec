/**
 * Child of the bench: `node getport.mjs N` takes N ports from get-port (npm)
 * after pick.ts's 20 untimed calls and prints `{"rate": ports/s}`. get-port
 * is a development dependency of the bench only, never of the library.
 */

import process from "node:process";
import getPort from "get-port";

const n = Number(process.argv.at(-1));
for (let i = 0; i < 20; i++) await getPort();
const began = performance.now();
for (let i = 0; i < n; i++) await getPort();
console.log(JSON.stringify({ rate: n / (performance.now() - began) * 1000 }));
