// Charts drawn as SVG by hand: a line chart (several series, a legend, named
// axes, a linear or logarithmic y axis, event markers and shaded spans) and
// a stacked horizontal bar chart. No library: the page has nothing to build
// and loads nothing from outside the service.

const SVG = "http://www.w3.org/2000/svg";
const PAD = { l: 56, r: 12, t: 10, b: 34 };

function el(tag, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) node.setAttribute(k, String(v));
  if (parent) parent.append(node);
  return node;
}

function label(text, attrs, parent) {
  const node = el("text", attrs, parent);
  node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- scales

/** About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k). */
export function linearTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw * (1 - 1e-9));
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Powers of ten in [lo, hi] (every k-th over many decades, at most about
 * `count`); with fewer than three decades, also 2× and 5×. */
export function logTicks(lo, hi, count = 6) {
  const first = Math.ceil(Math.log10(lo) - 1e-9), last = Math.floor(Math.log10(hi) + 1e-9);
  const ticks = [], stride = Math.max(1, Math.ceil((last - first + 1) / count));
  if (Math.log10(hi / lo) < 3) {
    for (let e = first - 1; e <= last; e++) {
      for (const m of [1, 2, 5]) {
        const v = Number((m * 10 ** e).toPrecision(12));
        if (v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9)) ticks.push(v);
      }
    }
  } else {
    for (let e = last; e >= first; e -= stride) ticks.unshift(Number((10 ** e).toPrecision(12)));
  }
  return ticks.length ? ticks : [lo, hi];
}

/** The y domain of the values: a log axis spans the positive values only
 * (a value <= 0 is drawn on its lower edge), a linear one is widened to round ticks. */
export function yDomain(values, scale) {
  if (scale === "log") {
    const pos = values.filter(v => v > 0);
    if (!pos.length) return [0.1, 1];
    let lo = Math.min(...pos), hi = Math.max(...pos);
    if (hi / lo < 1.0001) { lo /= 2; hi *= 2; }
    return [lo, hi];
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-12) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const ticks = linearTicks(lo, hi), step = ticks.length > 1 ? ticks[1] - ticks[0] : hi - lo;
  const round = v => Number(v.toPrecision(12));
  return [round(Math.floor(lo / step + 1e-9) * step), round(Math.ceil(hi / step - 1e-9) * step)];
}

function format(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(0).replace("e+", "e");
  return String(Number(v.toPrecision(3)));
}

/** At most two points per pixel column (the lowest and the highest), in
 * order: a long history draws as fast as a short one and looks the same. */
export function thin(points, toX, columns) {
  if (points.length <= 2 * columns) return points;
  const kept = [];
  let col = null, lo = null, hi = null;
  const flush = () => { if (lo) { kept.push(...(lo[0] <= hi[0] ? (lo === hi ? [lo] : [lo, hi]) : [hi, lo])); } };
  for (const p of points) {
    const c = Math.round(toX(p[0]));
    if (c !== col) { flush(); col = c; lo = hi = p; continue; }
    if (p[1] < lo[1]) lo = p;
    if (p[1] > hi[1]) hi = p;
  }
  flush();
  return kept;
}

// ---------------------------------------------------------------- line chart

/**
 * Draw `spec` into the <svg> `svg`:
 *   series:  [{id, label, color, dashed, points: [[step, value], ...]}]
 *   markers: [{x, color, kind, title}]       vertical lines at a step
 *   spans:   [{x0, x1, color, kind, title}]  shaded step ranges (replays)
 *   xLabel, yLabel, scale ("linear" | "log")
 * The svg carries data-scale, data-points (points of all series) and
 * data-ymin / data-ymax (the y domain); each path carries data-series and data-points.
 */
