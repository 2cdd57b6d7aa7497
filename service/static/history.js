// What the page holds of one job: the job itself, its per-step records and
// its events, each read incrementally (only what came after the last one
// held: `?since=`), and what is computed from them (where an event falls on
// the step axis, the per-worker step time).

import { getJSON, HttpError } from "./api.js";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const METRICS_PAGE = 5000, EVENTS_PAGE = 1000;
const MAX_PAGES_PER_POLL = 10;
// false once the service has shown it has no events endpoint (an older
// service): every job's timeline is then made from its state transitions
export const service = { hasEvents: true };

export class JobHistory {
  constructor(id) {
    this.id = id;
    this.job = null;          // GET /v1/jobs/{id}: spec, state, transitions, provenance
    this.rows = [];           // step records, in step order
    this.since = 0;           // the last step held
    this.events = [];         // from the events endpoint, or made from the transitions
    this.eventsSince = 0;
    this.complete = false;    // a finished job read to its end: nothing more to ask for
    this.version = 0;         // bumped whenever anything held changes
    this.busy = false;
  }

  get path() { return `/v1/jobs/${encodeURIComponent(this.id)}`; }

  /** Read what is new; true if anything changed. One poll at a time. */
  async poll() {
    if (this.busy || this.complete) return false;
    this.busy = true;
    try {
      const job = await getJSON(this.path);  // first: a job finished now has all its records stored
      const before = this.job;
      const more = await this.readMetrics();
      const newEvents = await this.readEvents(job);
      this.job = job;
      const changed = more.added || newEvents || !before || before.state !== job.state || before.workers !== job.workers;
      this.complete = TERMINAL.has(job.state) && !more.more && !newEvents.more;
      if (changed) this.version++;
      return changed;
    } finally {
      this.busy = false;
    }
  }

  async readMetrics() {
    const read = await readPages(`${this.path}/metrics`, this.since, METRICS_PAGE, "metrics", this.rows);
    this.since = read.since;
    return read;
  }

  /** New events; `false` when none, else {more}. Without the endpoint: the transitions. */
  async readEvents(job) {
    if (service.hasEvents) {
      try {
        const read = await readPages(`${this.path}/events`, this.eventsSince, EVENTS_PAGE, "events", this.events);
        this.eventsSince = read.since;
        return read.added ? { more: read.more } : false;
      } catch (err) {
        // the job was just read, so a 404 here is a service without the endpoint
        if (!(err instanceof HttpError && (err.status === 404 || err.status === 405))) throw err;
        service.hasEvents = false;
      }
    }
    const made = fromTransitions(job.transitions || []);
    if (made.length === this.events.length) return false;
    this.events = made;
    return { more: false };
  }
}

/** Pages of `key` records after cursor `since`, appended to `into`, at most
 *  MAX_PAGES_PER_POLL of them: {added, more, since} (the cursor to read from next). */
async function readPages(url, since, limit, key, into) {
  let added = 0, more = false;
  for (let i = 0; i < MAX_PAGES_PER_POLL; i++) {
    const page = await getJSON(`${url}?since=${since}&limit=${limit}`);
    into.push(...page[key]);
    added += page[key].length;
    since = page.next_since;
    more = page.more;
    if (!more) break;
  }
  return { added, more, since };
}

/** A job's state transitions as events (the first, its submission, left out). */
export function fromTransitions(transitions) {
  return transitions.slice(1).map((t, i) => ({
    seq: i + 1, kind: "state", step: null, time: Date.parse(t.at) / 1000,
    detail: { state: t.to, from: t.from, reason: t.reason },
  }));
}

