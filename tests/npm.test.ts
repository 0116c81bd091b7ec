/**
 * What Node.js users get. The package reaches Node only through JSR's npm
 * compatibility layer, so this file builds that layer's package the way JSR
 * builds it: each module type-stripped to JavaScript, its `.ts` import
 * specifiers rewritten to `.js`, `.d.ts` declarations beside it, and a
 * package.json named `@jsr/x__portpicker` whose exports give each entry of
 * deno.json a `types` and a `default` condition. The package is packed,
 * installed offline into a Node-only project (under its own name and under
 * the alias `@x/portpicker` that `npx jsr add` writes), and run by plain
 * `node` with type stripping off; the declarations are type-checked from the
 * project as a TypeScript user of the package would.
 *
 * About Node, so it runs under `node --test`; Deno and Bun skip it.
 */

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { poolSpec } from "./server_helpers.ts";
import {
  freeRange,
  releaseRange,
  ROOT,
  run,
  type RunResult,
  RUNTIME,
  start,
  tempDir,
  tool,
  uniqueName,
} from "./helpers.ts";

const NAME = "@jsr/x__portpicker";
const ALIAS = "@x/portpicker";

/** What tsc compiles for, both for the build and for the user's check: Node's ESM, with its types. */
const TSC_TARGET = [
  "--target",
  "esnext",
  "--module",
  "nodenext",
  "--typeRoots",
  join(ROOT, "node_modules", "@types"),
  "--types",
  "node",
];

interface DenoJson {
  name: string;
  version: string;
  exports: Record<string, string>;
}

const config = JSON.parse(
  readFileSync(join(ROOT, "deno.json"), "utf8"),
) as DenoJson;

