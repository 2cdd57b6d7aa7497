"""Helpers for tests that drive a Coordinator: fault plans from plain data,
and event callbacks written against (kind, detail) pairs."""

from __future__ import annotations

from workers.faults import FaultPlan, Faults


def fault_plan(plan: dict) -> FaultPlan:
    """{worker index: {"fail_at": [shard, step], "nan_rows_at": [...], "delay_s": s}} as a FaultPlan."""
    def faults(knobs: dict) -> Faults:
        return Faults(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in knobs.items()})

    return FaultPlan({int(index): faults(knobs) for index, knobs in plan.items()})


def by_kind(callback):
    """An on_event callback from one taking the event's kind and detail."""
    return lambda event: callback(event.kind, event.detail())
