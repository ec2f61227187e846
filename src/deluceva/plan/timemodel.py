"""Per-frame unit time model: a unit's ms in a delta frame from what it did in that frame.

The profile's per-percentage curves (cost.py) know a unit's mean time on the profile clip; a frame of another video
(or the same video right after a re-seed, with no backlog yet) costs what its own activity costs. Per unit and frame
four counts describe the work, each one kernel's cost driver:

  in      incoming active elements (active input positions x channels): the filter's accumulation
  held    the filter's candidate positions (forwarded + held back): its selection pass
  macs    multiply-accumulates done (the sparse conv's GEMM, or the dense form's whole conv)
  out     output elements touched (active output positions x channels): state update, activation, emit

A fifth term, `ran` (1 when the unit did any work in the frame, else 0), prices a call that runs apart from one that
skips: at 90-95% most units skip most frames (~2 us), while a unit that runs at all pays a fixed cost of ~10-100 us
(its kernel calls) on top of its per-count costs. With one fixed cost for both, the fit priced every running call
of a busier frame low: YOLOv5n 768x448 at 75%, where units run in most frames, 0.72-0.89 of the measured network
time, against 0.86-0.98 with the term (YOLOX-Nano 0.62-0.87 -> 0.83-1.05; same machine and hour, plan=auto).

Model per mode (delta, dense): ms = base[unit] + slopes[unit] . terms, fitted by non-negative least squares over
every (frame, unit) of the profiling passes (about 85 units x 200 frames per mode for YOLOv5n); non-negative
coefficients keep a frame with more work from being predicted cheaper. Units with fewer than UNIT_MIN_SAMPLES samples
use one fixed cost each and slopes shared by all units of their kind (conv, add, cat, ...). Slopes per unit follow
each kernel's own cost per count (a 16-channel conv's few-pixel loop, a 256-channel GEMM): on YOLOv5n 768x448 at
75-90%, shared slopes predicted the units' summed time on three other clips 4-14% low, per-unit slopes within 7%.
The unit fits are robust: samples far off a first fit (page faults, first calls: up to 100x a unit's usual time)
are dropped and the fit redone (`robust_nnls`).
The network's own work outside the units (input delta, output updates, the unit loop) is fitted per frame as a fixed
cost plus a cost per output element touched. Fitted on filtered frames only (pct > 0; exact runs keep float64
state); idle frames (the network skipped its unit loop) are not fitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import nnls

FEATURES: tuple[str, ...] = ("in", "held", "macs", "out")
TERMS: tuple[str, ...] = (*FEATURES, "ran")  # the model's terms: the counts and whether the unit ran at all
UNIT_MIN_SAMPLES = 20
OUTLIER_MADS = 6.0  # robust_nnls: samples this many robust standard deviations off the first fit are dropped
_SCALE = np.array([1e-6, 1e-4, 1e-8, 1e-6, 1.0])  # terms -> O(1) columns for the solver


def terms(counts: Sequence[float]) -> tuple[float, ...]:
    """The model's terms (TERMS) of one unit's counts (FEATURES) in a frame."""
    return (*counts, 1.0 if any(c > 0 for c in counts) else 0.0)


def kind_key(kind: str) -> str:
    """The model's kind of a unit from its stats / profile kind ("conv+silu" -> "conv")."""
    return str(kind).split("+")[0]


def unit_counts(stats: Sequence[Mapping[str, Any]], sizes: Sequence[tuple[int, int]]) -> list[tuple[float, ...]]:
    """Per unit the counts (FEATURES) of the frame described by `stats` (DeltaNetwork.last_stats); `sizes`: per unit
    (input elements, output elements), as profiler.unit_sizes gives them."""
    rows = []
    for row, (n_in, n_out) in zip(stats, sizes, strict=True):
        held = row.get("candidates") or 0
        rows.append((float(row["active_in"]) * n_in, float(held), float(row["macs"]), float(row["active_out"]) * n_out))
    return rows


def touched(counts: Sequence[Sequence[float]]) -> float:
    """Output elements touched in a frame over all units (the network's own per-frame work grows with it)."""
    return float(sum(c[-1] for c in counts))


