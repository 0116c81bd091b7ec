/**
 * The bench's SVG chart, written by hand: one horizontal bar per headline
 * ratio, on a log scale centred on 1×, so that 2× better and 2× worse are bars
 * of the same length on either side of the 1× line.
 */

/** A ratio where above 1 means ours is better; the target is drawn as a tick. */
export type Bar = { label: string; value?: number; target?: number };

const [WIDTH, LABELS, LEFT, RIGHT, ROW, TOP] = [800, 340, 350, 740, 24, 62];
const GREY = ` text-anchor="middle" fill="#555555"`;
const TITLE = "portpicker (TypeScript) against Python's portpicker";
const SUBTITLE = "Above 1×, ours is better. Server: requests per second.";
const LEGEND =
  "Green: target met (or above 1× where there is no target); red: not. Black tick: the target. Log scale.";

const text = (x: number | string, y: number, s: string, more = "") =>
  `<text x="${x}" y="${y}"${more}>${
    s.replaceAll("&", "&amp;").replaceAll("<", "&lt;")
  }</text>`;
const line = (x: string, y1: number, y2: number, style: string) =>
  `<line x1="${x}" y1="${y1}" x2="${x}" y2="${y2}" ${style}/>`;

/** The chart of `bars`; `machine` (its cores, the day) ends the subtitle. */
export function renderChart(bars: Bar[], machine: string) {
  const shown = bars.flatMap((b) => [b.value ?? 1, b.target ?? 1])
    .filter((v) => v > 0 && Number.isFinite(v));
  // Whole decades on both sides of 1×, wide enough for every bar and target.
  const low = Math.floor(Math.log10(Math.min(0.5, ...shown)));
  const high = Math.ceil(Math.log10(Math.max(2, ...shown)));
  const x = (v: number) =>
    (LEFT + (Math.log10(v) - low) / (high - low) * (RIGHT - LEFT)).toFixed(1);
  const bottom = TOP + bars.length * ROW;
  const [w, h] = [WIDTH, bottom + 58];
  const bold = ` text-anchor="middle" font-size="16" font-weight="bold"`;
  const out = [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="${w}" height="${h}" fill="#ffffff"/>`,
    text(w / 2, 22, TITLE, bold),
    text(w / 2, 42, `${SUBTITLE} ${machine}.`, GREY),
  ];
  for (let e = low; e <= high; e++) {
    for (const tick of [1, 2, 5].map((step) => step * 10 ** e)) {
      if (tick > 10 ** high * 1.001) continue;
      out.push(line(x(tick), TOP - 4, bottom, `stroke="#e4e4e4"`));
      out.push(text(x(tick), bottom + 16, `${+tick.toPrecision(1)}×`, GREY));
    }
  }
  bars.forEach(({ label, value, target }, i) => {
    const y = TOP + i * ROW;
    out.push(text(LABELS, y + 16, label, ` text-anchor="end"`));
    if (value === undefined || !(value > 0)) {
      out.push(text(+x(1) + 6, y + 16, "not measured", ` fill="#b00020"`));
    } else {
      const v = Math.min(Math.max(value, 10 ** low), 10 ** high);
      const [from, to] = [x(Math.min(1, v)), x(Math.max(1, v))];
      const width = Math.max(+to - +from, 1).toFixed(1);
      const fill = value >= (target ?? 1) ? "#2e7d32" : "#c62828";
      const [dx, anchor] = v >= 1 ? [5, "start"] : [-5, "end"];
      const [at, top] = [` text-anchor="${anchor}"`, y + 4];
      out.push(
        `<rect x="${from}" y="${top}" width="${width}" height="16" fill="${fill}"/>`,
        text(+x(v) + dx, y + 16, `${value.toFixed(2)}×`, at),
      );
    }
    const style = `stroke="#111111" stroke-width="3"`;
    if (target !== undefined) out.push(line(x(target), y + 1, y + 23, style));
  });
  const axis = `stroke="#111111" stroke-width="1.5"`;
  out.push(line(x(1), TOP - 8, bottom, axis));
  out.push(text(w / 2, bottom + 40, LEGEND, GREY), `</svg>`, "");
  return out.join("\n");
}
