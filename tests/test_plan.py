"""Profiler, cost model and planner on a real model and real frames: profile contents, plan choices consistent
with the profile, file round-trips, stale-profile detection, exactness while switching plans mid-stream."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deluceva.convert import convert
from deluceva.dense import make_dense
from deluceva.errors import DelucevaError
from deluceva.plan import CostModel, PlanSet, Profile, ProfileKey, apply_plan, make_plan, make_planset, timemodel
from deluceva.plan.guard import DeltaCost, FrameGuard, activity
from deluceva.plan.planner import cycle_ms
from deluceva.plan.profiler import FILTERED_MIN, profile_network, run_pass, unit_sizes, work_fractions
from deluceva.plan.profiler import PCTS as PROFILED_PCTS
from deluceva.plan.session import decode_frames, resolve_plan, swing_frame
from deluceva.plan.store import KERNELS_REVISION, default_profile_path, fingerprint
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
PERSON = ROOT / "assets/video/one-by-one-person-detection.mp4"
HW = (128, 224)
PCTS = (0.0, 50.0, 95.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    det = load_model("yolov5n")
    *frames, swing = decode_frames(det, HW, PERSON, 8, with_swing=True)
    net = convert(det.network, frames[0])
    ort = make_dense(det.network, HW, 1, "onnxruntime")
    prof = profile_network(net, frames, ProfileKey("yolov5n", HW, 1), PCTS, input_floor=3 / 255, swing=swing,
                           dense_run=ort)
    return det, frames, net, prof


def test_profile_covers_every_unit_in_both_modes(setup):
    _, _, net, prof = setup
    assert prof.unit_names == net.unit_names
    assert prof.stamp == fingerprint()
    assert prof.meta["dense_mode"] == "measured"
    assert set(prof.frame_ms) == {"delta", "dense", "seed", "swing_delta", "swing_dense", "onnxruntime"}
    assert all(len(v) == len(PCTS) for v in prof.frame_ms.values())
    assert all(v > 0 for v in prof.frame_ms["onnxruntime"].values())
    # a frame brightened everywhere costs the delta network more than the clip's typical frame
    assert prof.frame_ms["swing_delta"]["95"] > prof.frame_ms["delta"]["95"]
    # real video, 3 grey-level input floor at P > 0: a small part of the frame changes between frames
    assert 0.0 < prof.meta["activity"]["95"] < 0.5
    first = prof.units[0]
    assert first["kind"].startswith("conv") and first["shape"][1:] == [16, HW[0] // 2, HW[1] // 2]
    assert first["dense_macs"] > 0 and first["has_dense"]
    for u in prof.units:
        assert [p["pct"] for p in u["points"]] == list(PCTS)
        for p in u["points"]:
            assert 0.0 <= p["work"] <= 1.0 and p["delta_ms"] >= 0.0 and p["dense_ms"] >= 0.0
            assert 0.0 <= p["swing_work"] <= 1.0 and p["swing_delta_ms"] >= 0.0
    # the first conv's filter forwards (100 - P)% of its candidates: its work shrinks as P grows
    works = [p["work"] for p in first["points"]]
    assert works[0] > works[1] > works[2] > 0.0
    # real video: the input changes somewhere on every frame, so at 0% the first conv has work to do
    assert first["points"][0]["delta_ms"] > 0.0 and first["points"][0]["dense_ms"] > 0.0


def test_small_filters_are_priced_from_the_filtered_regime_not_the_exact_one(setup):
    """--filter 0 runs exact (float64 state, no floors); any --filter > 0 runs filtered (float32 state, the input
    floor): the default percentages profile both, so a small filter's band is not interpolated from the exact run."""
    _, frames, net, _ = setup
    assert PROFILED_PCTS[:2] == (0.0, FILTERED_MIN) and FILTERED_MIN > 0.0

    def state_dtypes() -> set[torch.dtype]:
        return {u.state.z.dtype for u in net.units if getattr(u, "state", None) is not None}

    try:
        exact = run_pass(net, frames, 0.0, "delta", input_floor=3 / 255)
        assert net.config.exact and net.config.input_floor == 0.0 and state_dtypes() == {torch.float64}
        filtered = run_pass(net, frames, FILTERED_MIN, "delta", input_floor=3 / 255)
        assert not net.config.exact and net.config.input_floor == 3 / 255 and state_dtypes() == {torch.float32}
    finally:
        net.config.input_floor = 0.0
        net.filter_pct = 0.0
        net.reset()
    # real video: the input floor holds codec noise back, so fewer input pixels change in the filtered regime
    assert filtered["activity"] < exact["activity"]
    assert sum(u["active_in"] for u in filtered["units"]) < sum(u["active_in"] for u in exact["units"])


def test_plan_choices_follow_the_profile(setup):
    _, _, _, prof = setup
    cost = CostModel(prof)
    for pct in (0.0, 50.0, 95.0, 70.0):
        plan = make_plan(cost, pct)
        assert set(plan.modes) == set(prof.unit_names)
        for name, mode in plan.modes.items():
            dense, delta = cost.unit_ms(name, "dense", pct), cost.unit_ms(name, "delta", pct)
            if not cost.units[name]["has_dense"]:
                assert mode == "delta"
            elif mode == "dense":
                assert dense < delta
            else:
                assert delta <= dense + max(0.02, 0.05 * delta) + 1e-9
        mixed = cost.predict(plan.modes, pct)
        assert mixed == pytest.approx(plan.delta_ms)
        assert mixed <= min(cost.predict(cost.uniform("dense"), pct), cost.predict(cost.uniform("delta"), pct)) + 1e-9


