// The timeline of one volume: a time axis from the horizon to now with
// the group's write rate drawn along it (uPlot, vendored), and on it the
// tags (by source), events, gaps, flush points when zoomed in far enough,
// and the chosen point. Drag to zoom, click to choose, hover for details;
// with the keyboard, arrows step between marks and + / - / 0 zoom.

// Okabe–Ito colours, which colour-blind readers can tell apart; every
// source also has its own shape and its name in the tooltip and list.
export const SOURCES = {
  manual: { colour: "#0072B2", shape: "circle" },
  schedule: { colour: "#009E73", shape: "square" },
  log: { colour: "#E69F00", shape: "triangle" },
  hook: { colour: "#CC79A7", shape: "diamond" },
  anomaly: { colour: "#D55E00", shape: "down" },
  event: { colour: "#56B4E9", shape: "square" },
};
const EVENT_COLOUR = "#444444";
const GAP_COLOUR = "#D55E00";
const FLUSH_COLOUR = "#7a7a7a";
// Flush points are drawn one by one below this span (seconds).
const FLUSH_ZOOM = 6 * 3600;

export function parseTime(text) {
  // RFC 3339 with up to nine fraction digits: Date takes three.
  const m = /^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$/.exec(text || "");
  if (!m) return NaN;
  const frac = m[2] ? m[2].slice(0, 4) : "";
  return Date.parse(m[1] + frac + m[3]) / 1000;
}

export function tagDetail(detail) {
  // "source=manual consistency=crash verified=none note=…"
  const out = {};
  for (const m of (detail || "").matchAll(/(\w+)=("(?:[^"\\]|\\.)*"|\S+)/g)) {
    out[m[1]] = m[2].startsWith('"') ? JSON.parse(m[2]) : m[2];
  }
  return out;
}

function drawShape(ctx, shape, x, y, r, colour, filled) {
  ctx.beginPath();
  switch (shape) {
    case "square":
      ctx.rect(x - r, y - r, 2 * r, 2 * r);
      break;
    case "triangle":
      ctx.moveTo(x, y - r);
      ctx.lineTo(x + r, y + r);
      ctx.lineTo(x - r, y + r);
      ctx.closePath();
      break;
    case "down":
      ctx.moveTo(x - r, y - r);
      ctx.lineTo(x + r, y - r);
      ctx.lineTo(x, y + r);
      ctx.closePath();
      break;
    case "diamond":
      ctx.moveTo(x, y - r);
      ctx.lineTo(x + r, y);
      ctx.lineTo(x, y + r);
      ctx.lineTo(x - r, y);
      ctx.closePath();
      break;
    default:
      ctx.arc(x, y, r, 0, 2 * Math.PI);
  }
  ctx.strokeStyle = colour;
  ctx.lineWidth = 2;
  if (filled) {
    ctx.fillStyle = colour;
    ctx.fill();
  } else {
    ctx.fillStyle = "#ffffff";
    ctx.fill();
  }
  ctx.stroke();
}

export class Timeline {
  constructor(element, { fetchActivity, fetchFlushes, onChoose, tooltip }) {
    this.element = element;
    this.fetchActivity = fetchActivity;
    this.fetchFlushes = fetchFlushes;
    this.onChoose = onChoose;
    this.tooltip = tooltip;
    this.marks = [];
    this.flushes = [];
    this.chosen = null;
    this.range = null; // [min, max] seconds while zoomed, else null
    this.history = null;
    this.hover = null;
    this.downAt = null;
    this.plot = new uPlot(this.options(), [[], []], element);
    this.plot.over.addEventListener("mousedown", (e) => (this.downAt = [e.clientX, e.clientY]));
    this.plot.over.addEventListener("click", (e) => this.click(e));
    // While the pointer is on the chart the axis holds still (a
    // now-anchored axis moves a few pixels a second), so what is under
    // the pointer is what a click chooses.
    this.hovering = false;
    this.plot.over.addEventListener("mouseenter", () => (this.hovering = true));
    this.plot.over.addEventListener("mouseleave", () => {
      this.hovering = false;
      this.showTooltip(null);
    });
    element.addEventListener("keydown", (e) => this.key(e));
    // The browser tests find marks through this to click them.
    element.tidemarkTimeline = this;
    new ResizeObserver(() => this.resize()).observe(element);
  }