def fit(samples: Sequence[tuple[int, str, tuple[float, ...], float]], frames: Sequence[tuple[float, float]],
        n_units: int) -> dict[str, Any]:
    """Fit one mode's model from unit samples (unit index, unit kind, counts, ms) and frame samples (elements
    touched, ms outside the units). Returns {base: [ms per unit], slopes: {kind: [ms per term, per TERMS]},
    unit_fit: per unit [base ms, *ms per term] or None (fewer than UNIT_MIN_SAMPLES samples: base and kind slopes),
    overhead: [ms, ms per element touched], features, samples}."""
    kinds = sorted({k for _, k, _, _ in samples})
    nf = len(TERMS)
    x = np.zeros((len(samples), n_units + nf * len(kinds)))
    y = np.empty(len(samples))
    for i, (u, kind, counts, ms) in enumerate(samples):
        x[i, u] = 1.0
        j = n_units + kinds.index(kind) * nf
        x[i, j:j + nf] = np.asarray(terms(counts)) * _SCALE
        y[i] = ms
    coef = robust_nnls(x, y)
    slopes = coef[n_units:].reshape(len(kinds), nf) * _SCALE
    overhead = [0.0, 0.0]
    if frames:
        fx = np.array([[1.0, t * 1e-6] for t, _ in frames])
        oc, _ = nnls(fx, np.array([ms for _, ms in frames]))
        overhead = [float(oc[0]), float(oc[1]) * 1e-6]
    return {"features": list(TERMS), "base": [float(v) for v in coef[:n_units]],
            "slopes": {k: [float(v) for v in slopes[i]] for i, k in enumerate(kinds)},
            "unit_fit": _unit_fits(samples, n_units), "overhead": overhead, "samples": len(samples)}


def robust_nnls(x: np.ndarray, y: np.ndarray, cut: float | None = None) -> np.ndarray:
    """Non-negative least squares, refitted once without the samples whose residual exceeds `cut` (default
    OUTLIER_MADS) robust standard deviations (1.4826 x the median absolute residual): a page fault or a first call
    can cost one sample 10-100x its usual time (YOLOX-Nano's first conv: 38 ms once, 0.1-9 ms otherwise), and least
    squares would raise the unit's every prediction with it."""
    cut = OUTLIER_MADS if cut is None else cut
    coef = nnls(x, y, maxiter=50 * x.shape[1])[0]
    res = y - x @ coef
    scale = 1.4826 * float(np.median(np.abs(res)))
    keep = np.abs(res) <= cut * scale
    if scale > 0 and x.shape[1] <= int(keep.sum()) < len(y):
        coef = nnls(x[keep], y[keep], maxiter=50 * x.shape[1])[0]
    return coef


def _unit_fits(samples: Sequence[tuple[int, str, tuple[float, ...], float]], n_units: int) -> list[list[float] | None]:
    """Per unit, [base, *slopes per TERMS] fitted (non-negative least squares) on its own samples; None below
    UNIT_MIN_SAMPLES. A unit that ran in every sample gets no `ran` slope (it would be the base again): its base is
    then the cost of a running call."""
    rows: list[list[tuple[tuple[float, ...], float]]] = [[] for _ in range(n_units)]
    for u, _, counts, ms in samples:
        rows[u].append((terms(counts), ms))
    out: list[list[float] | None] = []
    for r in rows:
        if len(r) < UNIT_MIN_SAMPLES:
            out.append(None)
            continue
        x = np.hstack([np.ones((len(r), 1)), np.array([t for t, _ in r], dtype=float) * _SCALE])
        if x[:, -1].all():
            x[:, -1] = 0.0
        coef = robust_nnls(x, np.array([ms for _, ms in r]))
        out.append([float(coef[0]), *(float(v) for v in coef[1:] * _SCALE)])
    return out


def overhead_ms(model: Mapping[str, Any], counts: Sequence[Sequence[float]]) -> float:
    """A fitted model's ms of the network's own work (outside its units) in a frame whose units did `counts`."""
    c0, c1 = model.get("overhead", (0.0, 0.0))
    return float(c0 + c1 * touched(counts))


def unit_ms(model: Mapping[str, Any], index: int, kind: str, counts: Sequence[float]) -> float:
    """A fitted model's ms for unit `index` (of `kind`) doing `counts` (FEATURES): its own fit when it has one, else
    its fixed cost and the kind's slopes. Models fitted before the `ran` term (features = FEATURES) price the counts
    alone."""
    x = terms(counts) if len(model.get("features", FEATURES)) == len(TERMS) else tuple(counts)
    own = model.get("unit_fit")
    if own and own[index] is not None:
        base, *coef = own[index]
        return float(base + sum(a * c for a, c in zip(coef, x, strict=True)))
    slopes = model["slopes"].get(kind)
    extra = sum(a * c for a, c in zip(slopes, x, strict=True)) if slopes else 0.0
    return float(model["base"][index]) + extra
