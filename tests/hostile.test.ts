/**
 * Issue 9: the port server, its protocol and its client, tried as a hostile
 * client and as an unlucky operator would. Each test names the item of the
 * issue it covers ("9.N ..."); all run real processes on real sockets and
 * real files, on whichever of Deno, Bun and Node 24 runs them.
 *
 * The tests that need root (a tmpfs, a second user) report themselves
 * skipped when they cannot run, never passed.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import {
  chmodSync,
  closeSync,
  existsSync,
  lstatSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import {
  assertSubcommandError,
  exclusive,
  freeRange,
  MOD_URL,
  portsOf,
  type Proc,
  PYTHON,
  requirePython,
  run,
  runCli,
  type RunResult,
  runScript,
  runtimeCommand,
  start,
  tempDir,
  uniqueName,
} from "./helpers.ts";
import {
  askPort,
  delay,
  exchange,
  poolSpec,
  randomPool,
  serveFailure,
  signalAndWait,
  sleeper,
  socketPath,
  startServer,
  startTimeOf,
  statsOnSigusr1,
  warningsLogged,
  withServer,
} from "./server_helpers.ts";

/** A live process: this test's own. */
const PID = process.pid;

// ---------------------------------------------------------------------------
// Helpers of this file.

const IS_ROOT = process.getuid?.() === 0;

/** Whether a tmpfs can be mounted here (root in a namespace that allows it). */
function canMountTmpfs(): boolean {
  if (!IS_ROOT) return false;
  const dir = tempDir("portpicker-mount-probe-");
  try {
    const mounted = spawnSync("mount", [
      "-t",
      "tmpfs",
      "-o",
      "size=64k",
      "tmpfs",
      dir.path,
    ]);
    if (mounted.status !== 0) return false;
    return spawnSync("umount", [dir.path]).status === 0;
  } catch {
    return false;
  } finally {
    try {
      dir.remove();
    } catch { /* still mounted: left for the system to clean */ }
  }
}

/** Why the tmpfs test cannot run here, or false when it can. */
const NO_TMPFS: string | false = canMountTmpfs()
  ? false
  : "needs root and mount -t tmpfs";

/** Why the second-user test cannot run here, or false when it can. */
const NO_USERS: string | false = IS_ROOT &&
    ["/usr/sbin/useradd", "/usr/sbin/groupadd", "/usr/sbin/runuser"].every(
      existsSync,
    )
  ? false
  : "needs root, useradd, groupadd and runuser";

/**
 * Sends `request` on a new connection (no half-close, as the Python client)
 * and returns all the server wrote until it closed the connection.
 */
async function ask(
  address: string,
  request: string,
  timeoutMs = 10_000,
): Promise<string> {
  const { bytes } = await exchange(address, request, { timeoutMs });
  return bytes.toString("utf8");
}

interface Status {
  address: string;
  pool: number;
  allocated: number;
  allocations: {
    port: number;
    pid: number | null;
    lease: boolean;
    since: string;
    label: string | null;
  }[];
}

/** STATUS, raw: one line of JSON. */
async function status(address: string): Promise<Status> {
  const reply = await ask(address, "STATUS\n");
  assert.match(reply, /^\{[^\n]*\}\n$/, `STATUS reply ${reply.slice(0, 200)}`);
  return JSON.parse(reply) as Status;
}

/** The numbers of an `OK p1 p2 …` reply of `count` ports. */
function okPorts(reply: string, count: number): number[] {
  assert.match(
    reply,
    new RegExp(`^OK(?: \\d{1,5}){${count}}\\n$`),
    `expected OK and ${count} ports: ${reply.slice(0, 200)}`,
  );
  return reply.trim().split(" ").slice(1).map(Number);
}

function sorted(ports: number[]): number[] {
  return [...ports].sort((a, b) => a - b);
}

/** Polls `check` (a /proc or STATUS state) until it holds; fails after `timeoutMs`. */
async function eventually(
  what: string | (() => string),
  check: () => Promise<boolean> | boolean,
  timeoutMs = 5_000,
): Promise<void> {
  const began = Date.now();
  while (!(await check())) {
    if (Date.now() - began > timeoutMs) {
      const said = typeof what === "string" ? what : what();
      assert.fail(`${said}: not within ${timeoutMs} ms`);
    }
    await delay(50);
  }
}

/**
 * Resolves once `predicate` holds for what `proc` wrote to stderr from
 * offset `from` on; fails after `timeoutMs` or when `proc` exits first.
 */
function waitForLog(
  proc: Proc,
  predicate: (text: string) => boolean,
  from: number,
  what: string,
  timeoutMs = 10_000,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const since = () => proc.stderr().slice(from);
    const check = () => {
      if (!predicate(since())) return false;
      done();
      resolve();
      return true;
    };
    const onClose = () => {
      if (check()) return;
      done();
      reject(new Error(`exited before ${what}; stderr since: ${since()}`));
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`no ${what} within ${timeoutMs} ms: ${since()}`));
    }, timeoutMs);
    const done = () => {
      clearTimeout(timer);
      proc.child.stderr!.off("data", check);
      proc.child.off("close", onClose);
    };
    proc.child.stderr!.on("data", check);
    proc.child.on("close", onClose);
    check();
  });
}

/** Waits for the server's "Lease of ports … ended." line naming exactly `ports`. */
function waitForLeaseEnd(
  server: Proc,
  ports: number[],
  from: number,
): Promise<void> {
  const want = sorted(ports).join(",");
  return waitForLog(
    server,
    (text) =>
      [...text.matchAll(/Lease of ports ([\d, ]+) ended\./g)].some((m) =>
        sorted(m[1].split(",").map((p) => Number(p.trim()))).join(",") === want
      ),
    from,
    `"Lease of ports ${ports.join(", ")} ended."`,
  );
}

/** The open file descriptors of a process. */
function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** What each open descriptor of a process is (`3 socket:[1234]`), for a failure. */
function fdTargets(pid: number): string[] {
  return readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return `${fd} ${readlinkSync(`/proc/${pid}/fd/${fd}`)}`;
    } catch {
      return `${fd} (closed)`;
    }
  });
}

/** `promise`, or a failure naming `what` once `timeoutMs` have passed. */
async function within<T>(
  promise: Promise<T>,
  timeoutMs: number,
  what: () => string,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`not within ${timeoutMs} ms: ${what()}`)),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** The lines of `text` (without their newlines). */
function lines(text: string): string[] {
  return text.split("\n").filter((line) => line !== "");
}

