"""Sweep decisions worked out by hand: which jobs start, which trials are
promoted (ties by trial index), when a sweep is over, and how trials rank —
and that none of it depends on the order in which jobs ended."""

from __future__ import annotations

import random

import pytest

from core.sweep import Launch, RungResult, best_trial, decide, leaderboard, parse_sweep, sweep_state

BASE = {"data": {"source": "digits", "shards": 2}, "model": {"hidden": [8]},
        "training": {"steps": 90, "batch_size": 32}, "resources": {"workers": 1}}


def halving(metric="val_loss", mode="min", trials=9, concurrent=4):
    return parse_sweep({
        "seed": 1, "method": "halving", "max_trials": trials, "max_concurrent_trials": concurrent, "base": BASE,
        "space": {"training.optimizer.lr": {"log_uniform": [1.0e-3, 1.0]}},
        "objective": {"metric": metric, "mode": mode}, "halving": {"reduction_factor": 3, "rungs": [10, 30, 90]}})


def done(trial, rung, objective, state="succeeded"):
    return RungResult(trial, rung, state, objective, steps={0: 10, 1: 20, 2: 60}[rung])


# The worked example: rung 0 of 9 trials (val_loss, lower is better).
#   ranked: 4 (0.3), 1 (0.5), 3 (0.5: ties with 1, loses on index), 8, 2, 7, 0; 5 has NaN, 6 failed
#   rung 1 takes max(1, 9 // 3) = 3: trials 4, 1, 3
#   rung 1: 1 and 3 tie at 0.2, ahead of 4 (0.25); rung 2 takes max(1, 3 // 3) = 1: trial 1
RUNG0 = [done(0, 0, 0.9), done(1, 0, 0.5), done(2, 0, 0.7), done(3, 0, 0.5), done(4, 0, 0.3),
         done(5, 0, float("nan")), done(6, 0, None, "failed"), done(7, 0, 0.8), done(8, 0, 0.6)]
RUNG1 = [done(4, 1, 0.25), done(1, 1, 0.2), done(3, 1, 0.2)]
RUNG2 = [done(1, 2, 0.1)]


def test_new_trials_start_in_index_order_within_max_concurrent_trials():
    s = halving()
    assert decide(s, []).launch == tuple(Launch(t, 0) for t in range(4))
    running = [RungResult(t, 0, "running") for t in range(3)] + [RungResult(3, 0, "queued")]
    assert decide(s, running).launch == ()
    two_ended = [done(0, 0, 0.9), done(1, 0, 0.5)] + running[2:]
    assert decide(s, two_ended).launch == (Launch(4, 0), Launch(5, 0))
    assert not decide(s, two_ended).finished


def test_a_rung_is_decided_only_when_all_its_jobs_have_ended():
    s = halving()
    waiting = RUNG0[:-1] + [RungResult(8, 0, "running")]
    assert decide(s, waiting).launch == () and decide(s, waiting).promoted == ()
    d = decide(s, RUNG0)
    assert d.promoted == ((4, 1), (1, 1), (3, 1))
    assert d.launch == (Launch(4, 1), Launch(1, 1), Launch(3, 1))
    assert all(launch.continues for launch in d.launch)
    assert not d.finished


def test_the_worked_example_promotes_exactly_and_ends_with_trial_1_best():
    s = halving()
    d = decide(s, RUNG0 + RUNG1)
    assert d.promoted == ((4, 1), (1, 1), (3, 1), (1, 2)) and d.launch == (Launch(1, 2),)
    final = decide(s, RUNG0 + RUNG1 + RUNG2)
    assert final.launch == () and final.finished and final.promoted == d.promoted
    rows = leaderboard(s, RUNG0 + RUNG1 + RUNG2)
    # rung reached first, then objective, then index; no objective (NaN, failed) last
    assert [(r.trial, r.rung, r.objective) for r in rows[:7]] == [
        (1, 2, 0.1), (3, 1, 0.2), (4, 1, 0.25), (8, 0, 0.6), (2, 0, 0.7), (7, 0, 0.8), (0, 0, 0.9)]
    assert [(r.trial, r.rung, r.objective, r.state) for r in rows[7:]] == [(5, None, None, "succeeded"),
                                                                          (6, None, None, "failed")]
    assert [r.rank for r in rows] == list(range(1, 10))
    assert rows[0].steps == 10 + 20 + 60 and rows[1].steps == 30 and rows[3].steps == 10
    assert rows[0].values == s.values(1)
    assert best_trial(s, RUNG0 + RUNG1 + RUNG2) == rows[0]
    assert sweep_state(s, RUNG0 + RUNG1 + RUNG2) == "succeeded"


