"""Frames with nothing to propagate (DeltaNetwork.last_changed False) on real video: the network skips every unit and
returns the previous outputs, bit for bit what the full unit loop gives (idle_shortcut off), in exact mode, under the
input noise floor and with filters that still hold residuals back; the engine then reuses the previous detections."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from deluceva.convert import convert
from deluceva.delta import kernels_bridge
from deluceva.engine import Engine, EngineConfig
from deluceva.video import open_source
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "assets/video/car-detection.mp4"
PEOPLE = ROOT / "assets/video/vtest_pets09_s2l1.avi"


@cache
def _clip(n: int, size: str = "384x224", video: Path = VIDEO) -> tuple[object, list[torch.Tensor], list]:
    torch.set_num_threads(1)
    det = load_model("yolov5n")
    with open_source(str(video), max_frames=n) as src:
        frames = list(src)
    hw = det.input_hw(size, frames[0].rgb.shape[:2])
    return det, [det.preprocess(f.rgb, hw)[0] for f in frames], [f.rgb for f in frames]


def _pair(det, x0: torch.Tensor, pct: float = 0.0, input_floor: float = 0.0):
    """Two converted networks, the second visiting every unit on idle frames (the reference)."""
    nets = [convert(det.network, x0, filter_pct=pct, input_floor=input_floor) for _ in range(2)]
    nets[1].idle_shortcut = False
    return nets


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_repeated_frames_are_idle_and_exact() -> None:
    det, xs, _ = _clip(4)
    fast, ref = _pair(det, xs[0])
    prev = None
    for i, x in enumerate([xs[0], xs[1], xs[1], xs[1], xs[2], xs[3], xs[3]]):
        out, want = fast(x), ref(x)
        assert _same(out, want), f"frame {i}: the idle shortcut changed the outputs"
        repeated = i in (2, 3, 6)
        assert fast.last_changed is (not repeated)
        assert ref.last_changed is (not repeated)  # the full loop finds no output delta either
        if repeated:
            assert _same(out, prev) and all(o is not p for o, p in zip(out, prev, strict=True))
            stats = fast.last_stats
            assert all(r["macs"] == 0 and r["active_in"] == 0 and r["active_out"] == 0 for r in stats)
            assert [r["name"] for r in stats] == fast.unit_names
            with torch.inference_mode():
                out[0].add_(1.0)  # callers own the returned tensors: this must not reach the next frame
        else:
            prev = [o.clone() for o in out]
    assert _same(fast(xs[3]), ref(xs[3]))


def test_changes_under_the_input_floor_are_idle() -> None:
    det, xs, _ = _clip(2)
    floor = 3 / 255
    fast, ref = _pair(det, xs[0], input_floor=floor)
    g = torch.Generator().manual_seed(0)
    assert _same(fast(xs[0]), ref(xs[0]))
    base = xs[0]
    for k in range(4):  # codec-like noise: up to 2 grey levels on a third of the pixels, never accumulating past 3
        noise = torch.randint(-2, 3, base.shape, generator=g) * (torch.rand(base.shape, generator=g) < 0.33)
        y = (base * 255 + noise).clamp(0, 255) / 255
        assert _same(fast(y), ref(y))
        assert not fast.last_changed, f"noise frame {k} was not idle"
    assert _same(fast(xs[1]), ref(xs[1]))  # a real change above the floor runs
    assert fast.last_changed


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch"])
def test_filters_with_residuals_drain_then_go_idle(use_kernels: bool, monkeypatch) -> None:
    monkeypatch.setattr(kernels_bridge, "enabled", use_kernels)
    det, xs, _ = _clip(2, "384x224" if use_kernels else "256x160")
    fast, ref = _pair(det, xs[0], pct=90.0)
    assert _same(fast(xs[0]), ref(xs[0]))
    y = xs[0].clone()  # a small real change: a 4x4 patch of the next frame, brightened
    y[..., 100:104, 150:154] = xs[1][..., 100:104, 150:154] + 0.2
    idle_at = None
    for i in range(120):  # the changed frame again and again: what the filters hold drains, then they hold it all
        assert _same(fast(y), ref(y)), f"repeat {i}: outputs differ"
        if not fast.last_skipped:
            assert idle_at is None, "a frame after an idle one ran units"
            continue
        assert not fast.last_changed
        if idle_at is None:
            idle_at = i
            stats, ref_stats = fast.last_stats, ref.last_stats
            assert [r["candidates"] for r in stats] == [r["candidates"] for r in ref_stats]
            pending = [f for f in fast._filters if f.pending]
            assert pending and all(f.quiet() for f in pending)  # held back, not empty: quiet filters
        elif i > idle_at + 3:
            break
    assert idle_at is not None and idle_at > 2, f"idle at repeat {idle_at}: expected a drain first"
    for f, g in zip(fast._filters, ref._filters, strict=True):  # skipping left every residual as the calls did
        assert f.pending == g.pending and torch.equal(f.r, g.r)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch"])
def test_filters_holding_only_what_is_under_their_floor_are_quiet(use_kernels: bool, monkeypatch) -> None:
    """Relative floors: once a change has gone through, what the filters still hold is under their floors, so the
    same frame again is idle at once (no drain: those residuals are never forwarded without new input), with the
    full loop's outputs and residuals."""
    monkeypatch.setattr(kernels_bridge, "enabled", use_kernels)
    det, xs, _ = _clip(2, "384x224" if use_kernels else "256x160")
    nets = [convert(det.network, xs[0], filter_pct=0.01, relative_floor=0.1) for _ in range(2)]
    fast, ref = nets
    ref.idle_shortcut = False
    assert _same(fast(xs[0]), ref(xs[0]))
    y = xs[0].clone()  # a real change: a 12x12 patch of the next frame, brightened
    y[..., 100:112, 150:162] = xs[1][..., 100:112, 150:162] + 0.3
    assert _same(fast(y), ref(y))
    assert fast.last_changed and any(f.pending for f in fast._filters)  # a real change, some of it held back
    for i in range(3):
        assert _same(fast(y), ref(y)), f"repeat {i}: outputs differ"
        assert fast.last_skipped and not fast.last_changed, f"repeat {i} ran units"
    held = [f for f in fast._filters if f.pending]
    assert held and all(f.quiet() for f in held)
    for f, g in zip(fast._filters, ref._filters, strict=True):
        assert f.pending == g.pending and torch.equal(f.r, g.r)


