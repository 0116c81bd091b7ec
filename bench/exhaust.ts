/**
 * Child of the bench: picks ports with pickUnusedPort in one process until it
 * throws NoFreePortFoundError (or until CAP ports, when CAP > 0), and prints
 * `{"distinct": ports, "exhausted": whether it failed, "seconds": time}`.
 *
 * Usage: exhaust.ts CAP
 */

import process from "node:process";
import { NoFreePortFoundError, pickUnusedPort } from "../mod.ts";

const cap = Number(process.argv.at(-1));
if (!Number.isInteger(cap) || cap < 0) {
  throw new Error(`usage: exhaust.ts CAP (got ${process.argv.at(-1)})`);
}
const ports = new Set<number>();
let exhausted = false;
const began = performance.now();
while (cap === 0 || ports.size < cap) {
  try {
    ports.add(await pickUnusedPort());
  } catch (error) {
    if (!(error instanceof NoFreePortFoundError)) throw error;
    exhausted = true;
    break;
  }
}
const seconds = (performance.now() - began) / 1000;
console.log(JSON.stringify({ distinct: ports.size, exhausted, seconds }));