def test_cost_model_prices_a_frame_from_what_its_units_did(setup):
    det, frames, net, prof = setup
    cost, pct = CostModel(prof), 95.0
    delta = cost.uniform("delta")
    # without counts, the profile clip's own work fractions price a frame as the plan does
    typical = {n: ("delta", cost.work(n, pct), None) for n in cost.order}
    assert cost.predict_frame(typical, pct) == pytest.approx(cost.predict(delta, pct))
    # the per-frame time model was fitted on every (frame, unit) of the profiling passes, in both modes
    model = prof.meta["time_model"]
    assert set(model) == {"delta", "dense"}
    assert model["delta"]["samples"] >= len(cost.order) * (len(frames) - 1)
    assert min(model["delta"]["base"]) >= 0.0 and min(min(v) for v in model["delta"]["slopes"].values()) >= 0.0
    assert max(model["delta"]["slopes"]["conv"]) > 0.0
    # real frames through the network: every unit reports its mode, work fraction and counts
    net.set_unit_modes(delta)
    net.filter_pct, net.config.input_floor = pct, 3 / 255
    net.reset()
    sizes = unit_sizes(net)
    prices = []
    with torch.inference_mode():
        for x in frames:
            net(x)
            if net.last_dense or net.last_skipped:
                continue
            stats = net.last_stats
            work, counts = work_fractions(net, stats), timemodel.unit_counts(stats, sizes)
            assert [r["name"] for r in stats] == cost.order and all(0.0 <= w <= 1.0 for w in work)
            ran = {r["name"]: (r["mode"], w, c) for r, w, c in zip(stats, work, counts, strict=True)}
            prices.append(cost.predict_frame(ran, pct))
            # more work in a unit never makes the frame cheaper; no work leaves the fixed costs
            busier = {n: (m, w, tuple(2 * v for v in c)) for n, (m, w, c) in ran.items()}
            idle = {n: (m, w, (0.0,) * len(c)) for n, (m, w, c) in ran.items()}
            assert cost.predict_frame(idle, pct) <= prices[-1] <= cost.predict_frame(busier, pct)
    net.config.input_floor, net.filter_pct = 0.0, 0.0
    net.reset()
    assert prices and all(p > cost.overhead_ms(pct) for p in prices)


def test_profile_and_plan_files_round_trip(setup, tmp_path):
    _, _, _, prof = setup
    path = prof.save(tmp_path / "p.json")
    back = Profile.load(path)
    assert back.to_json() == prof.to_json()
    plans = make_planset(back)
    assert plans.bands[0][0] == 0.0 and [lo for lo, _ in plans.bands] == sorted(lo for lo, _ in plans.bands)
    again = PlanSet.load(plans.save(tmp_path / "plan.json"))
    assert again.to_json() == plans.to_json()
    for pct in (0.0, 30.0, 80.0, 99.0):
        assert again.for_pct(pct).modes == plans.for_pct(pct).modes
    with pytest.raises(DelucevaError):
        Profile.load(tmp_path / "plan.json")


def test_stale_profile_detected_and_not_used(setup, tmp_path, monkeypatch):
    _, _, _, prof = setup
    monkeypatch.setenv("DELUCEVA_CACHE", str(tmp_path))
    key = ProfileKey("yolov5n", HW, 1)
    plans, note = resolve_plan("auto", key)
    assert plans == "auto" and "no profile" in note
    prof.save(default_profile_path(key))
    plans, note = resolve_plan("auto", key)
    assert isinstance(plans, PlanSet) and "from profile" in note
    stale = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    stale.stamp["cpu"] = "Some Other CPU 9000"
    stale.stamp["versions"]["torch"] = "1.0.0"
    assert len(stale.stale_reasons()) == 2
    older = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    del older.stamp["versions"]["deluceva-kernels"]  # made before the kernels' revision was stamped
    assert older.stale_reasons() == [f"deluceva-kernels None != installed {KERNELS_REVISION}"]
    stale.save(default_profile_path(key))
    plans, note = resolve_plan("auto", key)
    assert plans == "auto" and "stale" in note and "Some Other CPU 9000" in note and "torch 1.0.0" in note
    with pytest.raises(DelucevaError, match="stale"):
        resolve_plan(str(default_profile_path(key)), key)
    with pytest.raises(DelucevaError, match="4 thread"):  # fresh profile, other thread count
        prof.save(tmp_path / "fresh.json")
        resolve_plan(str(tmp_path / "fresh.json"), ProfileKey("yolov5n", HW, 4))


def test_plan_switch_mid_stream_stays_exact_at_filter_0(setup):
    det, frames, net, prof = setup
    bands = make_planset(_without_dense_engine(prof), [0.0, 95.0])
    assert all(p.kind == "units" for _, p in bands.bands)
    forced = _without_dense_engine(prof)
    for u in forced.units:  # make the all-dense plan the cheapest, so switching really changes modes
        for p in u["points"]:
            p["dense_ms"] = 0.0
    dense_plan = make_plan(CostModel(forced), 0.0)
    assert any(m == "dense" for m in dense_plan.modes.values())
    schedule = [bands, dense_plan, "delta", "dense", bands, dense_plan, "auto", bands]
    net.reset()
    with torch.inference_mode():
        for x, plan in zip(frames, schedule, strict=True):
            apply_plan(net, plan, 0.0)
            out = net(x)
            ref = det.network(x)
            for a, b in zip(out, ref, strict=True):
                assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=0)
    modes = {s["mode"] for s in net.last_stats}
    assert "delta" in modes
    with pytest.raises(DelucevaError, match="unknown units"):
        apply_plan(net, type(dense_plan)(0.0, {"no_such_unit": "dense"}, 0.0), 0.0)
    apply_plan(net, "auto", 0.0)


def _without_dense_engine(prof: Profile) -> Profile:
    """A copy of the profile without the dense engine's timing (unit plans only)."""
    out = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    out.frame_ms.pop("onnxruntime")
    out.meta["dense_engine"] = None
    return out


