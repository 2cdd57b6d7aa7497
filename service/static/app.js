// The dashboard: the jobs table (filtered by the service: ?state=&name=),
// the selected jobs' curves overlaid, and for the focused job its event
// timeline, per-worker step time and spec, with the difference between two
// selected jobs' specs. What the page shows is kept in its URL
// (?jobs=a,b&focus=b&state=&name=&scale=), so a view can be shared.

import { getJSON, runPage, Unauthorized } from "./api.js";
import { barChart, legend, lineChart } from "./charts.js";
import { eventClass, eventStep, JobHistory, MARKED, phaseBreakdown, replaySpan, service, straggler,
         workerBreakdown } from "./history.js";
import { specDiff } from "./specdiff.js";

const POLL_MS = 1000, LIST_LIMIT = 1000, SHOWN_EVENTS = 200;
const ROWS_STEP = 100;  // table rows drawn at first, and added at a time: 500 rows cost a slow layout
const PALETTE = ["#2563eb", "#ea580c", "#059669", "#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4b5563"];
const EVENT_COLORS = { failure: "#dc2626", recovery: "#16a34a", resize: "#7c3aed", resume: "#0891b2",
                       replay: "#f59e0b", end: "#6b7280", state: "#6b7280", info: "#9ca3af" };
const $ = id => document.getElementById(id);

const params = new URLSearchParams(location.search);
const ui = {
  selected: (params.get("jobs") || params.get("job") || "").split(",").filter(Boolean),
  focus: params.get("focus") || null,
  state: params.get("state") || "",
  name: params.get("name") || "",
  scale: params.get("scale") === "linear" ? "linear" : "log",
  diff: [null, null],
  rows: ROWS_STEP,  // how many of the listed jobs the table draws
  chose: params.has("jobs") || params.has("job"),  // false: the newest job is selected at first
};
const histories = new Map();  // id -> JobHistory, for the selected jobs
const colors = new Map();     // id -> colour, kept while selected
let jobs = [], drawn = "", ready = false;

// ---------------------------------------------------------------- selection

function historyOf(id) {
  if (!histories.has(id)) histories.set(id, new JobHistory(id));
  return histories.get(id);
}

function colorOf(id) {
  if (!colors.has(id)) {
    const used = new Set(colors.values());
    colors.set(id, PALETTE.find(c => !used.has(c)) || PALETTE[colors.size % PALETTE.length]);
  }
  return colors.get(id);
}

function nameOf(id) {
  const h = histories.get(id), listed = jobs.find(j => j.id === id);
  return (h && h.job && h.job.name) || (listed && listed.name) || id;
}

function toggle(id) {
  if (ui.selected.includes(id)) {
    ui.selected = ui.selected.filter(x => x !== id);
    histories.delete(id); colors.delete(id);
    if (ui.focus === id) ui.focus = ui.selected[ui.selected.length - 1] || null;
  } else {
    ui.selected.push(id);
    ui.focus = id;
  }
  ui.chose = true;
  changed();
}

function changed() {
  const q = new URLSearchParams();
  if (ui.selected.length) q.set("jobs", ui.selected.join(","));
  if (ui.focus) q.set("focus", ui.focus);
  if (ui.state) q.set("state", ui.state);
  if (ui.name) q.set("name", ui.name);
  if (ui.scale !== "log") q.set("scale", ui.scale);
  history.replaceState(null, "", q.toString() ? "?" + q : location.pathname);
  drawn = "";
  refresh();
}

// ---------------------------------------------------------------- the jobs table

function metricText(v, percent = false) {
  if (v == null) return "–";
  if (percent) return (100 * v).toFixed(1) + "%";
  // at most 7 characters, so a diverged run's loss fits its column
  const a = Math.abs(v);
  return (a < 1e-3 && v !== 0) || a >= 1e4 ? v.toExponential(1).replace("e+", "e") : v.toPrecision(4);
}

function cell(tr, cls) {
  let td = tr.querySelector("td." + cls);
  if (!td) { td = document.createElement("td"); td.className = cls; tr.append(td); }
  return td;
}