def test_engine_reuses_detections_when_nothing_changed() -> None:
    det, _, rgbs = _clip(2, video=PEOPLE)
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta"))
    d0, m0 = eng.infer(rgbs[0])
    d1, m1 = eng.infer(rgbs[0])
    d2, m2 = eng.infer(rgbs[1])
    d3, m3 = eng.infer(rgbs[1])
    assert (m0, m1, m2, m3) == ("refresh", "delta", "delta", "delta")
    assert d1 is d0 and d3 is d2 and d2 is not d1
    assert len(d0) > 0  # pedestrians: the reused detections are not trivially empty
    dense = Engine(det, EngineConfig(mode="dense", imgsz="384x224", threads=1, dense_engine="torch"))
    ref = dense.infer(rgbs[1])[0]
    assert len(ref) == len(d3) and (abs(ref.scores - d3.scores) < 1e-3).all()


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32])
def test_returned_outputs_are_never_shared_with_a_holder(state_dtype: torch.dtype) -> None:
    """Outputs are reused only once the caller let go of them: what a caller keeps (tensor, view, array) never
    changes behind its back, and values stay exact on changed and idle frames. float64 state keeps the outputs as
    rows and rewrites the mirror; float32 state adds the deltas to the mirror itself."""
    det, xs, _ = _clip(4)
    net = convert(det.network, xs[0], state_dtype=state_dtype)
    ref = convert(det.network, xs[0], state_dtype=state_dtype)
    kept = []
    for i, x in enumerate([xs[0], xs[1], xs[1], xs[2], xs[3], xs[3], xs[2]]):
        out, want = net(x), ref(x)
        assert _same(out, want)
        if i % 3 == 0:
            kept.append((out, [o.clone() for o in out]))  # the tensors themselves
        elif i % 3 == 1:
            kept.append(([out[0][0]], [out[0][0].clone()]))  # a view only
        else:
            kept.append(([torch.from_numpy(out[1].numpy())], [out[1].clone()]))  # an array only
        del out
        for held, copy in kept:
            assert _same(held, copy), f"frame {i}: a held output changed"