/** A POSIX shell word for `text`. */
function shellWord(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** Every leading run of digits of `token`'s digits: "12abc" → 1, 12. */
function digitPrefixes(token: string): number[] {
  const digits = /^\d*/.exec(token)![0];
  const out: number[] = [];
  for (let i = 1; i <= digits.length; i++) out.push(Number(digits.slice(0, i)));
  return out;
}

/**
 * The CLI printed `count` distinct valid ports, one a line, none of them
 * `bad`; exit 0; exactly one line on stderr.
 */
function assertLocalPorts(
  result: RunResult,
  count: number,
  bad: number[],
  what: string,
): number[] {
  assert.equal(
    result.code,
    0,
    `${what}: exit ${result.code} ${
      result.signal ?? ""
    }; stderr: ${result.stderr}`,
  );
  assert.match(
    result.stdout,
    new RegExp(`^(?:\\d{1,5}\\n){${count}}$`),
    `${what}: stdout ${JSON.stringify(result.stdout.slice(0, 300))}`,
  );
  const ports = result.stdout.trim().split("\n").map(Number);
  for (const port of ports) {
    assert.ok(port >= 1 && port <= 65535, `${what}: printed port ${port}`);
    assert.ok(
      !bad.includes(port),
      `${what}: printed ${port}, from the bad reply`,
    );
  }
  assert.equal(new Set(ports).size, count, `${what}: not distinct: ${ports}`);
  assert.match(
    result.stderr,
    /^[^\n]+\n$/,
    `${what}: not exactly one line on stderr: ${
      JSON.stringify(result.stderr.slice(0, 2000))
    }`,
  );
  return ports;
}

/**
 * Runs `body` for every case, then fails once, naming every case that
 * failed and why.
 */
async function everyCase<T>(
  cases: T[],
  name: (c: T) => string,
  body: (c: T) => Promise<void>,
): Promise<void> {
  const failures: string[] = [];
  for (const c of cases) {
    try {
      await body(c);
    } catch (error) {
      const message = (error as Error).message;
      failures.push(
        message.startsWith(name(c)) ? message : `${name(c)}: ${message}`,
      );
    }
  }
  if (failures.length > 0) {
    assert.fail(
      `${failures.length} of ${cases.length} cases failed:\n${
        failures.join("\n")
      }`,
    );
  }
}

/** A fake port server in this process: answers each request with `answer`. */
interface FakeServer {
  address: string;
  /** Each request it read, in order. */
  requests: string[];
  close(): Promise<void>;
}

/**
 * Listens on a unique abstract name. Each connection's request is read up
 * to its newline (or the client's EOF); `answer` gives the bytes to write
 * before closing, or undefined to close with nothing written.
 */
async function fakeServer(
  answer: (request: string) => string | undefined,
): Promise<FakeServer> {
  const address = uniqueName("fake");
  const requests: string[] = [];
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    let text = "";
    let answered = false;
    const reply = () => {
      if (answered) return;
      answered = true;
      requests.push(text);
      const bytes = answer(text);
      if (bytes === undefined) socket.end();
      else socket.end(bytes);
    };
    socket.on("data", (chunk: Buffer) => {
      text += chunk.toString("latin1");
      if (text.includes("\n")) reply();
    });
    socket.on("end", reply);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen({ path: socketPath(address) }, () => resolve());
  });
  return {
    address,
    requests,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Whether a request is an extended one (it starts with a letter). */
const isExtended = (request: string) => /^[A-Za-z]/.test(request);

/** A Python client of the extended protocol; see the modes below. */
const PYTHON_LEASE_CLIENT = `
import json, select, socket, sys, time
address, request, mode = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0" + address[1:] if address.startswith("@") else address)
s.sendall(request.encode())
s.settimeout(10)

def read_line():
    data = b""
    while not data.endswith(b"\\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data

def say(data):
    print(json.dumps(data.decode("latin1")), flush=True)

if mode == "reply-then-shutdown":
    # Takes the reply, half-closes, exits.
    say(read_line())
    s.shutdown(socket.SHUT_WR)
elif mode == "shutdown-then-reply":
    # Half-closes at once, takes what comes, exits.
    s.shutdown(socket.SHUT_WR)
    say(read_line())
elif mode == "reply-then-wait":
    # Takes the reply and waits to be killed.
    say(read_line())
    sys.stdin.read()
elif mode == "reset":
    # Sees the reply without reading it, then closes: on a Unix socket,
    # closing with unread data resets the connection (ECONNRESET).
    select.select([s], [], [], 10)
    peek = s.recv(4096, socket.MSG_PEEK)
    while not peek.endswith(b"\\n"):
        time.sleep(0.01)
        peek = s.recv(4096, socket.MSG_PEEK)
    say(peek)
    s.close()
`;

/** The ports of the JSON-quoted `OK …` line a Python lease client printed. */
function leasedPorts(stdout: string, what: string): number[] {
  assert.match(stdout, /^"[^\n]*"\n/, `${what}: the client printed ${stdout}`);
  return okPorts(JSON.parse(stdout.split("\n")[0]) as string, 5);
}

// ---------------------------------------------------------------------------
// 9.1 A lease ends whenever its connection ends.

test("9.1 a lease ends whenever its connection ends: LEASE without a newline, half-closed, then the client exits leaves nothing leased and no descriptor; half-close, SIGKILL and reset each end a lease", async () => {
  requirePython();
  await withServer(
    { size: 6, name: "h-lease" },
    async ({ address, server, range }) => {
      const serverPid = server.child.pid!;
      // Warm up: one classic request, given back, and a STATUS.
      const warm = await askPort(address, PID);
      assert.ok(warm !== undefined);
      assert.equal(
        await ask(address, `RETURN pid=${PID} ports=${warm}\n`),
        `OK ${warm}\n`,
      );
      assert.equal((await status(address)).allocated, 0);
      const fdsBefore = fdCount(serverPid);

      // (b) `LEASE count=5` without its newline: an incomplete request.
      const incomplete = await run([
        PYTHON,
        "-c",
        PYTHON_LEASE_CLIENT,
        address,
        "LEASE count=5",
        "shutdown-then-reply",
      ], { timeoutMs: 20_000 });
      assert.equal(incomplete.code, 0, incomplete.stderr);
      const reply = JSON.parse(incomplete.stdout.trim()) as string;
      assert.match(
        reply,
        /^(ERR [^\n]*\n)?$/,
        `LEASE without a newline is incomplete: an ERR line or nothing, got ${
          JSON.stringify(reply)
        }`,
      );
      await eventually(
        "no port leased after the incomplete LEASE",
        async () => (await status(address)).allocated === 0,
      );
      await eventually(
        () =>
          `the server's open descriptors back to ${fdsBefore} (now ${
            fdCount(serverPid)
          })`,
        () => fdCount(serverPid) <= fdsBefore,
      );

      // (a) `LEASE count=5\n`, the reply taken, half-closed, the client exits.
      let from = server.stderr().length;
      const halfClosed = await run([
        PYTHON,
        "-c",
        PYTHON_LEASE_CLIENT,
        address,
        "LEASE count=5\n",
        "reply-then-shutdown",
      ], { timeoutMs: 20_000 });
      assert.equal(halfClosed.code, 0, halfClosed.stderr);
      const a = leasedPorts(halfClosed.stdout, "half-close");
      for (const p of a) assert.ok(p >= range[0] && p <= range[1]);
      await waitForLeaseEnd(server, a, from);
      assert.equal((await status(address)).allocated, 0, "after half-close");

      // (c) The holder, a separate process, killed with SIGKILL.
      from = server.stderr().length;
      const holder = start([
        PYTHON,
        "-c",
        PYTHON_LEASE_CLIENT,
        address,
        "LEASE count=5\n",
        "reply-then-wait",
      ]);
      try {
        await holder.waitFor(/^"[^\n]*"\n/m, 10_000);
        const c = leasedPorts(holder.stdout(), "SIGKILL");
        assert.equal((await status(address)).allocated, 5, "while held");
        await holder.stop("SIGKILL");
        await waitForLeaseEnd(server, c, from);
        assert.equal((await status(address)).allocated, 0, "after SIGKILL");
      } finally {
        await holder.stop("SIGKILL");
      }

      // (d) A reset: the client closes with the reply unread.
      from = server.stderr().length;
      const reset = await run([
        PYTHON,
        "-c",
        PYTHON_LEASE_CLIENT,
        address,
        "LEASE count=5\n",
        "reset",
      ], { timeoutMs: 20_000 });
      assert.equal(reset.code, 0, reset.stderr);
      const d = leasedPorts(reset.stdout, "reset");
      await waitForLeaseEnd(server, d, from);
      assert.equal((await status(address)).allocated, 0, "after a reset");
    },
  );
});

// ---------------------------------------------------------------------------
// 9.2 A full disk fails only the request it belongs to.

test(
  "9.2 --state on a full tmpfs: the request gets no reply (TAKE: ERR), one log line, nothing handed out; once space is back the next request succeeds, RETURN answers, SIGTERM says Goodbye",
  {
    skip: NO_TMPFS,
  },
  async () => {
    const dir = tempDir("portpicker-full-");
    const range = await randomPool(5);
    const address = uniqueName("h-full");
    const state = join(dir.path, "state.json");
    const filler = join(dir.path, "filler");
    const holder = sleeper();
    const S = holder.child.pid!;
    let server: Proc | undefined;
    let mounted = false;
    try {
      const mount = spawnSync("mount", [
        "-t",
        "tmpfs",
        "-o",
        "size=1m",
        "tmpfs",
        dir.path,
      ], { encoding: "utf8" });
      assert.equal(mount.status, 0, `mount: ${mount.stderr}`);
      mounted = true;
      server = await startServer([
        "--pool",
        poolSpec(range),
        "--address",
        address,
        "--state",
        state,
      ]);
      // Fill the file system.
      const fd = openSync(filler, "w");
      try {
        const chunk = Buffer.alloc(64 * 1024, 0x61);
        for (let i = 0; i < 10_000; i++) writeSync(fd, chunk);
        assert.fail("the 1 MiB tmpfs never filled up");
      } catch (error) {
        if ((error as { code?: string }).code !== "ENOSPC") throw error;
      } finally {
        closeSync(fd);
      }

      const from = server.stderr().length;
      const classic = await exchange(address, `${S}\n`);
      assert.equal(
        classic.bytes.toString("latin1"),
        "",
        "a request whose state write failed must get no port",
      );
      const take = await ask(address, `TAKE pid=${S} count=1\n`);
      assert.match(take, /^ERR [^\n]*\n$/, `TAKE on a full disk: ${take}`);
      await waitForLog(
        server,
        (text) => /state file/i.test(text),
        from,
        "a log line about the state file",
      );
      assert.equal(
        (await status(address)).allocated,
        0,
        "a port was handed out although its state write failed",
      );

      // Space is back: the very next request succeeds.
      rmSync(filler);
      const port = await askPort(address, S);
      assert.ok(
        port !== undefined,
        `no port once space is back; stderr: ${server.stderr().slice(from)}`,
      );
      assert.ok(port >= range[0] && port <= range[1], `${port}`);
      // Written before the reply.
      const saved = JSON.parse(readFileSync(state, "utf8")) as {
        allocations: number[][];
      };
      assert.ok(
        saved.allocations.some((a) => a[0] === port && a[1] === S),
        `the state file lacks ${port}: ${JSON.stringify(saved)}`,
      );
      assert.equal(
        await ask(address, `RETURN pid=${S} ports=${port}\n`),
        `OK ${port}\n`,
      );
      assert.equal((await status(address)).allocated, 0);
      const end = await signalAndWait(server, "SIGTERM");
      assert.deepEqual(end, { code: 0, signal: null }, server.stderr());
      assert.match(server.stderr(), /Goodbye\./);
    } finally {
      await server?.stop("SIGKILL");
      await holder.stop("SIGKILL");
      if (mounted && spawnSync("umount", [dir.path]).status !== 0) {
        spawnSync("umount", ["-l", dir.path]);
      }
      dir.remove();
    }
  },
);

// ---------------------------------------------------------------------------
// 9.3 Exact framing on the client; unusable ports go back.

test("9.3 cli -n 300 against a 400-port pool prints 300 distinct pool ports, one a line, and they are exactly what the server allocated", async () => {
  await withServer(
    { size: 400, name: "h-n300" },
    async ({ range, address }) => {
      const result = await runCli(["-n", "300", "--portserver", address]);
      assert.equal(result.code, 0, result.stderr);
      assert.match(result.stdout, /^(?:\d{1,5}\n){300}$/, result.stdout);
      const ports = result.stdout.trim().split("\n").map(Number);
      assert.equal(new Set(ports).size, 300, "not distinct");
      for (const port of ports) {
        assert.ok(port >= range[0] && port <= range[1], `${port} not in pool`);
      }
      const now = await status(address);
      assert.deepEqual(
        now.allocations.map((a) => a.port),
        sorted(ports),
        "allocated on the server but never printed",
      );
    },
  );
});

test("9.3 a reply without its newline, or over the client's limit, is no reply: the CLI picks locally, one line on stderr, never a cut or fake port", async () => {
  const cases: [string, string][] = [
    // `-n 2`: a complete `OK 15000 150\n` would be a well-formed reply.
    ["no newline", "OK 15000 150"],
    ["a line over the limit", `OK 15000 ${"0".repeat(17 << 20)}15001\n`],
  ];
  await everyCase(cases, ([what]) => what, async ([what, reply]) => {
    const fake = await fakeServer((request) =>
      request.startsWith("TAKE ") ? reply : undefined
    );
    try {
      const result = await runCli(["-n", "2", "--portserver", fake.address]);
      assert.ok(
        fake.requests.some((r) => r.startsWith("TAKE ")),
        `the CLI never asked: ${fake.requests}`,
      );
      const bad = [15000, 150, 15001, ...digitPrefixes("15000"), 0];
      assertLocalPorts(result, 2, bad, what);
    } finally {
      await fake.close();
    }
  });
});

test("9.3 ports from the server that the client cannot use (outside --range) go back to the server", async () => {
  await withServer(
    { size: 3, name: "h-giveback" },
    async ({ range: pool, address }) => {
      let wanted = await freeRange(5);
      while (wanted[0] <= pool[1] && pool[0] <= wanted[1]) {
        wanted = await freeRange(5);
      }
      const result = await runCli([
        "--portserver",
        address,
        "--range",
        poolSpec(wanted),
      ]);
      assert.equal(result.code, 0, result.stderr);
      assert.match(result.stdout, /^\d+\n$/);
      const port = Number(result.stdout.trim());
      assert.ok(
        port >= wanted[0] && port <= wanted[1],
        `${port} outside --range ${poolSpec(wanted)}`,
      );
      // The CLI gives the port back before it exits.
      assert.equal(
        (await status(address)).allocated,
        0,
        "the unusable server port was not given back",
      );
    },
  );
});

// ---------------------------------------------------------------------------
// 9.4 Long requests, whole, on every runtime.

test("9.4 RETURN of 1000 ports, in 7 pieces or in one write, is taken whole; an over-long RETURN is an ERR or a close, never a parsed prefix, and the server goes on serving", async () => {
  await withServer(
    { size: 1050, name: "h-long" },
    async ({ range, address, server }) => {
      const take = async () => {
        const ports = okPorts(
          await ask(address, `TAKE pid=${PID} count=1000\n`),
          1000,
        );
        assert.equal(new Set(ports).size, 1000);
        for (const p of ports) assert.ok(p >= range[0] && p <= range[1]);
        return ports;
      };
      let ports = await take();
      const line = `RETURN pid=${PID} ports=${ports.join(",")}\n`;
      const size = Math.ceil(line.length / 7);
      const pieces = Array.from(
        { length: 7 },
        (_, i) => line.slice(i * size, (i + 1) * size),
      );
      const inPieces = await exchange(address, { delayMs: 30, pieces });
      assert.deepEqual(
        sorted(okPorts(inPieces.bytes.toString("utf8"), 1000)),
        sorted(ports),
        "RETURN of 1000 ports in 7 pieces",
      );
      assert.equal((await status(address)).allocated, 0);

      ports = await take();
      // 1001 ports: the 1000 held and one more.
      const extra = portsOf(range).find((p) => !ports.includes(p))!;
      const tooMany = await ask(
        address,
        `RETURN pid=${PID} ports=${[...ports, extra].join(",")}\n`,
      );
      assert.match(
        tooMany,
        /^(ERR [^\n]*\n)?$/,
        `1001 ports: ${tooMany.slice(0, 200)}`,
      );
      // 200 KB without a newline, whose every prefix names held ports.
      let junk = `RETURN pid=${PID} ports=${ports.join(",")}`;
      while (junk.length < 200_000) junk += `,${ports.join(",")}`;
      const overLong = await exchange(address, junk, { timeoutMs: 15_000 });
      assert.match(
        overLong.bytes.toString("utf8"),
        /^(ERR [^\n]*\n)?$/,
        `200 KB without a newline: ${
          overLong.bytes.toString("utf8").slice(0, 200)
        }`,
      );
      assert.equal(
        (await status(address)).allocated,
        1000,
        "an over-long RETURN freed ports",
      );
      const classic = await askPort(address, PID);
      assert.ok(classic !== undefined, "no port right after");
      assert.equal(
        await ask(address, `RETURN pid=${PID} ports=${classic}\n`),
        `OK ${classic}\n`,
      );

      const oneWrite = await ask(
        address,
        `RETURN pid=${PID} ports=${ports.join(",")}\n`,
      );
      assert.deepEqual(
        sorted(okPorts(oneWrite, 1000)),
        sorted(ports),
        "RETURN of 1000 ports in one write",
      );
      assert.equal((await status(address)).allocated, 0);
      assert.equal(server.child.exitCode, null);
    },
  );
});

// ---------------------------------------------------------------------------
// 9.5 The state file and planted symlinks.

test("9.5 symlinks planted at temporary names of the state file (world-writable directory) are never followed; the state file stays a regular file", async () => {
  const dir = tempDir("portpicker-sticky-");
  const other = tempDir("portpicker-victim-");
  chmodSync(dir.path, 0o1777);
  const victim = join(other.path, "victim");
  writeFileSync(victim, "precious\n");
  const state = join(dir.path, "state.json");
  const range = await randomPool(4);
  const address = uniqueName("h-symlink");
  const holder = sleeper();
  const S = holder.child.pid!;
  let server: Proc | undefined;
  try {
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--state",
      state,
    ]);
    const pid = server.child.pid!;
    for (
      const name of [
        `state.json.tmp-${pid}`,
        "state.json.tmp",
        ".state.json.tmp",
        `.state.json.tmp-${pid}`,
        `state.json.${pid}.tmp`,
        "state.json~",
      ]
    ) {
      symlinkSync(victim, join(dir.path, name));
    }
    const first = await askPort(address, S);
    const second = await askPort(address, S);
    assert.ok(first !== undefined && second !== undefined);
    assert.equal(
      await ask(address, `RETURN pid=${S} ports=${second}\n`),
      `OK ${second}\n`,
    );
    assert.equal(
      readFileSync(victim, "utf8"),
      "precious\n",
      "the server wrote through a planted symlink",
    );
    const stat = lstatSync(state);
    assert.ok(
      stat.isFile() && !stat.isSymbolicLink(),
      "the state file is not a regular file",
    );
    const saved = JSON.parse(readFileSync(state, "utf8")) as {
      allocations: number[][];
    };
    // A port given back may reach the file later; a port handed out is on
    // disk before its reply.
    assert.ok(
      saved.allocations.some((a) => a[0] === first && a[1] === S),
      JSON.stringify(saved),
    );
    assert.ok(
      saved.allocations.every((a) =>
        (a[0] === first || a[0] === second) && a[1] === S
      ),
      JSON.stringify(saved),
    );
  } finally {
    await server?.stop("SIGKILL");
    await holder.stop("SIGKILL");
    dir.remove();
    other.remove();
  }
});