def test_plan_command_prints_table(setup, tmp_path):
    _, _, _, prof = setup
    path = prof.save(tmp_path / "p.json")
    proc = subprocess.run([sys.executable, "-m", "deluceva.cli", "plan", "--profile", str(path), "--filter", "50",
                           "--save", str(tmp_path / "plans.json")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model_0_conv_conv" in proc.stdout and "all-dense" in proc.stdout and "mixed" in proc.stdout
    assert PlanSet.load(tmp_path / "plans.json").key.model == "yolov5n"


def _with_dense_engine_ms(prof: Profile, ms: float) -> Profile:
    """A copy of the profile whose dense engine (ONNX Runtime) took `ms` per frame."""
    out = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    out.frame_ms["onnxruntime"] = {k: ms for k in out.frame_ms["onnxruntime"]}
    return out


def test_ort_band_where_the_delta_network_is_predicted_slower(setup, tmp_path):
    _, _, _, prof = setup
    cost = CostModel(prof)
    cycles = {p: cycle_ms(make_plan(cost, p).delta_ms, cost.seed_ms(p), prof.meta["frames"]) for p in PCTS}
    # the dense engine between the cheapest and the dearest percentage's unit plan: both kinds of band appear
    mid = (min(cycles.values()) + max(cycles.values())) / 2
    plans = make_planset(_with_dense_engine_ms(prof, mid))
    kinds = {p.kind for _, p in plans.bands}
    assert kinds == {"ort", "units"}
    for _, plan in plans.bands:
        assert plan.dense_ms == pytest.approx(mid)
        cycle = cycle_ms(plan.delta_ms, plan.seed_ms, prof.meta["frames"])
        assert (plan.kind == "ort") == (cycle > mid)
        assert plan.predicted_ms == pytest.approx(mid if plan.kind == "ort" else cycle)
    # the dearest percentage (0: nothing filtered) runs on ONNX Runtime, the cheapest on the delta network
    assert plans.for_pct(max(cycles, key=cycles.get)).kind == "ort"
    assert plans.for_pct(min(cycles, key=cycles.get)).kind == "units"
    # the kinds in percentage order (neighbouring unit bands may differ in their modes: one run of each kind)
    runs = [k for k, _ in itertools.groupby(k for _, _, k, _ in plans.summary())]
    assert runs in (["ort", "units"], ["units", "ort"], ["ort", "units", "ort"])
    assert all(p.kind == "ort" for _, p in make_planset(_with_dense_engine_ms(prof, 1e-3)).bands)
    assert all(p.kind == "units" for _, p in make_planset(_with_dense_engine_ms(prof, 1e6)).bands)
    back = PlanSet.load(plans.save(tmp_path / "bands.json"))
    assert [(lo, p.kind, p.predicted_ms) for lo, p in back.bands] == [(lo, p.kind, p.predicted_ms)
                                                                      for lo, p in plans.bands]
    # apply_plan leaves an "ort" band's unit modes alone and returns it for the engine to run ONNX Runtime
    net = setup[2]
    apply_plan(net, "delta", 0.0)
    ort_pct = max(cycles, key=cycles.get)
    assert apply_plan(net, plans, ort_pct).kind == "ort"
    assert set(net.unit_modes().values()) == {"delta"}
    apply_plan(net, "auto", 0.0)


def test_swing_guard_triggers_on_a_full_frame_brightness_change(setup):
    det, frames, _, prof = setup
    floor = 3 / 255
    rgb = _first_rgb()
    x, bright = det.preprocess(rgb, HW)[0], swing_frame(det, rgb, HW, gain=1.25)
    calm_a = activity(frames[2], frames[1], floor)
    swing_a = activity(bright, x, floor)
    assert calm_a < 0.2 and swing_a > 0.9  # real frame-to-frame change vs an exposure change of the same frame
    plan = make_planset(prof).for_pct(95.0)
    assert calm_a < plan.swing_activity <= swing_a  # the profile's swing (6% brighter) vs this one (25%)
    cost = DeltaCost(plan.delta_ms, plan.swing_ms, plan.activity, plan.swing_activity)
    assert cost(swing_a) >= plan.swing_ms and cost(calm_a) < cost(swing_a)
    ort = (2 * cost(calm_a) + cost(swing_a)) / 3  # a dense engine between the two predictions
    guard = FrameGuard(cost, ort_ms=ort, seed_ms=3 * ort)
    assert guard.decide(calm_a) == "delta"
    guard.observe("delta", cost(calm_a))
    assert guard.decide(swing_a) == "ort"  # predicted above the dense engine: run it there
    guard.observe("ort", ort)
    while not guard.needs_activity():  # the minimum stay: decided without measuring the frame's activity
        assert guard.decide(None) == "ort"
        guard.observe("ort", ort)
    with pytest.raises(ValueError, match="activity is needed"):
        guard.decide(None)
    for _ in range(3):  # stays while the scene keeps changing
        assert guard.decide(swing_a) == "ort"
        guard.observe("ort", ort)
    assert guard.decide(calm_a) == "reseed"  # calm again, and fresh delta frames pay for the seed
    guard.observe("reseed", 3 * ort)
    assert guard.decide(calm_a) == "delta"


def test_guard_renews_the_state_when_the_backlog_makes_delta_frames_costlier():
    guard = FrameGuard(DeltaCost(10.0, 80.0, 0.02), ort_ms=50.0, seed_ms=100.0)
    guard.observe("reseed", 100.0)
    decisions = []
    for k in range(40):  # delta frames growing 2 ms per frame since the seed (held-back residuals pile up)
        d = guard.decide(0.02)
        decisions.append(d)
        guard.observe(d, 100.0 if d == "reseed" else 5.0 + 2.0 * (k - _last(decisions, "reseed")))
    first = decisions.index("reseed")
    assert 5 <= first <= 15  # renewal: marginal cost above the cycle's mean incl. the seed (optimum ~10 here)
    assert "ort" not in decisions  # a calm scene re-seeds rather than leaving for the dense engine
    # measured slower than the dense engine right after every re-seed: the stay on the dense engine grows
    guard = FrameGuard(DeltaCost(10.0, 80.0, 0.02), ort_ms=20.0, seed_ms=40.0, renew=False)
    stays = []
    for _ in range(4):
        guard.observe("reseed", 40.0)
        for _ in range(2):
            guard.observe("delta", 30.0)
        assert guard.decide(0.02) == "ort"
        stays.append(guard.stay)
        while guard.decide(0.02) == "ort":
            pass
    assert stays == sorted(stays) and stays[-1] > stays[0]


def _last(seq: list[str], what: str) -> int:
    return max((i for i, v in enumerate(seq) if v == what), default=-1)


def _first_rgb():
    from deluceva.video import open_source

    with open_source(str(PERSON), max_frames=1) as src:
        return next(iter(src)).rgb


def test_engine_exact_at_filter_0_across_ort_delta_ort(setup, tmp_path, monkeypatch):
    """The engine's real paths (ONNX Runtime frame + refresh, re-seed, delta frames) with a scripted guard."""
    from deluceva.engine import Engine, EngineConfig

    det, frames, _, prof = setup
    path = make_planset(_with_dense_engine_ms(prof, 1e6)).save(tmp_path / "plan.json")  # units bands + guard
    script = iter(["delta", "delta", "ort", "ort", "reseed", "delta", "delta", "ort"])
    monkeypatch.setattr(FrameGuard, "decide", lambda self, a, wide=None: next(script))
    eng = Engine(det, EngineConfig(mode="delta", imgsz=f"{HW[1]}x{HW[0]}", plan=str(path)))
    eng.ensure_prepared((432, 768))
    ran = []
    with torch.inference_mode():
        for x in [frames[0], *frames[1:], frames[0]]:
            outs, mode = eng._run_delta(x)
            ran.append((eng.last_plan_info["decision"], mode))
            for a, b in zip(outs, det.network(x), strict=True):
                assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=0)
    assert ran == [("reseed", "refresh"), ("delta", "delta"), ("delta", "delta"), ("ort", "dense"), ("ort", "dense"),
                   ("reseed", "refresh"), ("delta", "delta"), ("delta", "delta"), ("ort", "dense")]


def test_with_a_relative_floor_dense_engine_bands_are_probed_from_the_first_frames(setup, tmp_path):
    """The profile is made without floors, so with a relative floor a band it put on the dense engine is a guess:
    the engine probes the delta network from the stream's first frame on (it seeds, as in a units band). Without a
    floor such a band (its unit plan far slower than the dense engine) stays on the dense engine."""
    from deluceva.engine import Engine, EngineConfig

    det, frames, _, prof = setup
    path = make_planset(_with_dense_engine_ms(prof, 1e-3)).save(tmp_path / "plan.json")  # every band on ORT
    runs = {}
    for floor in (0.0, 0.3):
        eng = Engine(det, EngineConfig(mode="delta", imgsz=f"{HW[1]}x{HW[0]}", filter_pct=50.0, plan=str(path),
                                       relative_floor=floor))
        eng.ensure_prepared((432, 768))
        with torch.inference_mode():
            for x in frames:
                eng._run_delta(x)
                runs.setdefault(floor, []).append(eng.last_plan_info["decision"])
    assert set(runs[0.0]) == {"ort"}
    assert runs[0.3][:3] == ["reseed", "delta", "delta"]  # a probe measures two delta frames before it judges


def test_without_a_profile_frames_are_guarded_against_the_dense_engine_timed_now(setup, tmp_path, monkeypatch):
    """No profile for the model, size and threads: `--plan auto` still guards every frame against ONNX Runtime,
    timed when the engine is prepared. The delta network is probed from the first frame on and measured on the
    stream; every frame's output, whichever ran it, matches the dense network. `--plan delta` runs no guard."""
    from deluceva.engine import Engine, EngineConfig

    det, frames, _, _ = setup
    monkeypatch.setenv("DELUCEVA_CACHE", str(tmp_path))  # an empty profile cache
    runs = {}
    for plan in ("auto", "delta"):
        eng = Engine(det, EngineConfig(mode="delta", imgsz=f"{HW[1]}x{HW[0]}", filter_pct=0.0, plan=plan,
                                       relative_floor=0.3))
        eng.ensure_prepared((432, 768))
        with torch.inference_mode():
            for x in frames:
                outs, _ = eng._run_delta(x)
                runs.setdefault(plan, []).append(eng.last_plan_info["decision"])
                for a, b in zip(outs, det.network(x), strict=True):
                    assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=0)
        if plan == "auto":
            assert "no profile" in eng.plan_note and "guarded against ONNX Runtime timed now" in eng.plan_note
    auto = runs["auto"]
    assert auto[:2] == ["reseed", "delta"]  # probed from the first frame: it seeds, the next ones are measured
    assert runs["delta"] == ["reseed"] + ["delta"] * (len(frames) - 1)