function renderTable() {
  const body = $("jobs");
  $("count").textContent = `${jobs.length}${jobs.length >= LIST_LIMIT ? "+" : ""} job${jobs.length === 1 ? "" : "s"}` +
    (ui.state || ui.name ? " matching" : "");
  if (!jobs.length) {
    body.replaceChildren(Object.assign(document.createElement("tr"), {
      innerHTML: `<td colspan="7" class="muted">${ui.state || ui.name ? "no job matches" : "no jobs yet"}</td>` }));
    return;
  }
  const old = new Map([...body.querySelectorAll("tr.job")].map(tr => [tr.dataset.id, tr]));
  const rows = jobs.slice(0, ui.rows).map(job => {
    let tr = old.get(job.id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.id = job.id;
      const pick = document.createElement("input");
      pick.type = "checkbox"; pick.className = "pick"; pick.setAttribute("aria-label", `select ${job.name}`);
      cell(tr, "select").append(pick);
      cell(tr, "name").append(document.createElement("b"), document.createElement("small"));
      cell(tr, "state").append(document.createElement("span"));
      cell(tr, "progress").append(Object.assign(document.createElement("span"), { className: "bar" }));
      for (const c of ["loss", "val_loss", "val_accuracy"]) cell(tr, c);
      tr.addEventListener("click", () => toggle(job.id));
    }
    const on = ui.selected.includes(job.id);
    tr.className = "job" + (on ? " selected" : "") + (job.id === ui.focus ? " focus" : "");
    tr.dataset.state = job.state;
    tr.style.setProperty("--job", on ? colorOf(job.id) : "transparent");
    tr.querySelector(".pick").checked = on;
    tr.querySelector(".name b").textContent = job.name;
    tr.querySelector(".name small").textContent = job.id;
    const state = tr.querySelector(".state span");
    state.textContent = job.state; state.className = "badge " + job.state;
    const bar = tr.querySelector(".bar");
    bar.style.setProperty("--done", String(Math.min(1, (job.step || 0) / (job.steps || 1))));
    bar.title = `step ${job.step} of ${job.steps}`;
    const last = job.last_metrics || {};
    for (const c of ["loss", "val_loss", "val_accuracy"]) {
      const td = tr.querySelector("td." + c), v = last[c];
      td.textContent = metricText(v, c === "val_accuracy");
      if (v == null) delete td.dataset.value; else td.dataset.value = String(v);
    }
    return tr;
  });
  const hidden = jobs.length - ui.rows;
  if (hidden > 0) {
    more.querySelector("button").textContent = `show ${Math.min(hidden, ROWS_STEP)} more (${hidden} not shown)`;
    rows.push(more);
  }
  // rows are moved only when the order changed: a poll does not disturb a click or a hover
  const now = [...body.children];
  if (now.length !== rows.length || rows.some((tr, i) => tr !== now[i])) body.replaceChildren(...rows);
}

// The rest of a long list comes a page at a time, when its end is scrolled to (or clicked).
function showMore() { ui.rows += ROWS_STEP; renderTable(); }
const more = document.createElement("tr");
more.className = "more";
more.innerHTML = '<td colspan="7"><button id="more-jobs" type="button"></button></td>';
more.querySelector("button").addEventListener("click", showMore);
new IntersectionObserver(entries => { if (entries.some(e => e.isIntersecting)) showMore(); }).observe(more);

// ---------------------------------------------------------------- the curves

/** One series per selected job and (key, label, dashed) triple, grouped by job. */
function series(...kinds) {
  return ui.selected.filter(id => histories.get(id)).flatMap(id => kinds.map(([key, label, dashed]) => {
    const points = [];
    for (const r of histories.get(id).rows) if (r[key] != null) points.push([r.step, r[key]]);
    return { id: `${id}:${key}`, label: `${nameOf(id)}${label ? " " + label : ""}`, color: colorOf(id), dashed, points };
  }));
}

function marks() {
  const markers = [], spans = [];
  for (const id of ui.selected) {
    const h = histories.get(id);
    if (!h) continue;
    for (const e of h.events) {
      const kind = eventClass(e);
      if (!MARKED.has(kind)) continue;
      const step = eventStep(e, h.rows), span = replaySpan(e);
      const title = `${nameOf(id)}: ${describe(e)}`;
      if (step != null) markers.push({ x: step, kind, color: EVENT_COLORS[kind], title });
      if (span) spans.push({ x0: span[0], x1: span[1], kind: "replay", color: EVENT_COLORS.replay, title: `${title} (replayed)` });
    }
  }
  return { markers, spans };
}

