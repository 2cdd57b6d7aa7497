"""Job specs for tests: keyword fields put in the section they belong to, so
that `spec(workers=3, batch_size=120)` sets `resources.workers` and
`training.batch_size`."""

from __future__ import annotations

from core.spec import ResourcesSpec


def place(raw: dict, **fields) -> dict:
    """`raw` with each field set in `resources` if it is one of its fields,
    else in `training`."""
    for name, value in fields.items():
        raw.setdefault("resources" if name in ResourcesSpec.model_fields else "training", {})[name] = value
    return raw
