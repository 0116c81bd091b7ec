/**
 * The trivial reply server, the runtime's own limit: on Deno or Bun, it
 * listens where the port server would (an abstract Unix socket, `@name`),
 * reads a line and replies `15000\n`, through the runtime's native socket API
 * (`Deno.listen`, `Bun.listen`), and imports nothing.
 *
 * Usage: trivial.ts @name
 */

interface BunSocket {
  end(data: string): void;
}
type OnData = (socket: BunSocket, chunk: Uint8Array) => void;
const bun = (globalThis as {
  Bun?: {
    argv: string[];
    listen(o: { unix: string; socket: { data: OnData } }): unknown;
  };
}).Bun;

const address = bun ? bun.argv[2] : Deno.args[0];
const path = `\0${address.slice(1)}`;
const reply = new TextEncoder().encode("15000\n");

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

if (bun) {
  const data: OnData = (s, chunk) => chunk.includes(10) && s.end("15000\n");
  bun.listen({ unix: path, socket: { data } });
} else {
  const listener = Deno.listen({ transport: "unix", path });
  (async () => {
    for await (const conn of listener) serve(conn);
  })();
}
console.log(`Serving on ${address}`);