def test_guard_prices_busy_frames_from_measured_ones_and_scales_an_overpricing_profile():
    """A codec keyframe (activity 0.3) after calm 20 ms delta frames: the profile (100 ms calm, 300 ms on a swing)
    predicts 77 ms, above 1.1x the dense engine's 60 ms, so it runs there; with `scale_bump` (a relative floor the
    profile was made without) its bump shrinks with the measured/predicted ratio (20/100: 31 ms) and the frame runs
    as delta. Once measured, frames of about that activity are priced by it, not by the profile; a full-frame swing
    nobody measured still goes by the profile."""
    cost = DeltaCost(100.0, 300.0, 0.02)
    runs = {}
    for scale in (False, True):
        guard = FrameGuard(cost, ort_ms=60.0, seed_ms=90.0, scale_bump=scale)
        guard.observe("reseed", 90.0)
        guard.observe("delta", 20.0)  # a first delta frame measured (as a probe does before it judges)
        for _ in range(5):
            assert guard.decide(0.02) == "delta"
            guard.observe("delta", 20.0)
        runs[scale] = guard.decide(0.3)
    assert runs == {False: "ort", True: "delta"}
    guard.observe("delta", 25.0)  # the scaled guard measured its keyframe
    guard.scale_bump = False
    for _ in range(5):
        assert guard.decide(0.02) == "delta"
        guard.observe("delta", 20.0)
    assert guard.delta_ms(0.28) == 25.0 and guard.decide(0.28) == "delta"
    assert guard.decide(1.0) == "ort"