test("9.5 and 9.14 a temporary state file left by a killed server is removed at the next start; a symlink at such a name is not followed", async () => {
  const dir = tempDir("portpicker-leftover-");
  const other = tempDir("portpicker-victim-");
  const victim = join(other.path, "victim");
  writeFileSync(victim, "precious\n");
  const state = join(dir.path, "state.json");
  const leftover = join(dir.path, "state.json.tmp-0123456789abcdef");
  writeFileSync(leftover, '{"version":1,"allocations":[[2');
  symlinkSync(victim, join(dir.path, "state.json.tmp-fedcba9876543210"));
  const range = await randomPool(3);
  let server: Proc | undefined;
  try {
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      uniqueName("h-leftover"),
      "--state",
      state,
    ]);
    assert.ok(
      !existsSync(leftover),
      `${leftover} is still there after "Serving on"; files: ${
        readdirSync(dir.path)
      }`,
    );
    assert.equal(readFileSync(victim, "utf8"), "precious\n");
    assert.ok(lstatSync(state).isFile());
  } finally {
    await server?.stop("SIGKILL");
    dir.remove();
    other.remove();
  }
});

// ---------------------------------------------------------------------------
// 9.6 Clients that never read.

/**
 * A Python process that opens `argv[2]` connections, sends `STATUS\n` on each
 * and never reads. It watches them with poll() (POLLRDHUP, POLLHUP: the
 * server closed it, seen without reading a byte) and prints `closed N` once
 * all are closed, or after `argv[3]` seconds.
 */
