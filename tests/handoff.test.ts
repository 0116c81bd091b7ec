/**
 * Beyond the Python original: a reservation handed to the caller's own server
 * with SO_REUSEPORT (no moment in which another process can take the port),
 * and waiting until a server accepts connections.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { join } from "node:path";
import {
  pickUnusedPort,
  reservePort,
  returnPort,
  waitForPort,
} from "../mod.ts";
import {
  assertSubcommandError,
  canBindWithPython,
  type HoldKind,
  MOD_URL,
  PYTHON,
  run,
  runCli,
  runScript,
  RUNTIME,
  start,
  tempDir,
  tool,
} from "./helpers.ts";

// deno-lint-ignore no-explicit-any
const g = globalThis as any;

/** Plain binds by another process, without SO_REUSEPORT. */
const PLAIN: readonly HoldKind[] = ["tcp4", "tcp6only", "dual"];

async function assertNoPlainBind(port: number, when: string): Promise<void> {
  for (const kind of PLAIN) {
    assert.equal(
      await canBindWithPython(kind, port),
      false,
      `a plain ${kind} bind took port ${port} ${when}`,
    );
  }
}

/** An HTTP server on this runtime's own API, with reusePort; resolves once it listens. */
async function serveHttp(port: number): Promise<() => Promise<void>> {
  if (RUNTIME === "deno") {
    const server = g.Deno.serve(
      { hostname: "::", port, reusePort: true, onListen() {} },
      () => new Response("hi"),
    );
    return () => server.shutdown();
  }
  if (RUNTIME === "bun") {
    const server = g.Bun.serve({
      hostname: "::",
      port,
      reusePort: true,
      fetch: () => new Response("hi"),
    });
    return () => server.stop(true);
  }
  const server = createServer((_, response) => response.end("hi"));
  await new Promise<void>((resolve) =>
    server.listen({ port, reusePort: true }, resolve)
  );
  return () => new Promise((resolve) => server.close(() => resolve()));
}

/** Fetches from the port until the server answers (connections may land on the reservation while it holds). */
async function answer(port: number): Promise<string> {
  const response = await fetch(`http://127.0.0.1:${port}/`);
  return await response.text();
}

test("reservePort({ reusePort: true }): the caller's HTTP server takes over the port, and a plain bind by another process fails before, during and after the hand-off", async () => {
  const reservation = await reservePort({ reusePort: true });
  const { port } = reservation;
  let stop: (() => Promise<void>) | undefined;
  try {
    await assertNoPlainBind(port, "while reserved");
    stop = await serveHttp(port);
    await assertNoPlainBind(port, "while both hold it");
    await reservation.release();
    await assertNoPlainBind(port, "after the release");
    assert.equal(await answer(port), "hi");
  } finally {
    await reservation.release();
    await stop?.();
    returnPort(port);
  }
});

test(
  "reservePort({ reusePort: true }) on Deno without --unstable-net throws an error naming reusePort and the flag",
  {
    skip: RUNTIME !== "deno" ? "about Deno's flags only" : false,
  },
  async () => {
    const result = await runScript(
      `import { reservePort } from ${
        JSON.stringify(new URL("../mod.ts", import.meta.url).href)
      };
try {
  await reservePort({ reusePort: true });
  console.log("reserved");
} catch (error) {
  console.log(error.message);
}`,
      {
        command: (
          path,
        ) => [g.Deno.execPath(), "run", "-A", "--no-config", path],
      },
    );
    assert.match(
      result.stdout,
      /^Cannot reserve port \d+ with reusePort: Deno needs --unstable-net for it\n$/,
      result.stderr,
    );
  },
);

test("reservePort rejects a reusePort that is not a boolean, naming it", async () => {
  await assert.rejects(
    () => reservePort({ reusePort: "yes" as unknown as boolean }),
    (error: Error) =>
      error instanceof TypeError &&
      /Invalid reusePort "yes"/.test(error.message),
  );
});

/** A Python process that starts listening on `port` once it reads a line. */
function lateListener(port: number) {
  const script = `
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("", int(sys.argv[1])))
s.listen(8)
print("listening", flush=True)
sys.stdin.read()
`;
  const proc = start([PYTHON, "-c", script, String(port)]);
  return {
    listen: () => proc.child.stdin!.write("go\n"),
    proc,
  };
}