def test_guard_prices_the_dense_engine_past_a_spike_in_its_first_frames():
    """Until 3 dense-engine frames are measured, the initial estimate (timed when the engine is prepared) fills in:
    one 56 ms spike among 25-31 ms frames does not make the dense engine look 44 ms dear; a seeding frame's price
    likewise skips the stream's first, costlier seed."""
    guard = FrameGuard(DeltaCost(20.0, 60.0, 0.02), ort_ms=25.0, seed_ms=60.0)
    guard.observe("ort", 31.0)
    guard.observe("ort", 56.0)
    assert guard.ort == 31.0
    for _ in range(3):
        guard.observe("ort", 27.0)
    assert guard.ort == 27.0
    guard.observe("reseed", 150.0)
    assert guard.seed == 60.0


def test_guard_rents_slightly_slower_frames_before_throwing_the_state_away():
    """Frames up to 1.1x the dense engine stay on the delta network until the excess paid reaches a re-seed's extra
    cost (leaving refreshes the state); above 1.1x they leave at once."""
    guard = FrameGuard(DeltaCost(10.0, 10.0, 0.02), ort_ms=50.0, seed_ms=150.0)
    guard.observe("reseed", 150.0)
    busy = 0.5  # not calm: no re-seed, the choice is delta or the dense engine
    decisions = []
    for _ in range(40):
        d = guard.decide(busy)
        decisions.append(d)
        if d == "ort":
            break
        guard.observe(d, 54.0)  # 1.08x the dense engine: 4 ms excess per frame
    assert decisions[-1] == "ort" and 20 <= len(decisions) <= 30  # ~ (150 - 50) / 4 frames rented
    guard = FrameGuard(DeltaCost(10.0, 10.0, 0.02), ort_ms=50.0, seed_ms=150.0)
    guard.observe("reseed", 150.0)
    guard.observe("delta", 60.0)  # 1.2x: over the per-frame limit
    assert guard.decide(busy) == "ort"


def test_guard_keeps_the_delta_network_after_a_renewal_when_the_profile_overprices_it():
    """A band the profile prices at 1.5x the dense engine (e.g. made without the relative floor the engine runs
    with) whose probe measured 10 ms delta frames: when the backlog makes a renewal re-seed pay, the frame after it
    is predicted from the first delta frames after earlier re-seeds, not the profile, so the guard stays on the
    delta network instead of fleeing to the dense engine for 8-32 frames."""
    from deluceva.plan.guard import PROBE_STAY

    guard = FrameGuard(DeltaCost(60.0, 80.0, 0.02), ort_ms=40.0, seed_ms=60.0)
    guard.enter_dense_band(probe=True)
    decisions: list[str] = []
    for _ in range(80):
        d = guard.decide(0.02)
        decisions.append(d)
        since = len(decisions) - 1 - _last(decisions, "reseed")
        guard.observe(d, {"ort": 40.0, "reseed": 60.0, "delta": 8.0 + 1.0 * since}[d])
    after = decisions[PROBE_STAY:]
    assert after.count("reseed") >= 3  # the probe's re-seed, then renewals
    assert "ort" not in after


def test_engines_share_one_dense_session_only_when_they_run_it_alike(setup):
    from deluceva.engine import Engine, EngineConfig

    det = setup[0]
    ort = Engine(det, EngineConfig(mode="dense", imgsz="224x128", threads=1, dense_engine="onnxruntime"))
    mixed = Engine(det, EngineConfig(mode="delta", imgsz="224x128", threads=1, plan="dense"))
    mixed.share_dense_engine(ort)  # "auto" is ONNX Runtime
    ort.ensure_prepared((128, 224))
    assert mixed._dense is ort._dense and len(mixed._dense) == 1
    other = Engine(det, EngineConfig(mode="delta", imgsz="224x128", threads=1, dense_engine="torch"))
    with pytest.raises(ValueError, match="differ in threads or dense engine"):
        other.share_dense_engine(ort)


def _probe_run(delta_ms: float, frames: int = 60, grow: tuple[float, float] | None = None) -> list[str]:
    """Decisions of a guard in a dense-engine band that probes (ONNX Runtime 40 ms, re-seed 60 ms), the delta
    network measured at `delta_ms` per frame on a calm scene (grow=(first, step): first + step * frames since the
    re-seed instead)."""
    from deluceva.plan.guard import PROBE_STAY

    guard = FrameGuard(DeltaCost(44.0, 80.0, 0.02), ort_ms=40.0, seed_ms=60.0)  # the profile: 1.1x ONNX Runtime
    guard.enter_dense_band(probe=True)
    decisions = []
    for _ in range(frames):
        d = guard.decide(0.02)
        decisions.append(d)
        if d == "delta" and grow is not None:
            delta_ms = grow[0] + grow[1] * (len(decisions) - 2 - _last(decisions, "reseed"))
        guard.observe(d, {"ort": 40.0, "reseed": 60.0, "delta": delta_ms}[d])
    assert decisions[:PROBE_STAY] == ["ort"] * PROBE_STAY and decisions[PROBE_STAY] == "reseed"
    return decisions