const PYTHON_NON_READERS = `
import select, socket, sys, time
address, n, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
path = "\\0" + address[1:] if address.startswith("@") else address
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(b"STATUS\\n")
    except OSError:
        pass
    socks.append(s)
print("sent", flush=True)
began = time.monotonic()
while True:
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLRDHUP)
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    closed = sum(1 for _, events in poller.poll(0) if events & gone)
    if closed == n or time.monotonic() - began > limit:
        break
    time.sleep(0.1)
print(f"closed {closed}", flush=True)
sys.stdin.read()
`;

test("9.6 300 clients that send STATUS to a full, labelled 10,000-port pool and never read: the server keeps at most its budget of replies in flight (the rest are dropped unanswered), drops every one of the 300 and counts them in a handful of log lines, and serves on", async () => {
  requirePython();
  // The runtimes' suites run side by side: one 10,000-port pool at a time.
  await exclusive("ports-5000-14999", noReaders);
});

/** A reply dropped for the budget of bytes in flight, or not taken in time. */
const DROPPED_UNANSWERED = /Dropped a client: its reply would pass \d+ bytes/;
const DROPPED_SLOW = /Dropped a client that did not take its reply/;

async function noReaders(): Promise<void> {
  // Below the default search range and the kernel's ephemeral range, and
  // apart from the pools of randomPool(), which has no room for 10,000.
  const range: [number, number] = [5000, 14999];
  const address = uniqueName("h-noread");
  const label = `L${"abcdefghij".repeat(10)}`.slice(0, 100);
  const holder = sleeper();
  const S = holder.child.pid!;
  let flood: Proc | undefined;
  // Replies wait 5 s for their reader (the default is 2 s): long enough
  // for the replies in flight to reach their budget on a busy machine.
  const server = await startServer([
    "--pool",
    poolSpec(range),
    "--address",
    address,
    "--timeout",
    "5",
  ]);
  const pid = server.child.pid!;
  try {
    // Take the whole pool for the sleeper (a port in use elsewhere is skipped).
    let taken = 0;
    for (const count of [1000, 100, 10, 1]) {
      while (true) {
        const reply = await ask(
          address,
          `TAKE pid=${S} count=${count} label=${label}\n`,
        );
        if (!reply.startsWith("OK ")) break;
        taken += count;
      }
    }
    assert.ok(taken >= 9900, `only ${taken} of 10,000 ports could be taken`);
    const full = await status(address);
    assert.equal(full.allocated, taken);
    assert.ok(full.allocations.every((a) => a.label === label));
    // Each STATUS reply is some 2 MB: 300 of them are far over the budget.
    const replyBytes = JSON.stringify(full).length;
    assert.ok(replyBytes > 1_000_000, `a STATUS reply of ${replyBytes} bytes`);

    // The first signal makes Deno open its signal driver's descriptors: the
    // count is taken after it.
    const before = await statsOnSigusr1(server);
    const fdsBefore = fdCount(pid);
    const targetsBefore = fdTargets(pid);
    const from = server.stderr().length;
    flood = start([PYTHON, "-c", PYTHON_NON_READERS, address, "300", "60"]);
    await flood.waitFor(/^closed \d+\n/m, 90_000);
    assert.match(
      flood.stdout(),
      /^closed 300\n/m,
      "all 300 closed by the server within 60 s",
    );
    await eventually(
      () =>
        `the server's open descriptors back to ${fdsBefore} (now ${
          fdCount(pid)
        }; new: ${
          fdTargets(pid).filter((t) => !targetsBefore.includes(t)).join(", ")
        })`,
      () => fdCount(pid) <= fdsBefore,
      15_000,
    );

    // Every client dropped, each counted. One whose request the server,
    // busy with the others' replies, did not read in time is a client
    // request error; the others are counted by (rate-limited) warnings,
    // whose repeats are logged with their count 10 s after the first.
    const after = await statsOnSigusr1(server);
    const unread = after["client-request-errors"] -
      before["client-request-errors"];
    const drops = () => {
      const text = server.stderr().slice(from);
      const unanswered = warningsLogged(text, DROPPED_UNANSWERED);
      const slow = warningsLogged(text, DROPPED_SLOW);
      return {
        unanswered: unanswered.count,
        slow: slow.count,
        lines: [...unanswered.lines, ...slow.lines],
      };
    };
    // The sleeper gone, a fresh request gets one of its ports: it serves on.
    await holder.stop("SIGKILL");
    const port = await askPort(address, PID);
    assert.ok(port !== undefined && port >= range[0] && port <= range[1]);
    // Stopping logs the counts of warnings still within their interval.
    assert.equal(await server.stop("SIGTERM"), 0, server.stderr().slice(from));
    const { unanswered, slow, lines: dropLines } = drops();
    assert.equal(
      unanswered + slow + unread,
      300,
      `dropped ${unanswered} unanswered, ${slow} slow readers and ${unread} unread requests, for 300 clients:\n${
        dropLines.join("\n")
      }`,
    );
    assert.ok(
      unanswered > 0,
      `no client was dropped for the budget of bytes in flight: the replies kept for slow readers are not bounded:\n${
        dropLines.join("\n")
      }`,
    );
    assert.ok(
      dropLines.length <= 10,
      `${dropLines.length} log lines about dropped clients:\n${
        dropLines.slice(0, 20).join("\n")
      }`,
    );
    const logged = lines(server.stderr().slice(from)).filter((l) =>
      !/statistics|^I.*portserver\] [a-z-]+ \d+$|Goodbye|stopping/.test(l)
    );
    assert.ok(
      logged.length <= 30,
      `${logged.length} log lines for 300 clients:\n${
        logged.slice(0, 20).join("\n")
      }`,
    );
  } finally {
    await flood?.stop("SIGKILL");
    await holder.stop("SIGKILL");
    await server.stop("SIGKILL");
  }
}

