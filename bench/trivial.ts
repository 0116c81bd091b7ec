/**
 * The trivial reply server, the runtime's own limit: on Deno or Bun, it
 * listens where the port server would (an abstract Unix socket, `@name`),
 * reads a line and replies `15000\n`, through the runtime's native socket API
 * (`Deno.listen`, `Bun.listen`), and imports nothing.
 *
 * Usage: trivial.ts @name
 */

// deno-lint-ignore no-explicit-any
const bun = (globalThis as any).Bun;
const address: string = bun ? bun.argv[2] : Deno.args[0];
const path = `\0${address.slice(1)}`;
const reply = new TextEncoder().encode("15000\n");

/** On Deno: reads to the first newline, then replies and closes. */
async function serve(conn: Deno.UnixConn): Promise<void> {
  const buffer = new Uint8Array(64);
  try {
    for (let n; (n = await conn.read(buffer)) !== null;) {
      if (buffer.subarray(0, n).includes(10)) {
        await conn.write(reply);
        break;
      }
    }
  } catch { /* the client went away */ }
  conn.close();
}

type BunSocket = { end(data: string): void };
const data = (s: BunSocket, chunk: Uint8Array) =>
  chunk.includes(10) && s.end("15000\n");
const listener = bun
  ? bun.listen({ unix: path, socket: { data } })
  : Deno.listen({ transport: "unix", path });
console.log(`Serving on ${address}`);
if (!bun) { for await (const conn of listener) serve(conn); }