def test_maximizing_promotes_the_largest_and_breaks_ties_by_index():
    s = halving(metric="val_accuracy", mode="max")
    # 0.9 highest; 0.8 and 0.8 tie (trials 2 and 7): 2 goes on, 7 does not
    rung0 = [done(t, 0, acc) for t, acc in enumerate([0.5, 0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.8, 0.7])]
    assert decide(s, rung0).promoted == ((1, 1), (2, 1), (7, 1))
    rung0[7] = done(7, 0, 0.8, "cancelled")  # a cancelled job is never promoted, however good
    assert decide(s, rung0).promoted == ((1, 1), (2, 1), (8, 1))


def test_fewer_good_trials_than_places_promotes_only_those_and_none_ends_the_sweep_failed():
    s = halving()
    rung0 = [done(t, 0, None, "failed") for t in range(9)]
    rung0[6] = done(6, 0, 0.4)
    rung0[2] = done(2, 0, 0.5)
    assert decide(s, rung0).promoted == ((6, 1), (2, 1))
    all_failed = [done(t, 0, None, "failed") for t in range(9)]
    d = decide(s, all_failed)
    assert d.finished and d.launch == () and d.promoted == ()
    assert best_trial(s, all_failed) is None and sweep_state(s, all_failed) == "failed"


def test_a_grid_sweep_has_one_rung_and_ends_when_every_point_has_run():
    s = parse_sweep({"method": "grid", "base": BASE, "max_concurrent_trials": 2,
                     "space": {"model.hidden": {"grid": [[4], [8], [16]]}}, "objective": {"metric": "loss"}})
    assert s.rungs == (90,) and s.trial_spec(0, 0).training.stop_at is None
    assert sweep_state(s, []) == "queued" and sweep_state(s, [RungResult(0, 0, "queued")]) == "queued"
    assert sweep_state(s, [RungResult(0, 0, "running")]) == "running"
    results = [done(0, 0, 0.3), RungResult(1, 0, "running")]
    assert decide(s, results).launch == (Launch(2, 0),)
    results = [done(0, 0, 0.3), done(1, 0, 0.2), done(2, 0, 0.2)]
    d = decide(s, results)
    assert d.finished and d.promoted == () and best_trial(s, results).trial == 1


def test_results_in_any_order_give_the_same_decision():
    s = halving()
    shuffled = RUNG0 + RUNG1
    random.Random(0).shuffle(shuffled)
    assert decide(s, shuffled) == decide(s, RUNG0 + RUNG1)
    assert leaderboard(s, shuffled) == leaderboard(s, RUNG0 + RUNG1)


def objective_of(trial, rung):
    """A made-up, deterministic objective with ties: what training would record."""
    return round(((trial * 7) % 5) / 10 + 0.3 / (rung + 1), 6)


def run_to_the_end(s, pick):
    """Drive the sweep as a service would: start what decide says, end one
    running job at a time (chosen by `pick`), record its objective."""
    results, started = {}, []
    while True:
        d = decide(s, results.values())
        for launch in d.launch:
            results[(launch.trial, launch.rung)] = RungResult(launch.trial, launch.rung, "running")
            started.append((launch.trial, launch.rung))
        if d.finished:
            return d, leaderboard(s, results.values()), started
        running = sorted(key for key, r in results.items() if r.state == "running")
        key = pick(running)
        results[key] = RungResult(*key, "succeeded", objective_of(*key), steps=10)


def test_promotions_and_leaderboard_do_not_depend_on_which_job_ends_first():
    s = halving(trials=16, concurrent=3)
    runs = [run_to_the_end(s, pick) for pick in (lambda r: r[0], lambda r: r[-1],
                                                 random.Random(1).choice, random.Random(2).choice)]
    decisions, boards, starts = zip(*runs)
    assert all(d == decisions[0] for d in decisions)
    assert all(b == boards[0] for b in boards)
    assert all(sorted(s_) == sorted(starts[0]) for s_ in starts)
    # 16, then 5, then 1 trial: trials whose (7t mod 5) is 0 are best (0, 5, 10, 15), ties by index
    assert [t for t, rung in decisions[0].promoted if rung == 1] == [0, 5, 10, 15, 3]
    assert [t for t, rung in decisions[0].promoted if rung == 2] == [0]
    assert boards[0][0].trial == 0 and boards[0][0].rung == 2


@pytest.mark.parametrize("results, message", [
    ([RungResult(9, 0, "running")], "result for trial 9 rung 0 is outside the sweep (9 trials, 3 rungs)"),
    ([RungResult(0, 3, "running")], "result for trial 0 rung 3 is outside the sweep"),
    ([RungResult(0, 0, "done")], "result for trial 0 rung 0: unknown state 'done'"),
    ([RungResult(0, 0, "running"), RungResult(0, 0, "failed")], "two results for trial 0 rung 0"),
])
def test_results_that_do_not_belong_to_the_sweep_are_refused(results, message):
    with pytest.raises(ValueError) as err:
        decide(halving(), results)
    assert message in str(err.value)