// ---------------------------------------------------------------------------
// 9.7 Crafted state files.

test("9.7 bad state entries (since 1e300, Infinity, negative, port outside the pool, pid 0 and 1, a string pid, an extra field) are dropped with one warning; the good one is kept and STATUS works", async () => {
  const range = await randomPool(10);
  const [p0, p1, p2, p3, p4, p5, p6, p7, p8] = portsOf(range);
  const outside = range[1] + 100;
  const address = uniqueName("h-crafted");
  const dir = tempDir();
  const state = join(dir.path, "state.json");
  const holder = sleeper();
  const S = holder.child.pid!;
  const T = startTimeOf(S);
  const now = Date.now();
  const bad = [
    `[${p1},${S},${T},1e300]`,
    `[${p2},${S},${T},1e999]`,
    `[${p3},${S},${T},-5]`,
    `[${outside},${S},${T},${now}]`,
    `[${-p4},${S},${T},${now}]`,
    `[${p5},0,0,${now}]`,
    `[${p6},1,${startTimeOf(1)},${now}]`,
    `[${p7},${S},${T},${now},"x","extra"]`,
    `[${p8},"${S}",${T},${now}]`,
  ];
  const good = `[${p0},${S},${T},${now},"keep"]`;
  writeFileSync(
    state,
    `{"version":1,"allocations":[${[good, ...bad].join(",")}]}`,
  );
  let server: Proc | undefined;
  try {
    server = await startServer([
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--state",
      state,
    ]);
    const warnings = lines(server.stderr()).filter((l) => /entr/i.test(l));
    assert.equal(
      warnings.length,
      1,
      `one warning line about the dropped entries: ${server.stderr()}`,
    );
    assert.match(warnings[0], /^W/, warnings[0]);
    assert.match(warnings[0], new RegExp(`\\b${bad.length}\\b`), warnings[0]);
    const now2 = await status(address);
    assert.equal(now2.allocated, 1, JSON.stringify(now2));
    const [kept] = now2.allocations;
    assert.deepEqual(
      [kept.port, kept.pid, kept.lease, kept.label, kept.since],
      [p0, S, false, "keep", new Date(now).toISOString()],
    );
    assert.equal(await askPort(address, S) !== undefined, true);
    assert.equal((await status(address)).allocated, 2);
  } finally {
    await server?.stop("SIGKILL");
    await holder.stop("SIGKILL");
    dir.remove();
  }
});