def test_dense_engine_band_probes_the_delta_network_and_keeps_it_when_it_wins():
    """A band the profile clip put on ONNX Runtime (its unit plan predicted 1.1x slower) is probed: on calmer content
    the units run at 25 ms and the guard keeps them; at 44 ms (1.1x) a probe measures two delta frames and loses, at
    60 ms (1.5x) one; lost probes grow rarer (stays of 8, 32, 128 frames), and a probe lost by far (100 ms, its
    cycle 2x the dense engine's) waits longer before the next."""
    won = _probe_run(25.0)
    assert won.count("ort") == 8 and won[-40:].count("delta") >= 35
    # cheap right after the re-seed, then costlier every frame (held-back residuals at 50%): the cycles lose
    growing = _probe_run(0.0, frames=100, grow=(30.0, 12.0))
    probes = [i for i, d in enumerate(growing) if d == "reseed"]
    assert len(probes) == 2 and probes[1] - probes[0] >= 32
    gaps = {}
    for delta_ms, measured in ((44.0, 2), (60.0, 1), (100.0, 1)):
        lost = _probe_run(delta_ms, frames=100)
        probes = [i for i, d in enumerate(lost) if d == "reseed"]
        assert len(probes) == 2 and probes[1] - probes[0] >= 32
        assert lost.count("delta") == measured * len(probes)
        gaps[delta_ms] = probes[1] - probes[0]
    assert max(gaps[44.0], gaps[60.0]) < gaps[100.0] - 5


def test_a_probe_runs_no_swing_frame_on_the_delta_network():
    """A probe (a re-seed, then two measured delta frames) meets an exposure swing on its second frame: the car
    video's swing frames cost 3-4x the dense engine as delta frames, so the swing runs on the dense engine and the
    probe counts as lost; a calm frame there is measured, and so is a busy one priced cheap by delta frames
    measured at about its activity (the person video's codec keyframes)."""
    def probe(second_activity: float, measured: tuple[tuple[float, float], ...] = ()) -> list[str]:
        guard = FrameGuard(DeltaCost(44.0, 120.0, 0.02), ort_ms=40.0, seed_ms=60.0, scale_bump=True)
        for ms, a in measured:
            guard._seen.append((ms, a))
        guard.enter_dense_band(probe=True, stay=0)
        decisions = [guard.start_probe()]  # the stream's first frame
        guard.observe("reseed", 60.0)
        for a in (0.02, second_activity, 0.02):
            d = guard.decide(a)
            decisions.append(d)
            guard.observe(d, {"ort": 40.0, "reseed": 60.0, "delta": 20.0}[d])
        return decisions

    assert probe(0.02) == ["reseed", "delta", "delta", "delta"]
    swing = probe(0.45)
    assert swing[:3] == ["reseed", "delta", "ort"] and swing[3] == "ort"  # the stay after a lost probe
    assert probe(0.45, measured=[(22.0, 0.45)] * 3) == ["reseed", "delta", "delta", "delta"]


def test_a_probe_priced_a_clear_loss_by_two_earlier_ones_at_its_activity_is_skipped():
    """Two probes at activity 0.02 measured the delta network at 2.5x the dense engine: later stays end without a
    re-seed while the activity stays within a factor 2 of theirs, and a calmer scene (0.005) is probed again."""
    guard = FrameGuard(DeltaCost(44.0, 80.0, 0.02), ort_ms=40.0, seed_ms=60.0)
    guard.enter_dense_band(probe=True, stay=0)
    decisions = []
    for i in range(700):
        a = 0.02 if i < 600 else 0.005
        d = guard.decide(a)
        decisions.append(d)
        guard.observe(d, {"ort": 40.0, "reseed": 60.0, "delta": 100.0 if a > 0.01 else 20.0}[d])
    probes = [i for i, d in enumerate(decisions) if d == "reseed"]
    assert len([i for i in probes if i < 600]) == 2  # without the rule: a probe every 256 frames after these
    assert any(600 <= i < 600 + 257 for i in probes) and decisions[-20:].count("delta") >= 19


def _set_curve(unit: dict, works: list[float], delta_ms: list[float], dense_ms: float) -> None:
    """Give a profile unit a delta-form work curve (one point per percentage > 0, the swing point repeating the
    last) and a constant dense time; the exact pass (pct 0) gets a point that must be ignored."""
    pts = unit["points"]
    filtered = [p for p in pts if p["pct"] > 0]
    assert len(filtered) == len(works) - 1
    for p, w, t in zip(filtered, works, delta_ms, strict=False):
        p.update(work=w, delta_ms=t, dense_ms=dense_ms, swing_work=works[-1], swing_delta_ms=delta_ms[-1])
    exact = next(p for p in pts if p["pct"] == 0)
    exact.update(work=0.01, delta_ms=100.0, dense_ms=0.1)


def test_break_even_measured_from_the_profile_switches_units_per_frame(setup):
    """Per unit, the work fraction where its profiled delta time crosses its dense time; the plan runs units
    'auto' at it, so a frame busier than the profile's typical one runs them dense."""
    det, frames, net, prof = setup
    p = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    conv, other = p.units[0], p.units[1]
    _set_curve(conv, [0.1, 0.3, 0.5], [1.0, 3.0, 5.0], 2.0)  # crosses dense (2 ms) half way: work 0.2
    _set_curve(other, [0.1, 0.2, 0.2], [0.5, 1.0, 1.0], 2.0)  # never crosses: through the origin, 2 / 5 per work
    cost = CostModel(p)
    assert cost.break_even(conv["name"]) == pytest.approx(0.2)
    assert cost.break_even(other["name"]) == pytest.approx(0.4)
    no_dense = next(u["name"] for u in p.units if not u["has_dense"])
    assert cost.break_even(no_dense) is None
    plans = make_planset(_without_dense_engine(p), [50.0, 95.0])
    band = plans.for_pct(95.0)
    assert band.break_even[conv["name"]] == pytest.approx(0.2) and no_dense not in band.break_even
    assert band.run_modes[conv["name"]] == "auto" and band.run_modes[no_dense] == band.modes[no_dense]
    loaded = PlanSet.from_json(json.loads(json.dumps(plans.to_json())))
    assert loaded.for_pct(95.0).break_even == band.break_even
    # at run time: a unit whose measured break-even is 0 runs dense on every frame it has work, 1: delta; exact
    net.reset()
    with torch.inference_mode():
        for be in (0.0, 1.0):
            apply_plan(net, band, 0.0)
            net.set_break_evens(dict.fromkeys(band.break_even, be))
            for x in frames[:3]:
                out = net(x)
                for a, b in zip(out, det.network(x), strict=True):
                    assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max())), rtol=0)
            ran = {r["name"]: r["mode"] for r in net.last_stats if r["active_in"] > 0}
            assert ran and all(ran[n] == ("dense" if be == 0.0 else "delta") for n in band.break_even if n in ran)
    with pytest.raises(ValueError, match="unknown unit"):
        net.set_break_evens({"no_such_unit": 0.5})
    net.set_break_evens(dict.fromkeys(band.break_even))
    apply_plan(net, "auto", 0.0)


