// Plain canvas charts for the web UI (no chart library: the page works offline).
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

// series: {name: [[x, y], ...]}; every series shares the x axis (global step). The y range is the data's, or
// opts.range; series named in opts.right get their own range, labelled on the right (e.g. the drift beside rates).
function drawLines(canvas, series, title, opts = {}) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 40;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui"; ctx.fillStyle = "#222"; ctx.fillText(title, pad, 14);
  const pts = Object.values(series).flat();
  if (!pts.length) { ctx.fillStyle = "#888"; ctx.fillText("no points yet", W / 2 - 30, H / 2); return 0; }
  const right = opts.right || [], side = name => right.includes(name) ? "right" : "left";
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  if (x1 === x0) x1 = x0 + 1;
  const ranges = {};
  ["left", "right"].forEach(s => {
    const ys = Object.entries(series).filter(([n]) => side(n) === s).flatMap(([, v]) => v.map(p => p[1]));
    let [y0, y1] = s === "left" && opts.range ? opts.range : [Math.min(...ys), Math.max(...ys)];
    if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
    ranges[s] = ys.length ? [y0, y1] : null;
  });
  const X = x => pad + (x - x0) / (x1 - x0) * (W - 2 * pad);
  const Y = (y, s) => H - pad + 10 - (y - ranges[s][0]) / (ranges[s][1] - ranges[s][0]) * (H - 2 * pad);
  ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(pad, 20); ctx.lineTo(pad, H - pad + 10); ctx.lineTo(W - pad, H - pad + 10); ctx.stroke();
  ctx.fillStyle = "#555";
  if (ranges.left) ranges.left.forEach(y => ctx.fillText(y.toPrecision(3), 2, Y(y, "left") + 4));
  if (ranges.right) ranges.right.forEach(y => ctx.fillText(y.toPrecision(3), W - pad + 4, Y(y, "right") + 4));
  ctx.fillText("step " + x0, pad, H - 8); ctx.fillText("step " + x1, W - pad - 50, H - 8);
  Object.entries(series).forEach(([name, s], i) => {
    ctx.strokeStyle = ctx.fillStyle = COLORS[i % COLORS.length];
    ctx.setLineDash(right.includes(name) ? [5, 4] : []);
    ctx.beginPath();
    s.forEach(([x, y], j) => j ? ctx.lineTo(X(x), Y(y, side(name))) : ctx.moveTo(X(x), Y(y, side(name))));
    ctx.stroke();
    s.forEach(([x, y]) => ctx.fillRect(X(x) - 2, Y(y, side(name)) - 2, 4, 4));
    ctx.fillText(name + (right.includes(name) ? " (right scale)" : ""), W - pad - 160, 30 + 14 * i);
  });
  ctx.setLineDash([]);
  return pts.length;
}

// The eval report: one group of bars per metric, one bar per row (base, tuned).
function drawBars(canvas, results, metrics) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 30;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui";
  const rows = Object.keys(results), keys = metrics.filter(k => rows.every(r => typeof results[r][k] === "number"));
  const top = Math.max(1e-9, ...keys.flatMap(k => rows.map(r => results[r][k])));
  const group = (W - 2 * pad) / Math.max(keys.length, 1), bar = group * 0.8 / Math.max(rows.length, 1);
  keys.forEach((k, i) => {
    rows.forEach((r, j) => {
      const h = results[r][k] / top * (H - 3 * pad);
      ctx.fillStyle = COLORS[j % COLORS.length];
      ctx.fillRect(pad + i * group + j * bar, H - 2 * pad - h, bar - 2, h);
    });
    ctx.fillStyle = "#333"; ctx.fillText(k.slice(0, 16), pad + i * group, H - 2 * pad + 14);
  });
  rows.forEach((r, j) => { ctx.fillStyle = COLORS[j % COLORS.length]; ctx.fillText(r, W - 120, 14 + 14 * j); });
}
