"""bench/scaling.py's choice of points and its fit, without measuring.

Points made by the model itself from known constants must give those
constants back: that holds only if the fit set sees every constant apart
from the others (two rates, one where the link sets the pace of a transfer
and one where the software does, for 1/eta and mu; one host, with no pull
phase, for c0 against alpha; 1, 2 and 4 workers for c_w), which is what
this checks. No Ray, no namespaces.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import scaling as bench  # noqa: E402

from core.scaling import Calibration, Network, Placement, parameter_server_step  # noqa: E402

ROWS = 256
# mu of 15 ns/B (67 MB/s): slower than a 1 Gbit/s link at 0.9, faster than 200 Mbit/s
TRUE = Calibration(flop_rate=80e9, step_overhead_s=3e-3, per_worker_s=1.5e-3, per_transfer_s=0.3e-3,
                   link_efficiency=0.9, per_byte_s=15e-9, reduce_s_per_value=0.7e-9)


def made_rows(points: list[dict], cal: Calibration = TRUE) -> list[dict]:
    """Each point as the bench would record it, its step and phases the model's."""
    rows = []
    for i, p in enumerate(points):
        # Ray's choice of the servers' node, varied: beside the driver, or on another worker's node.
        place = Placement(servers_with_driver=i % 3 != 0) if p["hosts"] > 1 else Placement()
        latency = 0.0 if p["rate"] is None else (p["latency_ms"] + 0.1) / 1e3
        rate = bench.RATES[p["rate"]] if p["rate"] else 1.0
        step = parameter_server_step(bench.shape_for(p, ROWS), Network(p["hosts"], rate, latency), cal,
                                     contention=max(1.0, p["hosts"] / bench.CORES), placement=place)
        rows.append({**p, "placement": asdict(place), "rate_bytes_s": rate, "latency_s": latency,
                     "step_s": step.total_s, "phases": {"compute": step.compute_s,
                                                        "reduce_apply": step.reduce_apply_s}})
    return rows


def every_point() -> list[dict]:
    return [p for n in bench.HOSTS for p in bench.points(n)]


def test_the_points_cover_1_to_4_hosts_2_rates_2_latencies_and_hold_out_3_hosts():
    points = every_point()
    assert {p["hosts"] for p in points} == {1, 2, 3, 4}
    many = [p for p in points if p["hosts"] > 1]
    assert {p["rate"] for p in many} == set(bench.RATES) and len(bench.RATES) == 2
    assert {p["latency_ms"] for p in many} == set(bench.LATENCIES_MS) and len(bench.LATENCIES_MS) == 2
    assert {p["use"] for p in points if p["hosts"] == 3} == {"check"}
    assert {p["use"] for p in points if p["hosts"] != 3} == {"fit"}


def test_the_fit_gives_back_the_constants_the_points_were_made_with():
    rows = made_rows(every_point())
    cal, _ = bench.calibrate(rows, ROWS)
    for field, want in asdict(TRUE).items():
        assert getattr(cal, field) == pytest.approx(want, rel=1e-6), field
    for r in rows:
        assert bench.predict(r, cal, ROWS)[0] == pytest.approx(r["step_s"], rel=1e-9)


def test_with_a_slow_software_everywhere_the_fit_says_the_link_never_sets_the_pace():
    slow = replace(TRUE, per_byte_s=60e-9)  # slower than either link
    cal, _ = bench.calibrate(made_rows(every_point(), slow), ROWS)
    assert cal.per_byte_s == pytest.approx(60e-9, rel=1e-6) and cal.link_efficiency == float("inf")


def test_h_fitted_freely_is_the_count_when_the_servers_sit_beside_the_driver():
    rows = [r for r in made_rows(every_point()) if r["placement"]["servers_with_driver"]]
    _, h = bench.calibrate(rows, ROWS, free_h=True)
    assert h == pytest.approx(2.0, rel=1e-6)  # parameters out, rows back: latency_hops by hand


def fit_rank(points: list[dict]) -> int:
    a = [bench._terms(r, TRUE, ROWS, link_bound=r["rate"] == "200Mbit")[1] for r in made_rows(points)
         if r["use"] == "fit"]
    return int(np.linalg.matrix_rank(np.array(a)))


def test_the_fit_set_sees_all_5_constants_and_needs_both_rates():
    """The design matrix of the fit set (c0, c_w, alpha, 1/eta, mu): full
    rank; at one rate only one of the bytes' two paces is seen."""
    points = every_point()
    assert fit_rank(points) == 5
    assert fit_rank([p for p in points if p["rate"] != "200Mbit"]) == 4