function describe(e) {
  const d = e.detail || {};
  if (e.kind === "state") return `${d.from || "?"} → ${d.state}${d.reason ? ` (${d.reason})` : ""}`;
  const parts = Object.entries(d).filter(([k]) => k !== "step").map(([k, v]) => `${k} ${typeof v === "object" ? JSON.stringify(v) : v}`);
  return `${e.kind}${parts.length ? ": " + parts.join(", ") : ""}`;
}

function renderCurves() {
  const chips = $("chips");
  chips.replaceChildren(...ui.selected.map(id => {
    const chip = document.createElement("span");
    chip.className = "chip" + (id === ui.focus ? " focus" : "");
    chip.dataset.id = id;
    chip.style.setProperty("--job", colorOf(id));
    const name = document.createElement("button");
    name.className = "chip-name"; name.textContent = nameOf(id); name.title = `show ${id} below`;
    name.onclick = () => { ui.focus = id; changed(); };
    const drop = document.createElement("button");
    drop.className = "chip-drop"; drop.textContent = "×"; drop.setAttribute("aria-label", `deselect ${nameOf(id)}`);
    drop.onclick = () => toggle(id);
    chip.append(name, drop);
    return chip;
  }));
  $("pick-hint").hidden = ui.selected.length > 0;
  const { markers, spans } = marks();
  const charts = [
    ["loss", series(["loss", "train", false], ["val_loss", "validation", true]), "loss", ui.scale],
    ["accuracy", series(["val_accuracy", "", false]), "accuracy", "linear"],
    ["rate", series(["samples_per_s", "", false]), "samples/s", "linear"],
  ];
  for (const [id, lines, yLabel, scale] of charts) {
    lineChart($(id), { series: lines, markers, spans, xLabel: "step", yLabel, scale });
    legend($(id + "-legend"), lines);
  }
}

// ---------------------------------------------------------------- the focused job

function renderFocus() {
  const h = ui.focus && histories.get(ui.focus);
  $("focus").hidden = !h || !h.job;
  if (!h || !h.job) return;
  const job = h.job;
  $("focus-title").textContent = `${job.name} (${job.id}) — ${job.state}, step ${job.step} of ${job.steps}` +
    (job.error ? ` — ${job.error}` : "");
  $("focus-title").style.setProperty("--job", colorOf(job.id));
  renderEvents(h);
  renderWorkers(h);
  $("spec").textContent = JSON.stringify(job.spec, null, 2);
  const prov = job.provenance;
  $("provenance").textContent = prov ? Object.entries(prov).map(([k, v]) => `${k}: ${v}`).join("\n") : "";
  $("provenance").hidden = !prov;
  renderDiff();
}

function renderEvents(h) {
  const body = $("events");
  $("events-source").textContent = service.hasEvents ? "" : "(this service keeps no event log: state changes only)";
  const shown = h.events.slice(-SHOWN_EVENTS);
  if (!shown.length) {
    body.replaceChildren(Object.assign(document.createElement("tr"), { innerHTML: '<td colspan="4" class="muted">no events yet</td>' }));
    return;
  }
  body.replaceChildren(...shown.map(e => {
    const tr = document.createElement("tr"), kind = eventClass(e);
    tr.className = "event " + kind;
    tr.dataset.kind = e.kind;
    const step = eventStep(e, h.rows);
    const cells = [e.time ? new Date(e.time * 1000).toLocaleTimeString() : "", step ?? "–", e.kind, describe(e)];
    for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: String(c) }));
    tr.children[2].style.color = EVENT_COLORS[kind];
    return tr;
  }));
}

function renderWorkers(h) {
  const svg = $("workers"), note = $("workers-note");
  const b = workerBreakdown(h.rows);
  if (b) {
    const slow = straggler(b.workers);
    barChart(svg, b.workers.map(w => ({
      label: `worker ${w.index}`, flag: slow && slow.index === w.index ? "straggler" : null,
      parts: [{ name: "compute", value: w.compute, color: "#2563eb" }, { name: "wait", value: w.wait, color: "#f59e0b" }],
    })), "seconds per step (mean)");
    note.textContent = `mean over steps ${b.from}–${b.to} (${b.steps} steps)` +
      (slow ? `; worker ${slow.index} computes ${slow.ratio.toFixed(1)}× the median` : "");
    svg.dataset.mode = "workers";
    return;
  }
  const p = phaseBreakdown(h.rows);
  svg.dataset.mode = p ? "phases" : "none";
  if (!p) { svg.replaceChildren(); note.textContent = "no step timings yet"; return; }
  const PHASE_COLORS = { compute: "#2563eb", transfer: "#0891b2", reduce_apply: "#7c3aed", wait: "#f59e0b" };
  barChart(svg, [{ label: "whole step", parts: Object.entries(p.phases).map(([name, value]) => ({
    name, value, color: PHASE_COLORS[name] || "#9ca3af" })) }], "seconds per step (mean)");
  note.textContent = `this job's history has no per-worker timings; whole step by phase, mean over steps ${p.from}–${p.to}`;
}

