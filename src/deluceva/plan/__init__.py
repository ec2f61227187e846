"""Physical planning: per-unit profiles (profiler, store), cost model, planner (dense or delta per unit).

    prof = profile_network(net, frames, ProfileKey(model, hw, threads))   # or session.profile_model(...)
    plans = make_planset(prof)                                            # plans for bands of filtering %
    apply_plan(net, plans, filter_pct)                                    # before each frame; keeps state
"""

from deluceva.plan.cost import CostModel
from deluceva.plan.planner import Plan, PlanSet, apply_plan, make_plan, make_planset
from deluceva.plan.profiler import PCTS, profile_network
from deluceva.plan.store import Profile, ProfileKey, default_profile_path, fingerprint, stale_reasons

__all__ = ["PCTS", "CostModel", "Plan", "PlanSet", "Profile", "ProfileKey", "apply_plan", "default_profile_path",
           "fingerprint", "make_plan", "make_planset", "profile_network", "stale_reasons"]