  options() {
    return {
      width: Math.max(300, this.element.clientWidth),
      height: 230,
      legend: { show: false },
      scales: {
        x: { time: true },
        y: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.25)] },
      },
      axes: [
        { stroke: "#333", grid: { stroke: "#eee" } },
        { stroke: "#333", grid: { stroke: "#eee" }, size: 56, label: "records/s", labelSize: 18 },
      ],
      series: [
        {},
        {
          label: "write rate",
          stroke: "#0072B2",
          fill: "rgba(0,114,178,0.12)",
          width: 1.5,
          paths: uPlot.paths.stepped({ align: 1 }),
          points: { show: false },
        },
      ],
      cursor: { drag: { x: true, y: false, setScale: false }, points: { show: false } },
      hooks: {
        draw: [(u) => this.drawMarks(u)],
        setSelect: [(u) => this.selected(u)],
        setCursor: [(u) => this.moved(u)],
      },
    };
  }

  resize() {
    const width = Math.max(300, this.element.clientWidth);
    if (Math.abs(width - this.plot.width) > 2) {
      this.plot.setSize({ width, height: 230 });
      this.load();
    }
  }

  // The volume's history and the marks to draw on it. `entries` are the
  // timeline's entries (tags, events, gaps, runs of flushes).
  set(history, entries) {
    this.history = history;
    this.marks = entries
      .filter((e) => e.kind !== "flush")
      .map((e) => ({ ...e, t: parseTime(e.time), tag: e.kind === "tag" ? tagDetail(e.detail) : null }))
      .filter((m) => !Number.isNaN(m.t))
      .sort((a, b) => a.t - b.t);
    this.plot.redraw(false, false);
  }

  span() {
    if (this.range) return this.range;
    const h = this.history;
    if (!h) return [Date.now() / 1000 - 3600, Date.now() / 1000];
    const from = parseTime(h.horizon_time);
    const now = Date.now() / 1000;
    // Never a zero-width axis: a new volume shows at least its last minute;
    // a little room after now, so marks made just now are not cut in half.
    const min = Math.min(from, now - 60);
    return [min, now + Math.max(1, (now - min) * 0.02)];
  }

  // A live update: reloads the axis unless the pointer is on it.
  refresh() {
    if (!this.hovering) this.load();
  }

  async load() {
    const [min, max] = this.span();
    const buckets = Math.max(20, Math.min(600, Math.floor(this.plot.width / 4)));
    const iso = (s) => new Date(s * 1000).toISOString();
    try {
      const activity = await this.fetchActivity(iso(min), iso(max), buckets);
      const xs = activity.buckets.map((b) => parseTime(b.time));
      const per = activity.seconds_per_bucket || 1;
      const ys = activity.buckets.map((b) => b.records / per);
      xs.push(max);
      ys.push(ys.length ? ys[ys.length - 1] : 0);
      this.flushes = [];
      if (max - min <= FLUSH_ZOOM) {
        const f = await this.fetchFlushes(iso(min), iso(max));
        this.flushes = f.flushes.map((p) => ({ kind: "flush", seq: p.seq, time: p.time, t: parseTime(p.time), name: "flush" }));
        this.flushesMore = f.more;
      }
      this.plot.batch(() => {
        this.plot.setData([xs, ys], false);
        this.plot.setScale("x", { min, max });
      });
    } catch (e) {
      console.warn("timeline: " + e.message);
    }
  }

  zoomTo(min, max) {
    const h = this.history;
    const floor = h ? parseTime(h.horizon_time) : min;
    min = Math.max(min, Math.min(floor, max - 1));
    const now = Date.now() / 1000;
    max = Math.min(max, now + Math.max(1, (max - min) * 0.02));
    if (max - min < 1) max = min + 1;
    this.range = [min, max];
    this.load();
  }

  reset() {
    this.range = null;
    this.load();
  }

  zoom(factor) {
    const [min, max] = this.span();
    const centre = this.chosen ? this.chosen.t : (min + max) / 2;
    const half = ((max - min) * factor) / 2;
    this.zoomTo(centre - half, centre + half);
  }

  selected(u) {
    if (u.select.width < 4) return;
    const min = u.posToVal(u.select.left, "x");
    const max = u.posToVal(u.select.left + u.select.width, "x");
    u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
    this.zoomTo(min, max);
  }

  visibleMarks() {
    return [...this.marks, ...this.flushes].sort((a, b) => a.t - b.t);
  }

  drawMarks(u) {
    const ctx = u.ctx;
    const px = uPlot.pxRatio;
    const { left, top, width, height } = u.bbox;
    const xmin = u.scales.x.min;
    const xmax = u.scales.x.max;
    if (xmin == null) return;
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, width, height);
    ctx.clip();
    for (const f of this.flushes) {
      if (f.t < xmin || f.t > xmax) continue;
      const x = u.valToPos(f.t, "x", true);
      ctx.strokeStyle = FLUSH_COLOUR;
      ctx.lineWidth = 1 * px;
      ctx.beginPath();
      ctx.moveTo(x, top + height - 10 * px);
      ctx.lineTo(x, top + height);
      ctx.stroke();
    }
    for (const m of this.marks) {
      if (m.t < xmin || m.t > xmax) continue;
      const x = u.valToPos(m.t, "x", true);
      if (m.kind === "tag") {
        const s = SOURCES[m.tag.source] || SOURCES.manual;
        ctx.strokeStyle = s.colour;
        ctx.lineWidth = 1 * px;
        ctx.setLineDash([]);
        ctx.beginPath();
        ctx.moveTo(x, top + 18 * px);
        ctx.lineTo(x, top + height);
        ctx.stroke();
        // Filled: application-consistent; hollow: crash-consistent.
        drawShape(ctx, s.shape, x, top + 10 * px, 6 * px, s.colour, m.tag.consistency === "app");
        if (m.tag.verified === "failed") {
          ctx.strokeStyle = GAP_COLOUR;
          ctx.lineWidth = 2 * px;
          ctx.beginPath();
          ctx.moveTo(x - 7 * px, top + 3 * px);
          ctx.lineTo(x + 7 * px, top + 17 * px);
          ctx.stroke();
        }
      } else if (m.kind === "gap") {
        ctx.fillStyle = "rgba(213,94,0,0.15)";
        const x0 = u.valToPos(xmin, "x", true);
        ctx.fillRect(x0, top, Math.max(2 * px, x - x0), height);
        drawShape(ctx, "square", x, top + 30 * px, 5 * px, GAP_COLOUR, true);
      } else {
        drawShape(ctx, "diamond", x, top + 30 * px, 5 * px, EVENT_COLOUR, true);
      }
    }
    if (this.chosen && this.chosen.t >= xmin && this.chosen.t <= xmax) {
      const x = u.valToPos(this.chosen.t, "x", true);
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 2 * px;
      ctx.setLineDash([5 * px, 3 * px]);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
    }
    ctx.restore();
  }

  // Where mark `name` is drawn: CSS pixels from the plot area's left.
  offsetOf(name) {
    const m = this.marks.find((mark) => mark.name === name);
    return m ? this.plot.valToPos(m.t, "x") : null;
  }

  // The mark under the cursor, within a few pixels: a tag before an
  // event before a flush point, which often lie a millisecond apart.
  markAt(left) {
    const rank = (m) => (m.kind === "tag" ? 0 : m.kind === "flush" ? 2 : 1);
    let best = null;
    for (const m of this.visibleMarks()) {
      const d = Math.abs(this.plot.valToPos(m.t, "x") - left);
      if (d >= 7) continue;
      if (best === null || rank(m) < rank(best.m) || (rank(m) === rank(best.m) && d < best.d)) {
        best = { m, d };
      }
    }
    return best ? best.m : null;
  }

  moved(u) {
    const left = u.cursor.left;
    if (left == null || left < 0) {
      this.showTooltip(null);
      return;
    }
    const mark = this.markAt(left);
    const t = u.posToVal(left, "x");
    this.showTooltip(mark, left, t);
  }

  showTooltip(mark, left, t) {
    const tip = this.tooltip;
    if (mark === null && t === undefined) {
      tip.hidden = true;
      return;
    }
    tip.hidden = false;
    tip.textContent = mark ? describe(mark) : new Date(t * 1000).toISOString().replace(".000Z", "Z") + " — click to choose";
    const x = Math.min(left + 12, this.plot.over.clientWidth - 240);
    tip.style.left = Math.max(0, x) + "px";
  }

  click(e) {
    if (this.downAt && Math.hypot(e.clientX - this.downAt[0], e.clientY - this.downAt[1]) > 3) return;
    const left = this.plot.cursor.left;
    const mark = this.markAt(left);
    if (mark) {
      this.onChoose(pointOf(mark), mark.t);
    } else {
      const t = this.plot.posToVal(left, "x");
      this.onChoose(new Date(t * 1000).toISOString(), t);
    }
  }

  choose(t) {
    this.chosen = t === null || Number.isNaN(t) ? null : { t };
    this.plot.redraw(false, false);
  }

  key(e) {
    if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
      const marks = this.visibleMarks();
      if (!marks.length) return;
      const at = this.chosen ? this.chosen.t : e.key === "ArrowLeft" ? Infinity : -Infinity;
      const next =
        e.key === "ArrowLeft"
          ? [...marks].reverse().find((m) => m.t < at - 1e-6)
          : marks.find((m) => m.t > at + 1e-6);
      if (next) this.onChoose(pointOf(next), next.t);
      e.preventDefault();
    } else if (e.key === "+" || e.key === "=") {
      this.zoom(0.5);
    } else if (e.key === "-") {
      this.zoom(2);
    } else if (e.key === "0") {
      this.reset();
    }
  }
}

// The POINT that names a mark.
export function pointOf(mark) {
  if (mark.kind === "tag") return "tag:" + mark.name;
  return String(mark.seq);
}

export function describe(mark) {
  const when = mark.time.replace(/\.\d+Z$/, "Z");
  if (mark.kind === "tag") {
    const t = mark.tag;
    return `tag ${mark.name} · seq ${mark.seq} · ${when} · ${t.source}, ${t.consistency}-consistent, verified: ${t.verified}${t.note ? " · " + t.note : ""}`;
  }
  if (mark.kind === "flush") return `flush point · seq ${mark.seq} · ${when}`;
  if (mark.kind === "gap") return `gap · ${mark.name} · ${when}`;
  return `event ${mark.name} · seq ${mark.seq} · ${when}${mark.detail ? " · " + mark.detail : ""}`;
}
