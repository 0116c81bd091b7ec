/**
 * The bench's SVG chart, written by hand (no dependencies): one horizontal
 * bar per headline ratio, on a log scale centred on 1×, so that 2× faster and
 * 2× slower are bars of the same length on either side of the 1× line.
 */

/** One bar: a ratio where above 1 means ours is better. */
export interface Bar {
  label: string;
  /** Undefined when the figure could not be measured. */
  value: number | undefined;
  /** The target's ratio, drawn as a marker on the bar's row. */
  target?: number;
}

const WIDTH = 800;
const LABEL_WIDTH = 340;
const PLOT_LEFT = LABEL_WIDTH + 10;
const PLOT_RIGHT = WIDTH - 60;
const ROW = 24;
const TOP = 62;
const BOTTOM = 58;

function escapeXml(text: string): string {
  return text.replaceAll("&", "&amp;").replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;").replaceAll('"', "&quot;");
}

/** A ratio as the report shows it, so that chart and tables agree. */
function formatRatio(value: number): string {
  return `${value.toFixed(2)}×`;
}

/** Tick values 1, 2, 5 × 10^k inside the domain. */
function ticks(low: number, high: number): number[] {
  const out: number[] = [];
  for (let exponent = -3; exponent <= 4; exponent++) {
    for (const step of [1, 2, 5]) {
      const value = step * 10 ** exponent;
      if (value >= low * 0.999 && value <= high * 1.001) out.push(value);
    }
  }
  return out;
}

/** The chart as an SVG document. */
export function renderChart(
  bars: Bar[],
  title: string,
  subtitle: string,
): string {
  const shown = bars.flatMap((b) => [b.value, b.target]).filter((
    v,
  ): v is number => v !== undefined && v > 0 && Number.isFinite(v));
  // Whole decades on both sides of 1×, wide enough for every bar and target.
  const low = 10 ** Math.floor(Math.log10(Math.min(0.5, ...shown)));
  const high = 10 ** Math.ceil(Math.log10(Math.max(2, ...shown)));
  const x = (value: number): number =>
    PLOT_LEFT +
    (Math.log10(value) - Math.log10(low)) /
      (Math.log10(high) - Math.log10(low)) * (PLOT_RIGHT - PLOT_LEFT);
  const height = TOP + bars.length * ROW + BOTTOM;
  const plotBottom = TOP + bars.length * ROW;
  const out: string[] = [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${height}" viewBox="0 0 ${WIDTH} ${height}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="${WIDTH}" height="${height}" fill="#ffffff"/>`,
    `<text x="${
      WIDTH / 2
    }" y="22" text-anchor="middle" font-size="16" font-weight="bold">${
      escapeXml(title)
    }</text>`,
    `<text x="${WIDTH / 2}" y="42" text-anchor="middle" fill="#555555">${
      escapeXml(subtitle)
    }</text>`,
  ];
  for (const tick of ticks(low, high)) {
    const tx = x(tick).toFixed(1);
    out.push(
      `<line x1="${tx}" y1="${
        TOP - 4
      }" x2="${tx}" y2="${plotBottom}" stroke="#e4e4e4"/>`,
      `<text x="${tx}" y="${
        plotBottom + 16
      }" text-anchor="middle" fill="#555555">${tick}×</text>`,
    );
  }
  bars.forEach((bar, i) => {
    const y = TOP + i * ROW;
    const middle = y + ROW / 2;
    out.push(
      `<text x="${LABEL_WIDTH}" y="${middle + 4}" text-anchor="end">${
        escapeXml(bar.label)
      }</text>`,
    );
    if (bar.value === undefined || !(bar.value > 0)) {
      out.push(
        `<text x="${x(1) + 6}" y="${
          middle + 4
        }" fill="#b00020">not measured</text>`,
      );
    } else {
      const value = Math.min(Math.max(bar.value, low), high);
      const from = Math.min(x(1), x(value));
      const width = Math.max(Math.abs(x(value) - x(1)), 1);
      const good = bar.value >= (bar.target ?? 1);
      const right = value >= 1;
      out.push(
        `<rect x="${from.toFixed(1)}" y="${y + 4}" width="${
          width.toFixed(1)
        }" height="${ROW - 8}" fill="${good ? "#2e7d32" : "#c62828"}"/>`,
        `<text x="${(right ? x(value) + 5 : x(value) - 5).toFixed(1)}" y="${
          middle + 4
        }" text-anchor="${right ? "start" : "end"}">${
          formatRatio(bar.value)
        }</text>`,
      );
    }
    if (bar.target !== undefined) {
      const tx = x(bar.target).toFixed(1);
      out.push(
        `<line x1="${tx}" y1="${y + 1}" x2="${tx}" y2="${
          y + ROW - 1
        }" stroke="#111111" stroke-width="3"/>`,
      );
    }
  });
  const one = x(1).toFixed(1);
  out.push(
    `<line x1="${one}" y1="${
      TOP - 8
    }" x2="${one}" y2="${plotBottom}" stroke="#111111" stroke-width="1.5"/>`,
    `<text x="${WIDTH / 2}" y="${
      plotBottom + 40
    }" text-anchor="middle" fill="#555555">Green: target met (or above 1× where there is no target); red: not. Black tick: the target. Log scale.</text>`,
    `</svg>`,
    "",
  );
  return out.join("\n");
}