/** What an event is, for its mark: failure, recovery, resize, resume, replay, end, state or info. */
export function eventClass(e) {
  const kind = String(e.kind || "").toLowerCase();
  if (kind === "state") {
    const state = e.detail && e.detail.state;
    return state === "failed" ? "failure" : TERMINAL.has(state) ? "end" : "state";
  }
  if (/hung|fail|damaged|lost|died|dead|killed|nonfinite/.test(kind)) return "failure";
  if (/recover/.test(kind)) return "recovery";
  if (/resiz/.test(kind)) return "resize";
  if (/resum/.test(kind)) return "resume";
  if (/replay/.test(kind)) return "replay";
  return "info";
}
export const MARKED = new Set(["failure", "recovery", "resize", "resume", "replay", "end", "state"]);

function rowTime(r) {
  if (r.finished_at != null) return r.finished_at;
  return r.at ? Date.parse(r.at) / 1000 : null;
}

/** The step an event belongs to: its own, or (for one without) the last
 * step recorded at or before its time; null when it came before the first. */
export function eventStep(e, rows) {
  const own = e.step ?? (e.detail && e.detail.step);
  if (own != null) return own;
  if (e.placed !== undefined) return e.placed;
  let step = null;
  for (const r of rows) {
    const t = rowTime(r);
    if (t != null && t <= e.time && (step === null || r.step > step)) step = r.step;
  }
  const last = rows.length ? rowTime(rows[rows.length - 1]) : null;
  if (last != null && last > e.time) e.placed = step;  // later steps exist: this is final
  return step;
}

/** The steps a recovery replayed, as [from, to], or null. */
export function replaySpan(e) {
  const d = e.detail || {};
  const n = d.steps_replayed, from = e.step ?? d.step;
  return n > 0 && from != null ? [from, from + n] : null;
}

/**
 * Mean compute and wait seconds per worker index over the last `window`
 * records that have them: {from, to, steps, workers: [{index, compute, wait}]}
 * or null for a history without per-worker timings.
 */
export function workerBreakdown(rows, window = 100) {
  const recent = [];
  for (let i = rows.length - 1; i >= 0 && recent.length < window; i--) {
    if (rows[i].worker_compute_s || rows[i].worker_wait_s) recent.push(rows[i]);
  }
  if (!recent.length) return null;
  recent.reverse();
  const acc = new Map();
  const add = (index, key, v) => {
    if (v == null) return;
    const a = acc.get(index) || { compute: 0, nc: 0, wait: 0, nw: 0 };
    a[key] += v; a[key === "compute" ? "nc" : "nw"] += 1;
    acc.set(index, a);
  };
  for (const r of recent) {
    for (const [k, v] of Object.entries(r.worker_compute_s || {})) add(Number(k), "compute", v);
    for (const [k, v] of Object.entries(r.worker_wait_s || {})) add(Number(k), "wait", v);
  }
  const workers = [...acc.entries()].sort((a, b) => a[0] - b[0]).map(([index, a]) => ({
    index, compute: a.nc ? a.compute / a.nc : 0, wait: a.nw ? a.wait / a.nw : 0 }));
  return { from: recent[0].step, to: recent[recent.length - 1].step, steps: recent.length, workers };
}

/** The worker whose mean compute is over `factor` × the median of the workers', or null. */
export function straggler(workers, factor = 1.5) {
  if (workers.length < 2) return null;
  const sorted = workers.map(w => w.compute).sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  const slowest = workers.reduce((a, b) => (b.compute > a.compute ? b : a));
  return median > 0 && slowest.compute > factor * median ? { index: slowest.index, ratio: slowest.compute / median } : null;
}

/** Mean seconds per phase over the last `window` records (for a history without per-worker timings). */
export function phaseBreakdown(rows, window = 100) {
  const recent = rows.filter(r => r.phases).slice(-window);
  if (!recent.length) return null;
  const sums = {};
  for (const r of recent) for (const [k, v] of Object.entries(r.phases)) if (v != null) sums[k] = (sums[k] || 0) + v;
  return { from: recent[0].step, to: recent[recent.length - 1].step, steps: recent.length,
           phases: Object.fromEntries(Object.entries(sums).map(([k, v]) => [k, v / recent.length])) };
}
