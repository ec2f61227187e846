"""The `deluceva plan` table: per unit its cost in each mode at a filtering percentage and the planner's choice."""

from __future__ import annotations

from rich.table import Table

from deluceva.plan.cost import CostModel
from deluceva.plan.planner import Plan, cycle_ms


def _macs(v: int) -> str:
    return f"{v / 1e6:.1f}M" if v >= 1e5 else str(v)


def plan_table(model: CostModel, plan: Plan) -> Table:
    """Rows: operator, kind, output shape, dense MACs, work fraction, dense ms, delta ms, choice at that work, the
    work fraction above which the unit runs dense in a frame (its measured break-even); caption: totals."""
    p = plan.pct
    key = model.profile.key
    t = Table(title=f"deluceva plan — {key.model} {key.hw[1]}x{key.hw[0]}, {key.threads} thread(s), filter {p:g}%")
    for col in ("operator", "kind", "output", "MACs", "active", "dense ms", f"delta ms @{p:g}%", "choice",
                "dense above"):
        t.add_column(col, justify="left" if col in ("operator", "kind", "output", "choice") else "right")
    for n in model.order:
        u = model.units[n]
        dense, delta = model.unit_ms(n, "dense", p), model.unit_ms(n, "delta", p)
        choice = plan.modes.get(n, "auto")
        if not u.get("has_dense", True):
            choice, dense_s = "delta (only)", "-"
        else:
            dense_s = f"{dense:.2f}"
        t.add_row(n, u["kind"], "x".join(map(str, u["shape"][1:])), _macs(int(u["dense_macs"])),
                  f"{model.work(n, p):.1%}", dense_s, f"{delta:.2f}",
                  f"[bold]{choice}[/bold]" if choice == "dense" else choice,
                  f"{plan.break_even[n]:.1%}" if n in plan.break_even else "-")
    t.caption = totals_line(model, plan)
    return t


def totals(model: CostModel, plan: Plan) -> dict[str, float]:
    """Predicted ms per delta frame: all-dense, all-delta, mixed (the plan)."""
    p = plan.pct
    return {"all-dense": model.predict(model.uniform("dense"), p),
            "all-delta": model.predict(model.uniform("delta"), p), "mixed": model.predict(plan.modes, p)}


def totals_line(model: CostModel, plan: Plan) -> str:
    tot = totals(model, plan)
    n_dense = sum(1 for m in plan.modes.values() if m == "dense")
    line = (f"predicted ms/frame: all-dense {tot['all-dense']:.1f}, all-delta {tot['all-delta']:.1f}, "
            f"mixed {tot['mixed']:.1f} ({n_dense} of {len(plan.modes)} units dense)")
    if plan.dense_ms is None:
        return line + "; no ONNX Runtime timing in this profile"
    runs = "ONNX Runtime (whole frames)" if plan.kind == "ort" else "the delta network"
    swing = f", on a frame that changes everywhere {plan.swing_ms:.1f}" if plan.swing_ms is not None else ""
    return (f"{line}\nONNX Runtime {plan.dense_ms:.1f}, re-seed {plan.seed_ms:.1f}{swing}; with re-seeds "
            f"{cycle_ms(tot['mixed'], plan.seed_ms or 0.0, int(model.profile.meta.get('frames', 0))):.1f} "
            f"-> this band runs {runs}")
