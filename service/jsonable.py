"""Values as JSON can hold them: the one rule for the store's records and the API's replies."""

from __future__ import annotations

import math


def finite(x):
    """`x` as a float, or None when it is missing, NaN or infinite (a diverged loss is NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def json_safe(value):
    """Non-finite floats as null, tuples and sets as lists, keys as strings,
    in nested lists and dicts too."""
    if isinstance(value, float):
        return finite(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    return value