export function lineChart(svg, spec) {
  const w = Math.max(240, svg.clientWidth || svg.parentNode.clientWidth || 480);
  const h = Math.max(160, svg.clientHeight || 220);
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const scale = spec.scale === "log" ? "log" : "linear";
  const series = spec.series.filter(s => s.points.length);
  svg.dataset.scale = scale;
  svg.dataset.points = String(spec.series.reduce((n, s) => n + s.points.length, 0));
  const plotW = w - PAD.l - PAD.r, plotH = h - PAD.t - PAD.b;
  label(spec.xLabel, { x: PAD.l + plotW / 2, y: h - 4, "text-anchor": "middle", class: "axis-name x" }, svg);
  label(spec.yLabel + (scale === "log" ? " (log)" : ""), {
    x: -(PAD.t + plotH / 2), y: 12, transform: "rotate(-90)", "text-anchor": "middle", class: "axis-name y" }, svg);
  if (!series.length) {
    delete svg.dataset.ymin; delete svg.dataset.ymax;
    label("no data yet", { x: PAD.l + 8, y: PAD.t + 16, class: "empty" }, svg);
    return;
  }
  const xs = series.flatMap(s => [s.points[0][0], s.points[s.points.length - 1][0]]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const [y0, y1] = yDomain(series.flatMap(s => s.points.map(p => p[1])), scale);
  svg.dataset.ymin = String(y0); svg.dataset.ymax = String(y1);
  const X = x => PAD.l + (x - x0) / (x1 - x0) * plotW;
  const f = scale === "log" ? v => Math.log10(Math.max(v, y0)) : v => v;
  const Y = v => PAD.t + plotH - (f(v) - f(y0)) / (f(y1) - f(y0)) * plotH;

  const grid = el("g", { class: "grid" }, svg);
  for (const t of scale === "log" ? logTicks(y0, y1) : linearTicks(y0, y1)) {
    el("line", { x1: PAD.l, x2: PAD.l + plotW, y1: Y(t), y2: Y(t) }, grid);
    label(format(t), { x: PAD.l - 4, y: Y(t) + 4, "text-anchor": "end", class: "tick y" }, grid);
  }
  for (const t of linearTicks(x0, x1, Math.max(2, Math.floor(plotW / 90))).filter(Number.isInteger)) {
    el("line", { x1: X(t), x2: X(t), y1: PAD.t + plotH, y2: PAD.t + plotH + 4 }, grid);
    label(String(t), { x: X(t), y: PAD.t + plotH + 15, "text-anchor": "middle", class: "tick x" }, grid);
  }
  el("rect", { x: PAD.l, y: PAD.t, width: plotW, height: plotH, class: "frame" }, svg);

  const inside = x => x >= x0 && x <= x1;
  for (const s of spec.spans || []) {
    const a = Math.max(s.x0, x0), b = Math.min(s.x1, x1);
    if (b < a) continue;
    const r = el("rect", { x: X(a), y: PAD.t, width: Math.max(2, X(b) - X(a)), height: plotH, fill: s.color,
                           class: "span " + s.kind }, svg);
    el("title", {}, r).textContent = s.title;
  }
  for (const m of (spec.markers || []).filter(m => inside(m.x))) {
    const g = el("g", { class: "marker " + m.kind, "data-kind": m.kind, "data-step": m.x }, svg);
    el("line", { x1: X(m.x), x2: X(m.x), y1: PAD.t, y2: PAD.t + plotH, stroke: m.color }, g);
    el("circle", { cx: X(m.x), cy: PAD.t + 4, r: 3.5, fill: m.color }, g);
    el("title", {}, g).textContent = m.title;
  }
  const lines = el("g", { class: "lines" }, svg);
  for (const s of series) {
    const pts = thin(s.points, X, plotW);
    const d = pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    el("path", { d, stroke: s.color, "stroke-dasharray": s.dashed ? "5 3" : null, class: "series",
                 "data-series": s.id, "data-points": s.points.length }, lines);
    if (s.points.length === 1) el("circle", { cx: X(s.points[0][0]), cy: Y(s.points[0][1]), r: 2.5, fill: s.color }, lines);
  }
}

/** The legend of a chart's series, as HTML list items (each with data-series). */
export function legend(list, series) {
  list.replaceChildren(...series.filter(s => s.points.length).map(s => {
    const li = document.createElement("li");
    li.dataset.series = s.id;
    const swatch = document.createElementNS(SVG, "svg");
    swatch.setAttribute("width", "22"); swatch.setAttribute("height", "8");
    el("line", { x1: 1, x2: 21, y1: 4, y2: 4, stroke: s.color, "stroke-width": 2,
                 "stroke-dasharray": s.dashed ? "5 3" : null }, swatch);
    li.append(swatch, document.createTextNode(s.label));
    return li;
  }));
}

// ---------------------------------------------------------------- bar chart

/**
 * Stacked horizontal bars: rows [{label, flag, parts: [{name, value, color}]}],
 * one bar per row, all on one seconds axis. Each bar part carries
 * data-row, data-part and data-value; a row with `flag` gets it as a class.
 */
export function barChart(svg, rows, xLabel) {
  const w = Math.max(240, svg.clientWidth || svg.parentNode.clientWidth || 480);
  const bar = 18, gap = 8, h = PAD.t + rows.length * (bar + gap) + PAD.b;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("height", String(h));
  const left = 84, plotW = w - left - PAD.r - (rows.some(r => r.flag) ? 64 : 0);
  const top = Math.max(1e-12, ...rows.map(r => r.parts.reduce((a, p) => a + p.value, 0)));
  const ticks = linearTicks(0, top, Math.max(2, Math.floor(plotW / 80)));
  const hi = Math.max(top, ticks[ticks.length - 1]);
  const X = v => left + v / hi * plotW;
  const grid = el("g", { class: "grid" }, svg);
  const bottom = PAD.t + rows.length * (bar + gap);
  for (const t of ticks) {
    el("line", { x1: X(t), x2: X(t), y1: PAD.t, y2: bottom }, grid);
    label(format(t), { x: X(t), y: bottom + 14, "text-anchor": "middle", class: "tick x" }, grid);
  }
  label(xLabel, { x: left + plotW / 2, y: h - 4, "text-anchor": "middle", class: "axis-name x" }, svg);
  rows.forEach((row, i) => {
    const y = PAD.t + i * (bar + gap);
    const g = el("g", { class: "bar" + (row.flag ? " " + row.flag : ""), "data-row": row.label }, svg);
    label(row.label, { x: left - 6, y: y + bar / 2 + 4, "text-anchor": "end", class: "tick y" }, g);
    let at = 0;
    for (const p of row.parts) {
      const r = el("rect", { x: X(at), y, width: Math.max(0, X(at + p.value) - X(at)), height: bar, fill: p.color,
                             "data-row": row.label, "data-part": p.name, "data-value": p.value }, g);
      el("title", {}, r).textContent = `${row.label} ${p.name}: ${format(p.value)} s`;
      at += p.value;
    }
    if (row.flag) label(row.flag, { x: X(at) + 4, y: y + bar / 2 + 4, class: "flag" }, g);
  });
}