test("9.7 an absurdly large state file (700 MB sparse; 1.5 million dead entries, 25 MB) makes the server exit 1 with one line naming the file", async () => {
  const range = await randomPool(3);
  const dir = tempDir();
  try {
    const sparse = join(dir.path, "sparse.json");
    writeFileSync(sparse, "");
    truncateSync(sparse, 700 * 1024 * 1024);
    const many = join(dir.path, "many.json");
    // pid 4194305 is above Linux's largest pid_max: never alive.
    const entry = `[${range[0]},4194305,1,1],`;
    writeFileSync(
      many,
      `{"version":1,"allocations":[${entry.repeat(1_500_000)}[${
        range[0]
      },4194305,1,1]]}`,
    );
    for (const state of [sparse, many]) {
      const what = `--state ${state} (${statSync(state).size} bytes)`;
      const result = await serveFailure([
        "--pool",
        poolSpec(range),
        "--address",
        uniqueName("h-huge"),
        "--state",
        state,
      ]);
      assertSubcommandError(result, 1, "serve", what);
      assert.ok(result.stderr.includes(state), `${what}: ${result.stderr}`);
    }
  } finally {
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// 9.8 Replies are checked.

test("9.8 a server's bad replies (OK 0, OK 99999, OK 12abc, fewer ports than asked; classic 0, 99999, 12abc, 80x) are no reply: the CLI picks locally, one line on stderr", async () => {
  /** `OK` and one port fewer than the request asks for (`OK` alone for one). */
  const fewer = (request: string) => {
    const count = Number(/ count=(\d+)/.exec(request)?.[1] ?? 1);
    const ports = Array.from({ length: count - 1 }, (_, i) => 15000 + i);
    return `OK${ports.map((p) => ` ${p}`).join("")}\n`;
  };
  // What, the reply to an extended request, to a classic one, -n, and the
  // numbers the CLI must not print.
  const cases: [
    string,
    ((request: string) => string) | undefined,
    string | undefined,
    number,
    number[],
  ][] = [
    ["OK 0", () => "OK 0\n", undefined, 1, [0]],
    ["OK 99999", () => "OK 99999\n", undefined, 1, digitPrefixes("99999")],
    ["OK 12abc", () => "OK 12abc\n", undefined, 1, digitPrefixes("12abc")],
    ["fewer ports than asked", fewer, undefined, 2, [
      ...digitPrefixes("15000"),
      15001,
      15002,
    ]],
    ["classic 0", undefined, "0\n", 1, [0]],
    ["classic 99999", undefined, "99999\n", 1, digitPrefixes("99999")],
    ["classic 12abc", undefined, "12abc\n", 1, digitPrefixes("12abc")],
    ["classic 80x", undefined, "80x\n", 1, digitPrefixes("80x")],
  ];
  await everyCase(
    cases,
    ([what]) => what,
    async ([what, extended, classic, count, bad]) => {
      const fake = await fakeServer((request) =>
        isExtended(request) ? extended?.(request) : classic
      );
      try {
        const result = await runCli([
          ...(count > 1 ? ["-n", String(count)] : []),
          "--portserver",
          fake.address,
        ]);
        assert.ok(fake.requests.length > 0, "the CLI never asked");
        assertLocalPorts(result, count, [0, ...bad], what);
      } finally {
        await fake.close();
      }
    },
  );
});

// ---------------------------------------------------------------------------
// 9.9 Duplicate and unknown keys.

test("9.9 TAKE with a duplicate key (pid=1 pid=P; count twice) or an unknown key is refused with ERR, nothing allocated, and the server serves on", async () => {
  await withServer(
    { size: 3, name: "h-dupkey" },
    async ({ address }) => {
      for (
        const request of [
          `TAKE pid=1 pid=${PID} count=1\n`,
          `TAKE pid=${PID} count=1 count=2\n`,
        ]
      ) {
        const reply = await ask(address, request);
        assert.match(
          reply,
          /^ERR [^\n]*duplicate[^\n]*\n$/i,
          `${JSON.stringify(request)}: ${reply}`,
        );
      }
      assert.match(
        await ask(address, `TAKE pid=${PID} bogus=1\n`),
        /^ERR [^\n]*\n$/,
      );
      assert.equal((await status(address)).allocated, 0);
      assert.ok(await askPort(address, PID) !== undefined);
    },
  );
});

// ---------------------------------------------------------------------------
// 9.10 Garbage lock claims.

test("9.10 unparsable lock claims older than the grace period are taken over (10 of 10 ports); a fresh one still blocks its port", async () => {
  const range = await freeRange(10);
  const stale = tempDir("portpicker-garbage-");
  const fresh = tempDir("portpicker-garbage-");
  try {
    const old = new Date(Date.now() - 60_000);
    for (const port of portsOf(range)) {
      const path = join(stale.path, `${port}.claim`);
      writeFileSync(path, "garbage\n");
      utimesSync(path, old, old);
    }
    const script = (count: number, r: [number, number], dir: string) => `
import { NoFreePortFoundError, pickUnusedPorts } from ${
      JSON.stringify(MOD_URL)
    };
try {
  const ports = await pickUnusedPorts(${count}, { range: ${
      JSON.stringify(r)
    }, lockDir: ${JSON.stringify(dir)} });
  console.log(JSON.stringify({ ports }));
} catch (error) {
  console.log(JSON.stringify({
    error: error instanceof NoFreePortFoundError ? "NoFreePortFoundError" : String(error),
  }));
}
`;
    const env = { PORTPICKER_LOCK_DIR: undefined };
    const all = await runScript(script(10, range, stale.path), { env });
    assert.equal(all.code, 0, all.stderr);
    const stale10 = JSON.parse(all.stdout) as { ports?: number[] };
    assert.ok(stale10.ports, `stale garbage claims: ${all.stdout}`);
    assert.deepEqual(
      sorted(stale10.ports),
      portsOf(range),
      `stale garbage claims: ${all.stdout}`,
    );

    const [port] = portsOf(range);
    const claim = join(fresh.path, `${port}.claim`);
    writeFileSync(claim, "garbage\n");
    const one = await runScript(script(1, [port, port], fresh.path), { env });
    assert.equal(one.code, 0, one.stderr);
    assert.deepEqual(
      JSON.parse(one.stdout),
      { error: "NoFreePortFoundError" },
      "a garbage claim within its grace period (it may be mid-write) must block its port",
    );
    assert.equal(readFileSync(claim, "utf8"), "garbage\n");
  } finally {
    stale.remove();
    fresh.remove();
  }
});

// ---------------------------------------------------------------------------
// 9.11 The CLI's lock-directory claims outlive the CLI.

test("9.11 five CLI calls with --lock-dir from one shell print five distinct ports, each claimed for the shell (pid and start time); `return PORT --lock-dir` removes the claim", async () => {
  const dir = tempDir("portpicker-cli-claims-");
  const cli = runtimeCommand("cli.ts").map(shellWord).join(" ");
  const lockDir = shellWord(dir.path);
  const script = `
echo "pid $$"
for i in 1 2 3 4 5; do ${cli} --lock-dir ${lockDir} || echo "failed $?"; done
echo done
read port
${cli} return "$port" --lock-dir ${lockDir}
echo "rc $?"
read wait
`;
  const shell = start(["bash", "-c", script], {
    PORTSERVER_ADDRESS: undefined,
    PORTPICKER_LOCK_DIR: undefined,
  });
  try {
    await shell.waitFor(/^done\n/m, 60_000);
    const out = lines(shell.stdout());
    const bashPid = Number(/^pid (\d+)$/.exec(out[0])?.[1]);
    assert.ok(bashPid > 1, shell.stdout());
    const ports = out.slice(1, -1).map(Number);
    assert.equal(ports.length, 5, `${shell.stdout()} ${shell.stderr()}`);
    assert.ok(ports.every((p) => p >= 1 && p <= 65535), `${ports}`);
    assert.equal(new Set(ports).size, 5, `not distinct: ${ports}`);

    const claims = readdirSync(dir.path).filter((f) => f.endsWith(".claim"));
    assert.deepEqual(
      claims.sort(),
      ports.map((p) => `${p}.claim`).sort(),
      "the claims must outlive the CLI",
    );
    const owner = `${bashPid} ${startTimeOf(bashPid)}\n`;
    for (const port of ports) {
      assert.equal(
        readFileSync(join(dir.path, `${port}.claim`), "utf8"),
        owner,
        `claim of ${port}`,
      );
    }

    shell.child.stdin!.write(`${ports[0]}\n`);
    await shell.waitFor(/^rc \d+\n/m, 30_000);
    assert.match(shell.stdout(), /^rc 0\n/m, shell.stderr());
    assert.ok(!existsSync(join(dir.path, `${ports[0]}.claim`)));
    for (const port of ports.slice(1)) {
      assert.ok(existsSync(join(dir.path, `${port}.claim`)), `${port}`);
    }
  } finally {
    await shell.stop("SIGKILL");
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// 9.12 File-descriptor exhaustion.

test("9.12 at its descriptor limit (ulimit -n 96) 200 idle clients are each closed by the server, never by running out of descriptors: those over its connection limit at once, the rest at the request timeout; a few log lines count them all, with the statistics, and the next request is answered", async () => {
  const range = await randomPool(10);
  const address = uniqueName("h-emfile");
  const command = [
    ...runtimeCommand("cli.ts"),
    "serve",
    "--pool",
    poolSpec(range),
    "--address",
    address,
  ];
  const server = start([
    "bash",
    "-c",
    `ulimit -n 96 && exec ${command.map(shellWord).join(" ")}`,
  ], { PORTSERVER_ADDRESS: undefined, PORTPICKER_LOCK_DIR: undefined });
  const clients: Socket[] = [];
  try {
    await server.waitFor(/Serving on/, 30_000);
    assert.ok(await askPort(address, PID) !== undefined, "before the flood");
    // bash exec'd the runtime: the same pid.
    const before = await statsOnSigusr1(server);
    const from = server.stderr().length;

    // 200 clients that connect and send nothing. Each resolves once closed
    // (never by this side): with false if its connect was refused (a full
    // listen backlog: left out), else with true. One that the server
    // accepts and closes at once may see a reset before it sees its connect.
    const flood = Promise.all(Array.from(
      { length: 200 },
      () =>
        new Promise<boolean>((resolve) => {
          let refused = false;
          const socket = connect({ path: socketPath(address) });
          clients.push(socket);
          socket.on("error", (error: Error & { code?: string }) => {
            refused ||= ["ECONNREFUSED", "EAGAIN", "EWOULDBLOCK"].includes(
              error.code!,
            );
          });
          socket.on("close", () => resolve(!refused));
        }),
    ));
    const outcomes = await within(
      flood,
      60_000,
      () =>
        `${
          clients.filter((c) => !c.destroyed).length
        } idle clients still open; stderr: ${server.stderr().slice(from)}`,
    );
    const reached = outcomes.filter(Boolean).length;
    assert.ok(
      reached > 96,
      `only ${reached} of 200 clients reached the server: not past its descriptor limit`,
    );

    // Those it served timed out: each is a client request error.
    const after = await statsOnSigusr1(server);
    const timedOut = after["client-request-errors"] -
      before["client-request-errors"];
    // It serves on.
    assert.ok(
      await askPort(address, PID) !== undefined,
      `no port after the flood; stderr: ${server.stderr().slice(from)}`,
    );
    // The rest were over its limit: counted by the (rate-limited) warning,
    // whose repeats are logged at the end of its interval, or at the stop.
    const OVER_LIMIT = /Dropped a client over the limit of \d+ connections/;
    assert.equal(await server.stop("SIGTERM"), 0, server.stderr().slice(from));
    const text = server.stderr().slice(from);
    const overLimit = warningsLogged(text, OVER_LIMIT);
    assert.ok(timedOut > 0, "no client was served: the limit is 0?");
    assert.equal(
      timedOut + overLimit.count,
      reached,
      `${timedOut} timed out and ${overLimit.count} over the limit, for ${reached} clients:\n${text}`,
    );
    assert.doesNotMatch(
      text,
      /Cannot accept|EMFILE|ENFILE|too many open files/i,
      "the server ran out of descriptors",
    );
    const warnings = lines(text).filter((l) => l.startsWith("W"));
    assert.ok(
      warnings.length <= 4,
      `${warnings.length} warnings for ${reached} clients:\n${
        warnings.slice(0, 10).join("\n")
      }`,
    );
  } finally {
    for (const socket of clients) socket.destroy();
    await server.stop("SIGKILL");
  }
});

// ---------------------------------------------------------------------------
// 9.13 The socket file's mode.

test(
  "9.13 --mode 0660 on a socket in a setgid 2750 directory lets a second user of the group (Debian's Python client) get a port",
  {
    skip: NO_USERS,
  },
  async () => {
    requirePython();
    const id = Math.random().toString(36).slice(2, 8);
    const group = `ppt${id}`;
    const user = `ppu${id}`;
    const base = tempDir("portpicker-mode-");
    chmodSync(base.path, 0o755);
    const dir = join(base.path, "run");
    const sock = join(dir, "sock");
    const range = await randomPool(3);
    let server: Proc | undefined;
    let groupMade = false;
    let userMade = false;
    try {
      const g = spawnSync("groupadd", [group], { encoding: "utf8" });
      assert.equal(g.status, 0, `groupadd: ${g.stderr}`);
      groupMade = true;
      const u = spawnSync("useradd", [
        "-M",
        "-N",
        "-g",
        group,
        "-s",
        "/usr/sbin/nologin",
        user,
      ], { encoding: "utf8" });
      assert.equal(u.status, 0, `useradd: ${u.stderr}`);
      userMade = true;
      const d = spawnSync("install", ["-d", "-m", "2750", "-g", group, dir], {
        encoding: "utf8",
      });
      assert.equal(d.status, 0, `install -d: ${d.stderr}`);

      server = await startServer([
        "--pool",
        poolSpec(range),
        "--address",
        sock,
        "--mode",
        "0660",
      ]);
      assert.equal(
        (statSync(sock).mode & 0o777).toString(8),
        "660",
        "the socket file's mode",
      );
      const result = await run([
        "runuser",
        "-u",
        user,
        "--",
        PYTHON,
        "-c",
        `import portpicker; print(portpicker.get_port_from_port_server(${
          JSON.stringify(sock)
        }))`,
      ]);
      assert.equal(result.code, 0, result.stderr);
      assert.match(
        result.stdout,
        /^\d+\n$/,
        `${result.stdout}${result.stderr}`,
      );
      const port = Number(result.stdout.trim());
      assert.ok(port >= range[0] && port <= range[1], `${port}`);
    } finally {
      await server?.stop("SIGKILL");
      if (userMade) spawnSync("userdel", [user]);
      if (groupMade) spawnSync("groupdel", [group]);
      base.remove();
    }
  },
);

test("9.13 a bad --mode (999, 1777, rw) or --mode with an abstract address exits 2 with one line naming the value", async () => {
  const range = await randomPool(2);
  const dir = tempDir();
  try {
    for (const mode of ["999", "1777", "rw"]) {
      const what = `--mode ${mode}`;
      const result = await serveFailure([
        "--pool",
        poolSpec(range),
        "--address",
        join(dir.path, "sock"),
        "--mode",
        mode,
      ]);
      assertSubcommandError(result, 2, "serve", what);
      assert.match(
        result.stderr,
        new RegExp(`\\bsocketMode "?${mode}\\b`),
        `${what}: the line must name the value as typed`,
      );
      assert.ok(!existsSync(join(dir.path, "sock")), `${what}: a socket file`);
    }
    const address = uniqueName("h-mode");
    const abstract = await serveFailure([
      "--pool",
      poolSpec(range),
      "--address",
      address,
      "--mode",
      "0660",
    ]);
    assertSubcommandError(abstract, 2, "serve", "--mode, abstract address");
    assert.match(abstract.stderr, /socketMode/);
    assert.ok(abstract.stderr.includes(address), abstract.stderr);
  } finally {
    dir.remove();
  }
});

// ---------------------------------------------------------------------------
// 9.14 Small ones.

test("9.14 an unusable pool range names the value typed and blames no flag the user did not type (--pool or --portserver_static_pool); the empty pool then exits 1", async () => {
  const flags = ["--pool", "--portserver_static_pool"];
  for (const flag of flags) {
    const result = await serveFailure([
      flag,
      "5-1",
      "--address",
      uniqueName("h-flag"),
    ]);
    assert.equal(result.code, 1, `${flag} 5-1: exit ${result.code}`);
    assert.equal(result.stdout, "", `${flag} 5-1: stdout`);
    const said = lines(result.stderr);
    assert.equal(said.length, 2, `${flag} 5-1: ${result.stderr}`);
    assert.match(said[0], /^portpicker serve: ignoring [^"]*"5-1"$/);
    assert.equal(said[1], "portpicker serve: No ports in the pool.");
    const other = flags.find((f) => f !== flag)!;
    assert.ok(
      !result.stderr.includes(other),
      `${flag} 5-1 blames a flag the user did not type: ${result.stderr}`,
    );
  }
});

test("9.14 a pickUnusedPorts that fails gives back the ports it had found: the next call in the same process gets them", async () => {
  const range = await freeRange(3);
  const result = await runScript(
    `
import { NoFreePortFoundError, pickUnusedPorts } from ${
      JSON.stringify(MOD_URL)
    };
const range = ${JSON.stringify(range)};
let first;
try {
  first = await pickUnusedPorts(5, { range });
} catch (error) {
  first = error instanceof NoFreePortFoundError ? "NoFreePortFoundError" : String(error);
}
let second;
try {
  second = await pickUnusedPorts(3, { range });
} catch (error) {
  second = String(error);
}
console.log(JSON.stringify({ first, second }));
`,
    { env: { PORTPICKER_LOCK_DIR: undefined } },
  );
  assert.equal(result.code, 0, result.stderr);
  const { first, second } = JSON.parse(result.stdout);
  assert.equal(first, "NoFreePortFoundError");
  assert.ok(Array.isArray(second), `the second call failed: ${second}`);
  assert.deepEqual(sorted(second), portsOf(range));
});
