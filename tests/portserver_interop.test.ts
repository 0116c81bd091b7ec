/**
 * Our port server with Debian's Python client (python3-portpicker): over an
 * abstract name and a socket file, from `cli.ts serve` on the runtime running
 * the test and from the binary compiled by `bun build --compile`.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  COMPILE_ARGS,
  type Proc,
  PYTHON,
  requirePython,
  run,
  start,
  tempDir,
  tool,
  uniqueName,
} from "./helpers.ts";
import {
  ADDRESS_KINDS,
  freshAddress,
  poolSpec,
  randomPool,
  startServer,
} from "./server_helpers.ts";

/** Three pick_unused_port() calls in one Python process, as PORTSERVER_ADDRESS tells. */
const PICK_THREE = `
import portpicker
print(" ".join(str(portpicker.pick_unused_port()) for _ in range(3)))
`;

/** Runs PICK_THREE against `address`; checks the ports came from `range`. */
async function assertPythonGetsPorts(
  address: string,
  range: readonly [number, number],
): Promise<void> {
  requirePython();
  const result = await run([PYTHON, "-c", PICK_THREE], {
    env: { PORTSERVER_ADDRESS: address },
    timeoutMs: 20_000,
  });
  assert.equal(result.code, 0, `${address}: ${result.stderr}`);
  // The Python client falls back to picking itself when the server fails:
  // then it says so on stderr and its port is outside the pool.
  assert.equal(result.stderr, "", address);
  assert.match(result.stdout, /^\d+ \d+ \d+\n$/, address);
  const ports = result.stdout.trim().split(" ").map(Number);
  for (const port of ports) {
    assert.ok(
      port >= range[0] && port <= range[1],
      `${address}: ${port} not in ${range}`,
    );
  }
  assert.equal(new Set(ports).size, 3, `${address}: not distinct: ${ports}`);
}

for (const kind of ADDRESS_KINDS) {
  test(
    `Debian's Python client gets distinct pool ports from our server on a${
      kind === "abstract name" ? "n" : ""
    } ${kind}`,
    async () => {
      const range = await randomPool(10);
      const { address, remove } = freshAddress(kind, "ps-interop");
      const server = await startServer([
        "--pool",
        poolSpec(range),
        "--address",
        address,
      ]);
      try {
        await assertPythonGetsPorts(address, range);
      } finally {
        await server.stop("SIGKILL");
        remove();
      }
    },
  );
}

test("the compiled binary (bun build --compile) serves the Python client", async () => {
  const range = await randomPool(10);
  const address = uniqueName("ps-binary");
  const dir = tempDir("portpicker-bin-");
  let server: Proc | undefined;
  try {
    const bin = join(dir.path, "portpicker");
    const built = await run([tool("bun"), ...COMPILE_ARGS, "--outfile", bin], {
      timeoutMs: 120_000,
    });
    assert.equal(
      built.code,
      0,
      `bun build --compile: ${built.stderr}${built.stdout}`,
    );
    server = start([
      bin,
      "serve",
      "--pool",
      poolSpec(range),
      "--address",
      address,
    ], {
      PORTSERVER_ADDRESS: undefined,
    });
    await server.waitFor(/Serving on/, 20_000);
    await assertPythonGetsPorts(address, range);
  } finally {
    await server?.stop("SIGKILL");
    dir.remove();
  }
});
