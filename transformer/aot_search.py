"""The smallest config change that makes a train step fit the chip's HBM, compiled to check.

Changes are tried least invasive first; the first that fits is the suggestion:
1. more gradient-accumulation steps (the same global batch and update, fewer rows per device at a
   time);
2. a stronger remat policy (none → dots → dots_no_batch → full: the same update, more recompute),
   alone, then with more accumulation;
3. more FSDP: the data axis folded into fsdp, then the tensor axis too (the same update, the state
   sharded over more chips), alone, then with more accumulation;
4. a smaller global batch: this changes the training (re-tune the learning rate); last resort.
Steps 1 and 2 are skipped when the state alone (parameters, AdamW, gradients) exceeds HBM.

Within a knob, a line fitted to the peaks measured so far against the rows each device holds at a
time picks the next value to compile; the search ends at the smallest value that fits once its
neighbour is known not to fit (or when `max_compiles` is spent). Pure Python: `measure` does the
compiling, so the logic is testable without libtpu.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformer.aot_memory import GIB

REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # Least to most recompute.
TARGET = 0.95  # Aim a prediction at this share of HBM, so a borderline guess is rarely wasted.

Overrides = dict[str, Any]
Measure = Callable[[Overrides], "dict[str, Any] | None"]


def format_overrides(overrides: Overrides) -> list[str]:
    """`{'grad_accum_steps': 8}` → `['--config.grad_accum_steps=8']` (what `apply_overrides` reads)."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def peak_bytes(report: dict[str, Any]) -> float | None:
    """The compiler's peak, or its requirement when it refused to compile (None if unknown)."""
    return report.get("total_bytes") or report.get("required_bytes")


def state_bytes(report: dict[str, Any], accumulating: bool) -> int:
    """Per-device bytes that do not shrink with the rows: state, batch, and (accumulating) the
    gradient sums of the trainable parameters, sharded like them."""
    fixed = report["params_bytes"] + report["optimizer_bytes"] + report["batch_bytes"]
    return fixed + (report.get("grad_bytes", report["params_bytes"]) if accumulating else 0)


def _point(report: dict[str, Any]) -> tuple[int, float | None, bool]:
    return report["rows_per_device"], peak_bytes(report), "total_bytes" in report


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def predict_rows(points: list[tuple[int, float, bool]], fixed: float,
                 target: float) -> float | None:
    """Rows per device whose peak is `target`, from (rows, peak, compiled) points: a line through
    the two smallest-rows points, or through one point and `fixed` (the state) at zero rows. A
    refused compile's requirement is not on the same scale as a peak: used only if alone."""
    compiled = [(r, p) for r, p, ok in points if p is not None and ok]
    points = sorted(compiled or [(r, p) for r, p, _ in points if p is not None])
    if not points:
        return None
    if len({r for r, _ in points}) >= 2:
        (r0, p0), (r1, p1) = points[0], points[1]
        slope = (p1 - p0) / (r1 - r0)
        if slope > 0:
            return r0 + (target - p0) / slope
    rows, peak = points[0]
    slope = (peak - fixed) / rows
    return (target - fixed) / slope if slope > 0 else None