/** `./x.ts` import specifiers (static, dynamic, type-only) as `./x.js`. */
function rewriteSpecifiers(code: string): string {
  return code.replace(/(["'])(\.\.?\/[^"'\s]+)\.ts\1/g, "$1$2.js$1");
}

function assertRan(result: RunResult, what: string): void {
  assert.equal(
    result.code,
    0,
    `${what}: exit ${result.code}\n${result.stderr}${result.stdout}`,
  );
}

/**
 * Builds the npm package in `dir` as JSR would from deno.json's exports;
 * returns its files by entry.
 */
async function buildPackage(
  dir: string,
): Promise<Map<string, { js: string; dts: string }>> {
  const { stripTypeScriptTypes } = await import("node:module");
  mkdirSync(dir);
  const entries = new Map<string, { js: string; dts: string }>();
  const sources: string[] = [];
  for (const [entry, path] of Object.entries(config.exports)) {
    assert.match(path, /^\.\/\w+\.ts$/, `a module at the top: ${path}`);
    const base = path.slice(2, -3);
    const source = readFileSync(join(ROOT, path), "utf8");
    const js = rewriteSpecifiers(
      stripTypeScriptTypes(source, { mode: "strip" }),
    );
    writeFileSync(join(dir, `${base}.js`), js);
    sources.push(join(ROOT, path));
    entries.set(entry, { js: `./${base}.js`, dts: `./${base}.d.ts` });
  }
  // The declarations: TypeScript's own emitter, types inferred where the
  // source leaves them out, as JSR's fast check requires of a package.
  const tsc = tool("tsc");
  assert.ok(existsSync(tsc), "TypeScript (a development dependency): npm ci");
  assertRan(
    await run([
      tsc,
      "--noCheck",
      "--declaration",
      "--emitDeclarationOnly",
      "--allowImportingTsExtensions",
      ...TSC_TARGET,
      "--outDir",
      dir,
      ...sources,
    ]),
    "tsc --declaration",
  );
  for (const { dts } of entries.values()) {
    const path = join(dir, dts);
    assert.ok(existsSync(path), `declarations ${dts}`);
    writeFileSync(path, rewriteSpecifiers(readFileSync(path, "utf8")));
  }
  writeFileSync(
    join(dir, "package.json"),
    JSON.stringify(
      {
        name: NAME,
        version: config.version,
        type: "module",
        exports: Object.fromEntries(
          [...entries].map((
            [entry, files],
          ) => [entry, { types: files.dts, default: files.js }]),
        ),
        dependencies: {},
      },
      null,
      2,
    ),
  );
  return entries;
}

const MAIN = `
import { getPortFromPortServer, pickUnusedPort, VERSION } from "${NAME}";
import { startPortServer } from "${NAME}/portserver";
import { main } from "${NAME}/cli";
import { reservePort } from "${ALIAS}";

const [address, first, last] = process.argv.slice(2);
const port = await pickUnusedPort();
const server = await startPortServer({
  address,
  pool: [[Number(first), Number(last)]],
  log: () => {},
});
const fromServer = await getPortFromPortServer(address);
await server.stop();
const reservation = await reservePort();
await reservation.release();
console.log(JSON.stringify({
  version: VERSION,
  port,
  fromServer,
  reserved: reservation.port,
  main: typeof main,
}));
`;

const TYPES = `
import { pickUnusedPort, type PickOptions } from "${NAME}";
import { type PortServer, startPortServer } from "${NAME}/portserver";
import { main } from "${NAME}/cli";
import { pickUnusedPorts, reservePort } from "${ALIAS}";

const options: PickOptions = { ports: 8080, exclude: new Set([8081]) };
export const port: number = await pickUnusedPort(options);
export const ports: number[] = await pickUnusedPorts(2);
export const server: PortServer = await startPortServer({ address: "@x" });
export const status: Promise<number> = main(["--help"]);
await using reservation = await reservePort({ reusePort: true });
export const held: number = reservation.port;
// @ts-expect-error: a port is a number, not a string
export const wrong: string = await pickUnusedPort();
`;

test(
  "npm: JSR's npm build, imitated, installed into a Node-only project, runs on plain node (library, server, CLI) and its declarations type-check",
  {
    skip: RUNTIME !== "node"
      ? "about Node.js, which reaches the package only through JSR's npm build: run by node --test"
      : false,
  },
  async () => {
    const tmp = tempDir("portpicker-npm-");
    const pools: [number, number][] = [];
    const servers: ReturnType<typeof start>[] = [];
    try {
      const entries = await buildPackage(join(tmp.path, "package"));
      assert.deepEqual(
        [...entries.keys()].sort(),
        [".", "./cli", "./portserver"],
      );

      // Packed as npm would serve it, installed offline under both names.
      const packed = await run([
        "npm",
        "pack",
        "--pack-destination",
        tmp.path,
        join(tmp.path, "package"),
      ]);
      assertRan(packed, "npm pack");
      const tarball = join(tmp.path, packed.stdout.trim().split("\n").pop()!);
      assert.ok(existsSync(tarball), tarball);
      const app = join(tmp.path, "app");
      mkdirSync(app);
      writeFileSync(
        join(app, "package.json"),
        JSON.stringify({
          name: "app",
          private: true,
          type: "module",
          dependencies: {
            [NAME]: `file:${tarball}`,
            [ALIAS]: `file:${tarball}`,
          },
        }),
      );
      assertRan(
        await run([
          "npm",
          "install",
          "--prefix",
          app,
          "--offline",
          "--no-audit",
          "--no-fund",
          "--ignore-scripts",
        ]),
        "npm install",
      );
      for (const name of [NAME, ALIAS]) {
        const installed = join(app, "node_modules", ...name.split("/"));
        for (const files of entries.values()) {
          for (const file of [files.js, files.dts]) {
            assert.ok(existsSync(join(installed, file)), `${name}/${file}`);
          }
        }
      }

      // The library and the server, from plain JavaScript.
      const node = [process.execPath, "--no-experimental-strip-types"];
      const pool = await freeRange(10);
      pools.push(pool);
      writeFileSync(join(app, "main.mjs"), MAIN);
      const address = uniqueName("npm");
      const result = await run([
        ...node,
        join(app, "main.mjs"),
        address,
        String(pool[0]),
        String(pool[1]),
      ]);
      assertRan(result, "main.mjs");
      const out = JSON.parse(result.stdout);
      assert.equal(out.version, config.version);
      assert.equal(out.main, "function");
      for (const port of [out.port, out.reserved]) {
        assert.ok(
          Number.isInteger(port) && port > 0 && port < 65536,
          `${port}`,
        );
      }
      assert.ok(
        out.fromServer >= pool[0] && out.fromServer <= pool[1],
        `${out.fromServer} from the server's pool ${poolSpec(pool)}`,
      );

      // The command line, as the README tells Node and Bun users to run it.
      const cli = join(app, "node_modules", ...ALIAS.split("/"), "cli.js");
      for (const runtime of [node, [tool("bun")]]) {
        const picked = await run([...runtime, cli]);
        assertRan(picked, `${runtime[0]} cli.js`);
        assert.match(picked.stdout, /^\d+\n$/);
      }
      const serverPool = await freeRange(10);
      pools.push(serverPool);
      const serverAddress = uniqueName("npm-serve");
      const server = start([
        ...node,
        cli,
        "serve",
        "--address",
        serverAddress,
        "--pool",
        poolSpec(serverPool),
      ], { PORTSERVER_ADDRESS: undefined });
      servers.push(server);
      await server.waitFor(/Serving on/);
      const two = await run([
        ...node,
        cli,
        "-n",
        "2",
        "--portserver",
        serverAddress,
      ]);
      assertRan(two, "cli.js -n 2 --portserver");
      const ports = two.stdout.trim().split("\n").map(Number);
      assert.equal(ports.length, 2);
      for (const port of ports) {
        assert.ok(port >= serverPool[0] && port <= serverPool[1], `${port}`);
      }
      assert.equal(await server.stop(), 0, server.stderr());

      // The declarations, as a TypeScript user of the package sees them.
      writeFileSync(join(app, "check.mts"), TYPES);
      assertRan(
        await run([
          tool("tsc"),
          "--noEmit",
          "--strict",
          ...TSC_TARGET,
          join(app, "check.mts"),
        ]),
        "tsc on the package's declarations",
      );
    } finally {
      for (const server of servers) await server.stop("SIGKILL");
      for (const pool of pools) releaseRange(pool);
      tmp.remove();
    }
  },
);