function renderDiff() {
  const [sa, sb] = [$("diff-a"), $("diff-b")];
  for (const [i, sel] of [[0, sa], [1, sb]]) {
    if (!ui.selected.includes(ui.diff[i])) ui.diff[i] = ui.selected[i] ?? null;
    sel.replaceChildren(...ui.selected.map(id => Object.assign(document.createElement("option"),
      { value: id, textContent: `${nameOf(id)} (${id})`, selected: id === ui.diff[i] })));
  }
  const body = $("diff"), ha = histories.get(ui.diff[0]), hb = histories.get(ui.diff[1]);
  const message = text => {
    const td = Object.assign(document.createElement("td"), { colSpan: 3, className: "muted", textContent: text });
    body.replaceChildren(document.createElement("tr"));
    body.firstChild.append(td);
  };
  if (ui.selected.length < 2) return message("select two jobs to compare their specs");
  if (!ha || !hb || !ha.job || !hb.job) return message("loading…");
  if (ha === hb) return message("the same job");
  const rows = specDiff(ha.job.spec, hb.job.spec);
  if (!rows.length) return message("the specs are the same");
  const show = v => (v === undefined ? "(absent)" : JSON.stringify(v));
  body.replaceChildren(...rows.map(d => {
    const tr = document.createElement("tr");
    tr.dataset.path = d.path;
    for (const c of [d.path, show(d.a), show(d.b)]) tr.append(Object.assign(document.createElement("td"), { textContent: c }));
    return tr;
  }));
}

// ---------------------------------------------------------------- polling

async function refresh() {
  try {
    const q = new URLSearchParams({ limit: String(LIST_LIMIT) });
    if (ui.state) q.set("state", ui.state);
    if (ui.name) q.set("name", ui.name);
    // the list and the selected jobs' news at once; at first, without a
    // choice in the URL, the newest job once the list has come
    const [listed] = await Promise.all([getJSON("/v1/jobs?" + q), ...ui.selected.map(id => historyOf(id).poll())]);
    jobs = listed.jobs;
    if (!ui.chose && !ui.selected.length && jobs.length) {
      ui.selected = [jobs[0].id];
      await historyOf(jobs[0].id).poll();
    }
    if (jobs.length) ui.chose = true;
    if (!ui.focus || !ui.selected.includes(ui.focus)) ui.focus = ui.selected[ui.selected.length - 1] || null;
    ui.selected.forEach(colorOf);  // in the order chosen
    renderTable();
    const key = [ui.scale, ui.focus, ui.diff, window.innerWidth,
                 ...ui.selected.map(id => `${id}:${histories.get(id).version}`)].join("|");
    if (key !== drawn) { renderCurves(); renderFocus(); drawn = key; }
    $("error").textContent = "";
    if (!ready) { ready = true; performance.mark("dashboard-ready"); document.body.dataset.ready = "1"; }
  } catch (err) {
    $("error").textContent = err instanceof Unauthorized ? err.message : String(err.message || err);
  }
}

// ---------------------------------------------------------------- controls

$("filters").addEventListener("submit", event => event.preventDefault());
$("filter-state").value = ui.state;
$("filter-state").addEventListener("change", e => { ui.state = e.target.value; ui.rows = ROWS_STEP; changed(); });
$("filter-name").value = ui.name;
let typing = null;
$("filter-name").addEventListener("input", e => {
  clearTimeout(typing);
  typing = setTimeout(() => { ui.name = e.target.value.trim(); ui.rows = ROWS_STEP; changed(); }, 250);
});
for (const input of document.querySelectorAll("input[name=scale]")) {
  input.checked = input.value === ui.scale;
  input.addEventListener("change", e => { ui.scale = e.target.value; changed(); });
}
$("diff-a").addEventListener("change", e => { ui.diff[0] = e.target.value; drawn = ""; refresh(); });
$("diff-b").addEventListener("change", e => { ui.diff[1] = e.target.value; drawn = ""; refresh(); });
runPage(refresh, () => { drawn = ""; }, POLL_MS);