class Search:
    """One bounded search: `run()` returns the suggestion (a dict) or None; `tried` keeps every
    compile's overrides, peak and verdict, in order."""

    def __init__(self, config: Any, report: dict[str, Any], measure: Measure,
                 max_compiles: int = 8, log: Callable[[str], None] = print):
        self.config, self.report, self.measure, self.log = config, report, measure, log
        self.max_compiles = max_compiles
        self.hbm = report["hbm_bytes"]
        self.tried: list[dict[str, Any]] = []
        self._cache: dict[tuple, dict[str, Any] | None] = {}

    # -- compiling ------------------------------------------------------------------------------

    @property
    def budget(self) -> int:
        return self.max_compiles - len(self.tried)

    def _measure(self, overrides: Overrides) -> dict[str, Any] | None:
        key = tuple(sorted(overrides.items()))
        if not overrides:
            return self.report
        if key in self._cache:
            return self._cache[key]
        if self.budget <= 0:
            return None
        shown = " ".join(format_overrides(overrides))
        report = self.measure(overrides)
        self._cache[key] = report
        if report is None:  # Not a valid config (e.g. the batch does not split): no compile.
            self.log(f"    {shown}: not a valid config, skipped")
            return None
        peak = peak_bytes(report)
        verdict = "fits" if report["fits"] else "does not fit"
        amount = (f"{peak / GIB:.2f} GiB of {self.hbm / GIB:.0f} GiB ({peak / self.hbm:.0%})"
                  if peak else "out of HBM")
        self.log(f"    [{len(self.tried) + 1}/{self.max_compiles}] {shown}: {amount}: {verdict}"
                 + (f" ({report['compile_s']} s)" if "compile_s" in report else ""))
        self.tried.append({"overrides": format_overrides(overrides), "peak_bytes": peak,
                           "fits": bool(report["fits"])})
        return report

    # -- one knob -------------------------------------------------------------------------------

    def _knob(self, base: Overrides, base_report: dict[str, Any], values: Sequence[Any],
              field: str, rows_of: Callable[[Any], int],
              accumulating: Callable[[Any], bool]) -> tuple[Overrides, dict] | None:
        """The first of `values` (least invasive first, rows per device decreasing) that fits,
        with `base` overrides; model-guided, then verified against its lesser neighbour."""
        if not values:
            return None
        points = [_point(base_report)]
        lo, hi, best = -1, len(values), None  # values[lo] does not fit; values[hi] fits.
        while hi - lo > 1 and self.budget > 0:
            fixed = state_bytes(base_report, accumulating(values[lo + 1]))
            rows = predict_rows(points, fixed, TARGET * self.hbm)
            if rows is None:  # No figures to go on: halve the rows.
                rows = rows_of(values[lo + 1]) / 2 if lo >= 0 else points[0][0] / 2
            fitting = [i for i in range(lo + 1, hi) if rows_of(values[i]) <= rows]
            # The predicted value; when all below `hi` are predicted not to fit, check the one
            # just below `hi` (so the answer is the smallest), or the last one if none fits yet.
            index = fitting[0] if fitting else hi - 1
            overrides = {**base, field: values[index]}
            report = self._measure(overrides)
            if report is None:
                values = [v for i, v in enumerate(values) if i != index]
                hi -= 1 if index < hi else 0
                continue
            if report["fits"]:
                hi, best = index, (overrides, report)
            else:
                lo = index
                points.append(_point(report))
        return best

    def _accumulate(self, base: Overrides, base_report: dict[str, Any]):
        accum0 = self.config.grad_accum_steps
        rows_per_step = base_report["rows_per_device"] * accum0
        values = [a for a in divisors(rows_per_step) if a > accum0]
        return self._knob(base, base_report, values, "grad_accum_steps",
                          lambda a: rows_per_step // a, lambda a: a > 1)

    def _smaller_batch(self) -> tuple[Overrides, dict] | None:
        accum = self.config.grad_accum_steps
        rows0 = self.report["rows_per_device"]
        per_row = self.report["global_batch_size"] // rows0  # Global rows per per-device row.
        values = [per_row * r for r in reversed(divisors(rows0)[:-1])]  # Halves, thirds, ...
        return self._knob({}, self.report, values, "data.global_batch_size",
                          lambda b: b // per_row, lambda b: accum > 1)

    # -- the plans ------------------------------------------------------------------------------

    def _plans(self) -> list[tuple[Overrides, str]]:
        """Changes besides accumulation, least invasive first."""
        model, mesh = self.config.model, self.config.mesh
        plans = []
        fixed = state_bytes(self.report, True)
        state_fits = fixed < TARGET * self.hbm
        if state_fits and model.remat_policy in REMAT_ORDER:
            for policy in REMAT_ORDER[REMAT_ORDER.index(model.remat_policy) + 1:]:
                plans.append(({"model.remat_policy": policy}, "a stronger remat policy"))
        if mesh.data != 1:
            plans.append(({"mesh.data": 1, "mesh.fsdp": -1}, "more FSDP (the data axis folded in)"))
        if mesh.tensor != 1:
            plans.append(({"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1},
                          "more FSDP (the data and tensor axes folded in)"))
        return plans

    def run(self) -> dict[str, Any] | None:
        found = None
        state_fits = state_bytes(self.report, True) < TARGET * self.hbm
        if state_fits:
            self.log("    more gradient accumulation (same global batch):")
            found = self._accumulate({}, self.report)
        for plan, why in self._plans():
            if found or self.budget <= 0:
                break
            self.log(f"    {why}:")
            report = self._measure(plan)
            if report is None:
                continue
            if report["fits"]:
                found = (plan, report)
            elif state_bytes(report, True) < TARGET * self.hbm:
                found = self._accumulate(plan, report)
        changes_training = False
        if not found and state_fits and self.budget > 0:
            self.log("    a smaller global batch (changes the training):")
            found, changes_training = self._smaller_batch(), True
        if not found:
            return None
        overrides, report = found
        return {"overrides": format_overrides(overrides), "peak_bytes": peak_bytes(report),
                "hbm_bytes": self.hbm, "fits": True, "changes_training": changes_training,
                "report": report}
