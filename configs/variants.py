"""A recipe's variant argument (`configs/<recipe>.py:<a>,<b>`), checked against what it offers.

An unknown variant fails at once instead of training the default: `configs/demo.py:bogus` would
otherwise run the full demo.
"""

from __future__ import annotations

from collections.abc import Iterable


def parse(arg: str, allowed: Iterable[str], recipe: str) -> list[str]:
    """The comma-separated variants of `arg`, each one of `allowed`, or a ValueError naming them."""
    allowed = sorted(set(allowed))
    chosen = [a.strip() for a in arg.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in allowed]
    if unknown:
        raise ValueError(f"configs/{recipe}.py: unknown variant(s) {unknown}; choose from "
                         f"{allowed} (combine with commas, e.g. configs/{recipe}.py:{allowed[0]})")
    return chosen