def test_time_model_fits_each_unit_its_own_costs():
    """Two convs of one kind with different per-MAC costs: each unit's own fit prices it (shared kind slopes could
    not); a unit with too few samples falls back to its fixed cost and the kind's slopes."""
    gen = torch.Generator().manual_seed(0)
    truth = {0: (0.05, 2e-6), 1: (0.10, 8e-6)}  # (fixed ms, ms per MAC)
    samples = []
    for u, (base, per_mac) in truth.items():
        for _ in range(60):
            macs = float(torch.randint(0, 200_000, (1,), generator=gen))
            counts = (macs / 50, macs / 40, macs, macs / 30)
            samples.append((u, "conv", counts, base + per_mac * macs))
    samples.append((2, "conv", (10.0, 10.0, 500.0, 10.0), 0.2))
    model = timemodel.fit(samples, [], 3)
    assert model["unit_fit"][2] is None and model["unit_fit"][0] is not None
    for u, (base, per_mac) in truth.items():
        for macs in (0.0, 50_000.0, 400_000.0):  # 400k: beyond the samples
            counts = (macs / 50, macs / 40, macs, macs / 30)
            assert timemodel.unit_ms(model, u, "conv", counts) == pytest.approx(base + per_mac * macs, rel=1e-3)
    few = (10.0, 10.0, 500.0, 10.0)
    shared = model["base"][2] + sum(a * c for a, c in zip(model["slopes"]["conv"], timemodel.terms(few), strict=True))
    assert timemodel.unit_ms(model, 2, "conv", few) == pytest.approx(shared)


def test_time_model_prices_a_running_call_apart_from_a_skipped_one():
    """A unit that skips most frames (~2 us) and pays a fixed 50 us plus its per-MAC cost when it runs: a small
    running call costs its fixed cost, a skipped one next to nothing. One fixed cost for both (the counts alone)
    would price the running calls low."""
    gen = torch.Generator().manual_seed(2)
    samples = [(0, "conv", (0.0, 0.0, 0.0, 0.0), 0.002) for _ in range(120)]
    for _ in range(60):
        macs = float(torch.randint(1_000, 200_000, (1,), generator=gen))
        samples.append((0, "conv", (macs / 50, macs / 40, macs, macs / 30), 0.05 + 1e-6 * macs))
    model = timemodel.fit(samples, [], 1)
    small = (40.0, 50.0, 2_000.0, 66.0)
    assert timemodel.unit_ms(model, 0, "conv", small) == pytest.approx(0.05 + 1e-6 * 2_000, rel=0.05)
    assert timemodel.unit_ms(model, 0, "conv", (0.0, 0.0, 0.0, 0.0)) == pytest.approx(0.002, abs=1e-3)


def test_time_model_ignores_a_first_call_outlier():
    """One sample 100x its unit's usual time (a page fault, a first call) does not raise the unit's predictions:
    the fit is redone without samples far off the first one; plain least squares would price every frame higher."""
    gen = torch.Generator().manual_seed(1)
    noise = 1 + 0.02 * torch.randn(80, generator=gen)
    samples = []
    for i in range(80):
        macs = float(5_000 * (i + 1))
        samples.append((0, "conv", (macs / 50, macs / 40, macs, macs / 30), float((0.2 + 1e-5 * macs) * noise[i])))
    counts, ms = samples[0][2], samples[0][3]
    samples[0] = (0, "conv", counts, 100 * ms)
    probe = (20.0, 25.0, 1000.0, 33.0)
    robust = timemodel.unit_ms(timemodel.fit(samples, [], 1), 0, "conv", probe)
    assert robust == pytest.approx(0.2 + 1e-5 * 1000, rel=0.05)
    x = np.array([[1.0, *(np.array(timemodel.terms(c)) * timemodel._SCALE)] for _, _, c, _ in samples])
    y = np.array([t for *_, t in samples])
    plain = timemodel.robust_nnls(x, y, cut=float("inf"))
    assert float(plain[0]) > 1.3 * 0.2  # the outlier lifts the fixed cost of a plain fit


@pytest.mark.parametrize("schedule, block", [("frame", 1), ("block", 10), ("clip", 23)])
def test_bench_schedules_run_every_engine_on_every_frame_in_order(schedule, block):
    from deluceva.eval.bench_plan import run_order

    engines = ["mixed", "all-dense", "all-delta", "ort"]
    order = run_order(schedule, engines, 23, seed=0)
    for e in engines:
        assert [i for name, i in order if name == e] == list(range(23))
    pos = 0  # block by block: each engine takes one turn over all of the block's frames
    for b0 in range(0, 23, block):
        frames = list(range(b0, min(23, b0 + block)))
        turns = [order[pos + k * len(frames):pos + (k + 1) * len(frames)] for k in range(len(engines))]
        assert sorted(t[0][0] for t in turns) == sorted(engines)
        assert all(t == [(t[0][0], i) for i in frames] for t in turns)
        pos += len(engines) * len(frames)
    with pytest.raises(ValueError, match="schedule must be one of"):
        run_order("round-robin", engines, 23, seed=0)


