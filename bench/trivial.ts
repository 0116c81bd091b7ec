/**
 * The runtime's own sockets: the least any correct port server on Deno or Bun
 * can do. It listens where the port server would (an abstract Unix socket,
 * `@name`), reads a line, binds one TCP and one UDP socket on the wildcard
 * address (port 0) and closes them at once, as a check of a port does, then
 * replies `15000\n`; all through the runtime's native API (`Deno.listen` and
 * `Deno.listenDatagram`, which need `--unstable-net`; `Bun.listen` and
 * `Bun.udpSocket`), importing nothing.
 *
 * Usage: trivial.ts @name
 */

// deno-lint-ignore no-explicit-any
const bun = (globalThis as any).Bun;
const address: string = bun ? bun.argv[2] : Deno.args[0];
const path = `\0${address.slice(1)}`;
const [hostname, port] = ["0.0.0.0", 0];
const reply = new TextEncoder().encode("15000\n");

/** One TCP and one UDP bind, each closed at once. */
async function bindBoth(): Promise<void> {
  if (bun) {
    bun.listen({ hostname, port, socket: { data() {} } }).stop(true);
    (await bun.udpSocket({ hostname, port })).close();
  } else {
    Deno.listen({ hostname, port }).close();
    Deno.listenDatagram({ hostname, port, transport: "udp" }).close();
  }
}

/** On Deno: reads to the first newline, binds, then replies and closes. */
async function serve(conn: Deno.UnixConn): Promise<void> {
  const buffer = new Uint8Array(64);
  try {
    for (let n; (n = await conn.read(buffer)) !== null;) {
      if (buffer.subarray(0, n).includes(10)) {
        await bindBoth();
        await conn.write(reply);
        break;
      }
    }
  } catch { /* the client went away */ }
  conn.close();
}

type BunSocket = { end(data: string): void };
/** On Bun: at the newline, binds, then replies (or closes, on an error). */
const data = (s: BunSocket, chunk: Uint8Array) =>
  chunk.includes(10) &&
  bindBoth().then(() => s.end("15000\n"), () => s.end(""));
const listener = bun
  ? bun.listen({ unix: path, socket: { data } })
  : Deno.listen({ transport: "unix", path });
console.log(`Serving on ${address}`);
if (!bun) { for await (const conn of listener) serve(conn); }
