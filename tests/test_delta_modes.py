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
