"""Per-unit execution modes (delta / dense / auto): exact at 0% filtering on real video while modes flip every
frame, statistics report which form ran, bad names/modes are rejected."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from deluceva.convert import convert
from deluceva.video import open_source
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4


@cache
def _clip(model: str, video: str, n: int) -> tuple[object, list[torch.Tensor]]:
    torch.set_num_threads(1)
    det = load_model(model)
    with open_source(str(ROOT / "assets/video" / video), max_frames=n) as src:
        hw = det.input_hw("384x224", src.source_hw)
        xs = [det.preprocess(f.rgb, hw)[0] for f in src]
    return det, xs


def _rel_err(out, ref) -> float:
    return max(float((r - d).abs().max()) / max(float(r.abs().max()), 1e-6) for r, d in zip(ref, out, strict=True))


@pytest.mark.parametrize("model", ["yolov5n", "yolox-nano"])
def test_exact_while_flipping_modes_every_frame(model: str) -> None:
    det, xs = _clip(model, "car-detection.mp4", 24)
    net = convert(det.network, xs[0])
    names = net.unit_names
    assert len(names) == len(set(names)) > 10
    patterns = ["delta", "dense", "auto"]
    ran_dense_units = set()
    with torch.inference_mode():
        for i, x in enumerate(xs):
            if i > 0:  # every frame a different assignment: one mode for all, or alternating per unit
                if i % 4 == 3:
                    modes = {n: patterns[(i + j) % 3] for j, n in enumerate(names)}
                else:
                    modes = dict.fromkeys(names, patterns[i % 3])
                net.set_unit_modes(modes)
            out = net(x)
            assert _rel_err(out, det.network(x)) <= REL_TOL, f"frame {i}"
            if i > 0:
                stats = net.last_stats
                assert [s["name"] for s in stats] == names
                for s in stats:
                    assert s["mode"] in ("delta", "dense")
                    if s["mode"] == "dense":
                        ran_dense_units.add(s["name"])
                        assert net.unit_modes()[s["name"]] in ("dense", "auto")
                    elif s["active_in"] > 0 and net.unit_modes()[s["name"]] == "dense":
                        assert not net.units[names.index(s["name"])].has_dense
    assert any("conv" in net.units[names.index(n)].kind for n in ran_dense_units)


def test_auto_picks_dense_above_break_even_and_modes_are_validated() -> None:
    det, xs = _clip("yolox-nano", "vtest_pets09_s2l1.avi", 3)
    net = convert(det.network, xs[0])
    with torch.inference_mode():
        net(xs[0])
        net(xs[1])  # codec noise: a large share of input pixels change
    for s, u in zip(net.last_stats, net.units, strict=True):
        if u.has_dense and s["active_in"] > 0 and u.mode == "auto":
            # active_in is measured before the filter; at 0% the filter forwards exactly those pixels
            assert (s["mode"] == "dense") == (s["active_in"] > u.break_even)
    with pytest.raises(ValueError):
        net.set_unit_modes({"no_such_unit": "dense"})
    with pytest.raises(ValueError):
        net.set_unit_modes({net.unit_names[0]: "sparse"})


def test_dense_form_of_conv_units_matches_their_delta_form_in_a_filtered_run(monkeypatch) -> None:
    """With filtering on, a conv + activation unit's dense form (dense conv, then the state and f only on the
    non-zero output rows, one numba pass) gives the delta form's Δy and state on real filtered deltas."""
    from deluceva.delta import kernels_bridge
    from deluceva.delta.conv import ConvUnit

    det, xs = _clip("yolov5n", "vtest_pets09_s2l1.avi", 6)
    net = convert(det.network, xs[0], filter_pct=50.0, relative_floor=0.2)
    fused = []
    step_act_rows = kernels_bridge.step_act_rows
    monkeypatch.setattr(kernels_bridge, "step_act_rows", lambda *a: fused.append(1) or step_act_rows(*a))
    checked = []

    def both_forms(unit: ConvUnit, dense_call):
        def call(d):
            if d is None:
                return dense_call(d)
            z0 = unit.state.z.clone()
            want = ConvUnit.__call__(unit, d)
            z_delta = unit.state.z.clone()
            unit.state.z.copy_(z0)
            got = dense_call(d)
            scale = float(z0.abs().max())
            torch.testing.assert_close(unit.state.z, z_delta, atol=1e-5 * scale, rtol=0)
            if want is None or got is None:
                assert want is None or float(want.values.abs().max()) <= 1e-5 * scale
            else:
                torch.testing.assert_close(got.to_dense(), want.to_dense(), atol=1e-5 * scale, rtol=0)
            checked.append(unit.name)
            return got
        return call

    with torch.inference_mode():
        net(xs[0])
        net.set_unit_modes(dict.fromkeys(net.unit_names, "dense"))
        for u in net.units:
            if isinstance(u, ConvUnit) and u.act_node is not None:
                u.dense_call = both_forms(u, u.dense_call)
        for x in xs[1:]:
            net(x)
    assert len(set(checked)) > 20 and fused
