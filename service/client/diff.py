"""Comparing two runs: their specs field by field, their provenance, and
their parameters at every step both recorded a fingerprint of.

Two runs are *identical* only if both recorded `params_sha256` at the same
set of steps (at least one) and the fingerprints agree at each: the same
bits at every evaluation and checkpoint step, which for a synchronous job
is what the worker count, placement and failures must never change.
Otherwise the verdict names the first step where the parameters differ,
or says why there is nothing to compare; it never says identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING = "(absent)"


@dataclass(frozen=True)
class RunDiff:
    a: str
    b: str
    spec: list[tuple[str, Any, Any]]  # dotted path, A's value, B's value
    provenance: list[tuple[str, Any, Any]]
    common_steps: tuple[int, ...]  # steps both hashed
    only_a: tuple[int, ...] = ()
    only_b: tuple[int, ...] = ()
    first_difference: int | None = None  # the first common step whose hashes differ
    states: tuple[str, str] = ("", "")
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return (bool(self.common_steps) and self.first_difference is None
                and not self.only_a and not self.only_b)

    def verdict(self) -> str:
        if self.first_difference is not None:
            return f"parameters first differ at step {self.first_difference}"
        if not self.common_steps:
            return (f"no common recorded step: job {self.a} recorded parameter hashes at {_steps(self.only_a)}, "
                    f"job {self.b} at {_steps(self.only_b)}")
        if self.only_a or self.only_b:
            extra = "; ".join(f"only job {who} recorded {_steps(steps)}"
                              for who, steps in ((self.a, self.only_a), (self.b, self.only_b)) if steps)
            return (f"parameters agree at the {len(self.common_steps)} steps both recorded, "
                    f"but the recorded steps differ: {extra}")
        return "identical"

    def lines(self) -> list[str]:
        out = [f"spec differences (job {self.a} | job {self.b}):" if self.spec else "specs: the same"]
        out += [f"  {path}: {_show(x)} | {_show(y)}" for path, x, y in self.spec]
        out += [f"  provenance.{path}: {_show(x)} | {_show(y)}" for path, x, y in self.provenance]
        out += [f"note: {n}" for n in self.notes]
        if self.identical:
            out.append(f"parameters equal at all {len(self.common_steps)} recorded steps "
                       f"({_steps(self.common_steps)})")
        out.append(self.verdict())
        return out


def compare(a: dict, b: dict, history_a: list[dict], history_b: list[dict]) -> RunDiff:
    """`a`, `b`: the jobs' statuses (with spec and provenance); the histories: their step records."""
    hashes_a, hashes_b = _hashes(history_a), _hashes(history_b)
    common = tuple(sorted(hashes_a.keys() & hashes_b.keys()))
    differ = [s for s in common if hashes_a[s] != hashes_b[s]]
    notes = [f"job {j['id']} is {j['state']}: its record may not be complete"
             for j in (a, b) if j["state"] != "succeeded"]
    return RunDiff(
        a["id"], b["id"], differences(a.get("spec") or {}, b.get("spec") or {}),
        differences(a.get("provenance") or {}, b.get("provenance") or {}),
        common, tuple(sorted(hashes_a.keys() - hashes_b.keys())), tuple(sorted(hashes_b.keys() - hashes_a.keys())),
        differ[0] if differ else None, (a["state"], b["state"]), notes)


def differences(x: Any, y: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves where two nested mappings differ, as dotted paths (lists
    are compared whole), in path order."""
    if isinstance(x, dict) and isinstance(y, dict):
        found = []
        for key in sorted(x.keys() | y.keys()):
            found += differences(x.get(key, MISSING), y.get(key, MISSING), f"{path}.{key}" if path else str(key))
        return found
    return [] if x == y and type(x) is type(y) else [(path, x, y)]


def _hashes(history: list[dict]) -> dict[int, str]:
    return {r["step"]: r["params_sha256"] for r in history if r.get("params_sha256")}


def _steps(steps: tuple[int, ...], shown: int = 8) -> str:
    if not steps:
        return "no step"
    listed = ", ".join(map(str, steps[:shown]))
    return f"steps {listed}" + (f", … ({len(steps)} in all)" if len(steps) > shown else "")


def _show(value: Any) -> str:
    import json

    return value if value is MISSING else json.dumps(value)
