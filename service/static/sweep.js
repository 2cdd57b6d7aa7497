// The sweeps page: the sweeps, newest first, and for the chosen one
// (?sweep=ID) its leaderboard and every trial's validation curves overlaid.
// A trial's curve joins the histories of its rung jobs in rung order: a
// promoted trial's next rung resumes where the last one stopped, so the
// steps follow on.

import { getJSON, runPage, Unauthorized } from "./api.js";
import { legend, lineChart } from "./charts.js";
import { JobHistory } from "./history.js";

const POLL_MS = 1000;
const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.search);
let chosen = params.get("sweep"), drawn = "", ready = false;
const histories = new Map();  // job id -> JobHistory, for the chosen sweep's jobs

/** A colour per trial, far apart for neighbouring trials (golden-angle hues). */
function colorOf(trial) { return `hsl(${(trial * 137.508) % 360}, 65%, 42%)`; }

function text(value) {
  if (value == null) return "–";
  return typeof value === "number" ? String(Number(value.toPrecision(4))) : JSON.stringify(value);
}

function row(cells, attrs = {}) {
  const tr = Object.assign(document.createElement("tr"), attrs);
  for (const c of cells) tr.append(Object.assign(document.createElement("td"), { textContent: c }));
  return tr;
}

function renderList(sweeps) {
  const body = $("sweeps");
  if (!sweeps.length) return body.replaceChildren(row(["no sweeps yet"], { className: "muted" }));
  body.replaceChildren(...sweeps.map(s => {
    const tr = row([`${s.name} (${s.id})`, s.state, String(s.trials)], { className: "job" + (s.id === chosen ? " selected" : "") });
    tr.dataset.id = s.id;
    tr.addEventListener("click", () => choose(s.id));
    return tr;
  }));
}

function choose(id) {
  chosen = id;
  histories.clear();
  history.replaceState(null, "", "?sweep=" + encodeURIComponent(id));
  drawn = "";
  refresh();
}

function renderLeaderboard(sweep) {
  $("sweep").hidden = false;
  $("sweep-title").textContent = `${sweep.name} (${sweep.id}) — ${sweep.method}, ${sweep.state}` +
    (sweep.error ? ` — ${sweep.error}` : "");
  const counts = Object.entries(sweep.trial_states).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ");
  $("sweep-summary").textContent = `trials: ${counts || "none yet"}` +
    (sweep.best ? `; best: trial ${sweep.best.trial}, ${sweep.objective.metric} ${text(sweep.best.objective)}` : "");
  $("objective-name").textContent = `${sweep.objective.metric} (${sweep.objective.mode})`;
  $("leaderboard").replaceChildren(...sweep.leaderboard.map((t, i) => {
    const values = Object.entries(t.values).map(([k, v]) => `${k}=${text(v)}`).join(", ");
    const tr = row([String(i + 1), String(t.trial), t.state, String(t.steps_run), text(t.objective), values],
                   { className: "trial" });
    tr.dataset.trial = String(t.trial);
    tr.style.boxShadow = `inset 4px 0 0 ${colorOf(t.trial)}`;
    return tr;
  }));
}

/** One series per trial of `key`, its rung jobs' records joined in rung order. */
function series(sweep, key) {
  return [...sweep.leaderboard].sort((a, b) => a.trial - b.trial).map(t => {
    const points = [];
    for (const id of t.jobs) {
      const h = histories.get(id);
      for (const r of (h ? h.rows : [])) if (r[key] != null) points.push([r.step, r[key]]);
    }
    return { id: `trial-${t.trial}:${key}`, label: `trial ${t.trial}`, color: colorOf(t.trial), dashed: false, points };
  });
}

function renderCurves(sweep) {
  for (const [id, key, yLabel, scale] of [["accuracy", "val_accuracy", "accuracy", "linear"],
                                          ["val-loss", "val_loss", "loss", "log"]]) {
    const lines = series(sweep, key);
    lineChart($(id), { series: lines, xLabel: "step", yLabel, scale });
    legend($(id + "-legend"), lines);
  }
}

async function refresh() {
  try {
    const listed = (await getJSON("/v1/sweeps")).sweeps;
    if (!chosen && listed.length) chosen = listed[0].id;
    renderList(listed);
    if (chosen) {
      const sweep = await getJSON(`/v1/sweeps/${encodeURIComponent(chosen)}`);
      const jobs = sweep.leaderboard.flatMap(t => t.jobs);
      for (const id of jobs) if (!histories.has(id)) histories.set(id, new JobHistory(id));
      await Promise.all(jobs.map(id => histories.get(id).poll()));
      renderLeaderboard(sweep);
      const key = [window.innerWidth, sweep.state, ...jobs.map(id => `${id}:${histories.get(id).version}`)].join("|");
      if (key !== drawn) { renderCurves(sweep); drawn = key; }
    }
    $("error").textContent = "";
    if (!ready) { ready = true; document.body.dataset.ready = "1"; }
  } catch (err) {
    $("error").textContent = err instanceof Unauthorized ? err.message : String(err.message || err);
  }
}

runPage(refresh, () => { drawn = ""; }, POLL_MS);