def _mirror_matches_network(eng: Engine) -> bool:
    """The engine's uint8 mirror holds exactly the image region of the input the delta network has applied."""
    m, net = eng._mirror, eng.delta_network
    h, w = m.image.shape[:2]
    applied = net._x[0, :, m.top:m.top + h, m.left:m.left + w].permute(1, 2, 0) * 255.0
    return bool(torch.equal(applied.round().to(torch.uint8), torch.from_numpy(m.image)))


def test_input_mirror_tracks_the_applied_input_on_real_frames() -> None:
    """Pets video (letterboxed: the image sits between pad bands), 90% filtering with the 3-grey-level input floor:
    after every frame the uint8 mirror equals the network's applied input, pixel for pixel."""
    det, _, rgbs = _clip(12, video=PEOPLE)
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=90.0))
    held = 0
    for i, rgb in enumerate(rgbs):
        eng.infer(rgb)
        assert eng._mirror is not None and eng._mirror.left > 0  # a real letterbox offset is exercised
        assert _mirror_matches_network(eng), f"frame {i}: mirror and applied input differ"
        img = det.fit(rgb, (224, 384))[0]
        held += int((eng._mirror.image != img).any(axis=2).sum())
    assert held > 0  # some pixels were held under the floor: the mirror is not just the last image


def test_input_mirror_margin_stays_under_the_floor() -> None:
    from deluceva.delta.inputs import InputMirror

    assert InputMirror.margin(3.0) == 2
    assert InputMirror.margin(2.5) == 1
    assert InputMirror.margin(0.0) == 0  # exact: only an identical image is unchanged
    m = InputMirror(0, 0, (32, 32))
    base = np.full((32, 32, 3), 100, np.uint8)
    assert not m.unchanged(base, 3.0)  # nothing seeded yet
    m.seeded(base)
    near, far = base.copy(), base.copy()
    near[5, 7, 1] = 102
    far[31, 31, 2] = 97  # 3 grey levels: the float comparison decides, so not "unchanged"
    assert m.unchanged(near, 3.0) and not m.unchanged(far, 3.0) and not m.unchanged(near, 0.0)
    assert not m.unchanged(base[:16], 3.0)  # another size


def test_engine_idle_shortcut_gives_the_records_of_the_full_path() -> None:
    """Repeated and noise-only frames (1 grey level in the source frame, up to 2 after resizing) take the uint8 idle
    shortcut (no float input, no input
    pass); every record equals the one of an engine without the shortcut."""
    det, _, rgbs = _clip(3, video=PEOPLE)
    g = np.random.default_rng(0)

    def noisy(rgb: np.ndarray) -> np.ndarray:
        return np.clip(rgb.astype(np.int16) + g.integers(-1, 2, rgb.shape), 0, 255).astype(np.uint8)

    seq = [rgbs[0], rgbs[0], noisy(rgbs[0]), rgbs[1], rgbs[1], noisy(rgbs[1]), rgbs[2], rgbs[2]]
    for pct in (0.0, 50.0):
        fast = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=pct))
        full = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=pct))
        full._idle_frame = lambda img, geo: None
        took: list[bool] = []
        shortcut = fast._idle_frame

        def spy(img, geo, shortcut=shortcut, took=took):
            got = shortcut(img, geo)
            took.append(got is not None)
            return got

        fast._idle_frame = spy
        for i, rgb in enumerate(seq):
            (a, ma), (b, mb) = fast.infer(rgb), full.infer(rgb)
            assert ma == mb and a.to_records(det.class_names) == b.to_records(det.class_names), f"{pct}% frame {i}"
            if i and took[-1]:
                assert fast.delta_network.last_skipped and not fast.delta_network.last_changed
        # frame 0 seeds (no mirror yet); the repeat right after it is idle; at 0% (exact) noise is a change
        assert took[0] is False and took[1] is True and took[3] is False and took[6] is False
        assert took[2] is (pct > 0.0)