def test_bench_runs_its_delta_engines_with_the_relative_floor(setup):
    from deluceva.engine import Engine, EngineConfig
    from deluceva.eval.bench_plan import _engines

    det = setup[0]
    ort = Engine(det, EngineConfig(mode="dense", imgsz="224x128", dense_engine="onnxruntime"))
    engines = _engines(det, "224x128", 1, 50.0, ort, relative_floor=0.3)
    assert {n: e.config.relative_floor for n, e in engines.items() if n != "ort"} == {
        "mixed": 0.3, "all-dense": 0.3, "all-delta": 0.3}
    assert {e.config.plan for n, e in engines.items() if n != "ort"} == {"auto", "dense", "delta"}
    proc = subprocess.run([sys.executable, "-m", "deluceva.cli", "bench", "plan", "--relative-floor", "-0.5"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--relative-floor must be >= 0" in proc.stderr and "Traceback" not in proc.stderr


def test_guard_ends_a_long_stay_on_the_dense_engine_when_delta_frames_priced_by_activity_would_be_cheap():
    """After people walk by, lost probes grow the stay on ONNX Runtime (up to 256 frames) although the calmer scene
    that follows runs the delta network at a fraction of ONNX Runtime's time. Each frame of the stay is priced at
    what delta frames of about its activity were measured to cost; the stay ends (re-seed and probe) once the last
    EARLY_WINDOW frames, codec keyframes included, average under EARLY_RATIO x the dense engine with the re-seed's
    extra cost spread. Frames busier than any measured keep it, and without measured delta frames nothing prices a
    frame and no activity is asked for."""
    from deluceva.plan.guard import EARLY_RATIO, EARLY_WINDOW, PROBE_STAY

    guard = FrameGuard(DeltaCost(20.0, 80.0, 0.01), ort_ms=40.0, seed_ms=60.0)
    assert guard.measured_ms(0.01) is None
    guard.observe("reseed", 60.0)
    measured = {0.010: 12.0, 0.012: 14.0, 0.015: 16.0, 0.05: 48.0, 0.06: 50.0, 0.055: 49.0, 0.3: 70.0, 0.28: 66.0,
                0.32: 72.0}  # this content: calm frames ~14 ms, moderate ~49 ms, keyframes ~70 ms
    for a, ms in measured.items():
        guard._last_a = a
        guard.observe("delta", ms)
    assert guard.measured_ms(0.011) == pytest.approx(14.0)
    assert guard.measured_ms(0.29) == pytest.approx(70.0)
    assert guard.measured_ms(0.9) is None  # busier than anything measured: not priced
    guard.backoff = 128
    guard._to_ort(2)
    assert guard.needs_activity()

    def run(acts):
        out = []
        for a in acts:
            d = guard.decide(a)
            out.append(d)
            guard.observe(d, {"ort": 40.0, "reseed": 60.0, "delta": 14.0}[d])
        return out

    # people walking (unpriced), then moderate motion costlier than ONNX Runtime: the stay goes on
    assert run([0.9] * 10 + [0.055] * 20) == ["ort"] * 30
    # calm frames with a keyframe every 10th (a window of only these: (9 x 14 + 70) / 10 + (60 - 40) / 10 = 21.6 ms)
    calm = ([0.3] + [0.011] * 9) * 2
    window = [49.0] * EARLY_WINDOW
    expected = None
    for i, a in enumerate(calm):
        window = window[1:] + [70.0 if a == 0.3 else 14.0]
        if sum(window) / EARLY_WINDOW + 2.0 <= EARLY_RATIO * 40.0:
            expected = i
            break
    out = run(calm)
    assert expected == 7 and out[:expected + 1] == ["ort"] * expected + ["reseed"]
    # a fresh guard without measured delta frames: a stay runs its course and activity is not needed
    fresh = FrameGuard(DeltaCost(20.0, 80.0, 0.01), ort_ms=40.0, seed_ms=60.0)
    fresh.enter_dense_band(probe=True)
    assert not fresh.needs_activity()
    assert [fresh.decide(None) for _ in range(PROBE_STAY)] == ["ort"] * PROBE_STAY


def test_guard_measures_no_frame_of_a_stay_that_no_window_could_end():
    """A stay can end early only if some window of frames, priced by measured delta frames, would cost under
    EARLY_RATIO x the dense engine; every price is a median of measured frames, so when even the cheapest measured
    delta frame (with a re-seed's extra cost spread) is above that, no frame of the stay is measured (its activity
    and the copy kept to compare the next frame with: ~1 ms of an ONNX Runtime frame). A price is a median of at
    least PRICED_MIN frames, so one cheap frame alone prices nothing; two make the stay measurable again."""
    from deluceva.plan.guard import EARLY_RATIO

    guard = FrameGuard(DeltaCost(20.0, 80.0, 0.01), ort_ms=40.0, seed_ms=60.0)
    guard.observe("reseed", 60.0)
    for a, ms in {0.01: 38.0, 0.02: 45.0, 0.05: 60.0}.items():  # this content: delta frames ~1x ONNX Runtime or more
        guard._last_a = a
        guard.observe("delta", ms)
    assert 38.0 + (60.0 - 40.0) / guard.horizon > EARLY_RATIO * 40.0
    guard.backoff = 32
    guard._to_ort(2)
    decisions = []
    while not guard.needs_activity():
        decisions.append(guard.decide(None))
        guard.observe("ort", 40.0)
    # the whole stay (the back-off, doubled by the lost cycle), unmeasured; its end needs the activity
    assert decisions == ["ort"] * 64 and guard.stay == 0
    measurable = []
    for ms in (12.0, 13.0):  # cheap delta frames measured in a cycle between stays
        guard.state, guard._last_a = "delta", 0.01
        guard.observe("delta", ms)
        guard.state, guard.stay = "ort", 30
        measurable.append(guard.needs_activity())
    assert measurable == [False, True]