test("waitForPort resolves once a listener appears late, rejects naming the port and timeout when none does, and honours an AbortSignal", async () => {
  const port = await pickUnusedPort();
  const late = lateListener(port);
  try {
    let resolved = false;
    const waiting = waitForPort(port, { timeout: 60_000 }).then(() =>
      resolved = true
    );
    // Not before the listener exists: it listens only when told to.
    await assert.rejects(
      () => waitForPort(port, { timeout: 50 }),
      new RegExp(
        `^Error: Port ${port} did not accept connections on 127\\.0\\.0\\.1 or ::1 within 50 ms$`,
      ),
    );
    assert.equal(resolved, false);
    late.listen();
    await late.proc.waitFor(/listening/);
    await waiting;
    await waitForPort(port, { hostname: "::1", timeout: 1000 });
  } finally {
    await late.proc.stop("SIGKILL");
  }

  const controller = new AbortController();
  const aborted = waitForPort(port, { signal: controller.signal });
  controller.abort(new Error("stop waiting"));
  await assert.rejects(aborted, /^Error: stop waiting$/);
  await assert.rejects(
    () => waitForPort(0),
    (e: Error) => e instanceof RangeError && /Invalid port 0/.test(e.message),
  );
  await assert.rejects(
    () => waitForPort(port, { timeout: -1 }),
    (e: Error) =>
      e instanceof TypeError && /Invalid timeout -1/.test(e.message),
  );
  returnPort(port);
});

test("portpicker wait PORT: exit 0 once a late listener appears, 1 with one line on timeout, 2 on a usage error", async () => {
  const port = await pickUnusedPort();
  const late = lateListener(port);
  try {
    const waiting = runCli(["wait", String(port), "--timeout", "60"]);
    const timedOut = await runCli(["wait", String(port), "--timeout", "0.05"]);
    assertSubcommandError(timedOut, 1, "wait", "a timeout");
    assert.match(timedOut.stderr, new RegExp(`Port ${port} did not accept`));
    late.listen();
    const result = await waiting;
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout + result.stderr, "");
    const host = await runCli(["wait", String(port), "--host", "127.0.0.1"]);
    assert.equal(host.code, 0, host.stderr);
  } finally {
    await late.proc.stop("SIGKILL");
  }
  for (
    const args of [
      ["wait"],
      ["wait", "0"],
      ["wait", "80", "81"],
      ["wait", "80", "--timeout", "soon"],
      ["wait", "80", "--host", ""],
    ]
  ) {
    assertSubcommandError(await runCli(args), 2, "wait", args.join(" "));
  }
  returnPort(port);
});

test("waitForPort gives up at once, in one line, on a host that cannot be resolved", async () => {
  const port = await pickUnusedPort();
  // A bound only in case it waits on: far longer than a failed lookup takes.
  const signal = AbortSignal.timeout(60_000);
  // RFC 6761: .invalid never resolves. The second is no host name at all.
  for (const hostname of ["no-such-host.invalid", "bad..host"]) {
    await assert.rejects(
      () => waitForPort(port, { hostname, timeout: 600_000, signal }),
      (error: Error) => {
        assert.match(
          error.message,
          new RegExp(`^Cannot wait for port ${port} on ${hostname}: [^\\n]+$`),
          `${hostname}: ${error}`,
        );
        return true;
      },
    );
  }
  returnPort(port);
});

test(
  "waitForPort on Deno without --allow-net gives up at once, naming the flag",
  { skip: RUNTIME !== "deno" ? "about Deno's permissions only" : false },
  async () => {
    const dir = tempDir();
    try {
      const path = join(dir.path, "wait-no-net.mts");
      writeFileSync(
        path,
        `import { waitForPort } from ${JSON.stringify(MOD_URL)};
try {
  await waitForPort(27001, { timeout: 600_000 });
  console.log("resolved");
} catch (error) {
  console.log(error.message);
}
`,
      );
      // Not Deno.execPath(): Deno's node:child_process gives a child
      // started from it this process's permissions.
      const result = await run(
        [tool("deno"), "run", "--no-config", "--no-prompt", path],
        { env: { NO_COLOR: "1" }, timeoutMs: 60_000 },
      );
      assert.equal(result.code, 0, `exit ${result.code}: ${result.stderr}`);
      assert.match(
        result.stdout,
        /^Cannot wait for port 27001 on 127\.0\.0\.1 or ::1: [^\n]*--allow-net[^\n]*\n$/,
      );
    } finally {
      dir.remove();
    }
  },
);
