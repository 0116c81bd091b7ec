export function serveCommand(_args: string[]): Promise<number> {
  return Promise.resolve(1);
}
