"""Profiler, cost model and planner on a real model and real frames: profile contents, plan choices consistent
with the profile, file round-trips, stale-profile detection, exactness while switching plans mid-stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deluceva.convert import convert
from deluceva.errors import DelucevaError
from deluceva.plan import CostModel, PlanSet, Profile, ProfileKey, apply_plan, make_plan, make_planset
from deluceva.plan.profiler import profile_network
from deluceva.plan.session import decode_frames, resolve_plan
from deluceva.plan.store import default_profile_path, fingerprint
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
PERSON = ROOT / "assets/video/one-by-one-person-detection.mp4"
HW = (128, 224)
PCTS = (0.0, 50.0, 95.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def setup():
    det = load_model("yolov5n")
    frames = decode_frames(det, HW, PERSON, 8)
    net = convert(det.network, frames[0])
    prof = profile_network(net, frames, ProfileKey("yolov5n", HW, 1), PCTS)
    return det, frames, net, prof


def test_profile_covers_every_unit_in_both_modes(setup):
    _, _, net, prof = setup
    assert prof.unit_names == net.unit_names
    assert prof.stamp == fingerprint()
    assert prof.meta["dense_mode"] == "measured"
    assert set(prof.frame_ms) == {"delta", "dense"} and all(len(v) == len(PCTS) for v in prof.frame_ms.values())
    first = prof.units[0]
    assert first["kind"].startswith("conv") and first["shape"][1:] == [16, HW[0] // 2, HW[1] // 2]
    assert first["dense_macs"] > 0 and first["has_dense"]
    for u in prof.units:
        assert [p["pct"] for p in u["points"]] == list(PCTS)
        for p in u["points"]:
            assert 0.0 <= p["work"] <= 1.0 and p["delta_ms"] >= 0.0 and p["dense_ms"] >= 0.0
    # the first conv's filter forwards (100 - P)% of its candidates: its work shrinks as P grows
    works = [p["work"] for p in first["points"]]
    assert works[0] > works[1] > works[2] > 0.0
    # real video: the input changes somewhere on every frame, so at 0% the first conv has work to do
    assert first["points"][0]["delta_ms"] > 0.0 and first["points"][0]["dense_ms"] > 0.0


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
        assert mixed == pytest.approx(plan.predicted_ms)
        assert mixed <= min(cost.predict(cost.uniform("dense"), pct), cost.predict(cost.uniform("delta"), pct)) + 1e-9


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
    bands = make_planset(prof, [0.0, 95.0])
    forced = Profile.from_json(json.loads(json.dumps(prof.to_json())))
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


def test_plan_command_prints_table(setup, tmp_path):
    _, _, _, prof = setup
    path = prof.save(tmp_path / "p.json")
    proc = subprocess.run([sys.executable, "-m", "deluceva.cli", "plan", "--profile", str(path), "--filter", "50",
                           "--save", str(tmp_path / "plans.json")], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model_0_conv_conv" in proc.stdout and "all-dense" in proc.stdout and "mixed" in proc.stdout
    assert PlanSet.load(tmp_path / "plans.json").key.model == "yolov5n"
