"""The network input's noise floor (delta.inputs.input_delta) on real decoded video: exact at floor 0, holds codec
noise back above 0, and never drops anything (the held-back part is exactly x - x_applied)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deluceva.delta.inputs import input_delta
from deluceva.video import open_source
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]


def _frames(n: int) -> list[torch.Tensor]:
    det = load_model("yolov5n")
    with open_source(str(ROOT / "assets/video/vtest_pets09_s2l1.avi"), max_frames=n) as src:
        hw = det.input_hw("384x224", src.source_hw)
        return [det.preprocess(f.rgb, hw)[0] for f in src]


def test_floor_zero_is_exact_and_floor_holds_back_codec_noise() -> None:
    xs = _frames(12)
    exact, floored = xs[0].clone(), xs[0].clone()
    total_exact = total_floored = 0
    for x in xs[1:]:
        d0 = input_delta(x, exact, 0.0)
        assert torch.equal(exact, x)  # everything applied at floor 0
        assert d0 is not None
        total_exact += d0.active
        before = floored.clone()
        d = input_delta(x, floored, 3 / 255)
        total_floored += 0 if d is None else d.active
        if d is not None:  # forwarded pixels: applied fully; their delta is exactly the accumulated change
            rows = (x - before).permute(0, 2, 3, 1).reshape(-1, 3).index_select(0, d.index)
            assert torch.equal(d.values, rows)
        held = (x - floored).abs().amax(1)
        assert float(held.max()) <= 3 / 255 + 1e-7  # what is held back is below the floor
    assert total_floored < 0.5 * total_exact  # codec noise (1-2 grey levels) is held back


def test_fused_kernel_matches_torch_path(monkeypatch) -> None:
    from deluceva.delta import inputs

    if not inputs.HAVE_NUMBA:
        pytest.skip("numba is not installed: only the torch path exists")
    xs = _frames(6)
    batch = [torch.cat([a, b]) for a, b in zip(xs[:-1], xs[1:], strict=True)]  # N = 2 as well
    for seq in (xs, batch):
        for floor in (0.0, 3 / 255):
            fused, plain = seq[0].clone(), seq[0].clone()
            for x in seq[1:]:
                a = inputs.input_delta(x, fused, floor)
                monkeypatch.setattr(inputs, "HAVE_NUMBA", False)
                b = inputs.input_delta(x, plain, floor)
                monkeypatch.setattr(inputs, "HAVE_NUMBA", True)
                assert (a is None) == (b is None)
                if a is not None:
                    assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values)
                    assert a.values.is_contiguous() and a.shape == b.shape
                assert torch.equal(fused, plain)


def test_typical_change_is_the_sampled_median_of_the_largest_channel_change() -> None:
    import numpy as np

    from deluceva.delta.inputs import InputMirror

    rng = np.random.default_rng(0)
    img = rng.integers(10, 240, (60, 80, 3), dtype=np.uint8)
    mirror = InputMirror(0, 0, (64, 80))
    assert mirror.typical_change(img) is None  # nothing applied yet
    mirror.seeded(img)
    noisy = img.astype(np.int16)
    noisy[..., 1] += 2  # every pixel: largest channel change 2
    noisy[:20] += 50  # a third of the rows: a large change
    assert mirror.typical_change(noisy.astype(np.uint8)) == 2
    assert mirror.typical_change(noisy.astype(np.uint8), step=1) == 2
    assert mirror.typical_change(img) == 0


def test_adaptive_floor_holds_codec_keyframe_noise_and_keeps_exposure_changes() -> None:
    """On the person video every 10th frame is a codec keyframe: it re-quantises every pixel by 1-3 grey levels.
    With the adaptive floor (alone: coherence off) that frame's input floor rises (3 x the median change, 2 levels)
    and far fewer input pixels go through; frames with a median change of 0 keep the base floor; a global brightness
    change (median at or above the base floor) keeps the base floor too."""
    import numpy as np

    from deluceva.engine import Engine, EngineConfig
    from deluceva.video.frame import Frame

    det = load_model("yolov5n")
    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), max_frames=12) as src:
        frames = list(src)
    runs = {}
    for k in (0.0, 3.0):
        eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=0.01,
                                       adaptive_floor=k, coherence=0.0, warmup=False))
        floors, active = [], []
        for f in frames:
            eng.process(f)
            floors.append(eng._input_floor_grey())
            dx = eng.delta_network.last_input_delta
            active.append(0 if dx is None else dx.active)
        runs[k] = (floors, active)
    assert runs[0.0][0][1:] == [3.0] * 11
    assert runs[3.0][0][1:10] == [3.0] * 9 and runs[3.0][0][10] == 6.0
    assert runs[3.0][1][10] < 0.5 * runs[0.0][1][10]  # the keyframe: most of its noise held back
    assert runs[3.0][1][:10] == runs[0.0][1][:10]
    # a global brightness change is signal: the base floor
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=0.01,
                                   warmup=False))
    eng.process(frames[0])
    eng.process(frames[1])
    brighter = np.clip(frames[1].rgb.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    eng.process(Frame(index=2, pts_seconds=0.2, rgb=brighter))
    assert eng._input_floor_grey() == 3.0


def test_a_frame_on_the_dense_engine_is_the_reference_of_the_next_frames_adaptive_floor() -> None:
    """During a stay on ONNX Runtime the network applies nothing, but the next frame's typical change is still
    measured against the frame before (so the guard's activity of a codec keyframe is the same during a stay as in
    delta frames: the person video's keyframes read 0.25 at the base floor against 0.08 adapted, which left them
    unpriced and kept stays on ONNX Runtime). That image is no applied input: `unchanged` is False, and a delta
    update on it drops it."""
    import numpy as np

    from deluceva.delta.inputs import InputMirror
    from deluceva.engine import Engine, EngineConfig

    rng = np.random.default_rng(0)
    img = rng.integers(10, 240, (60, 80, 3), dtype=np.uint8)
    mirror = InputMirror(0, 0, (64, 80))
    mirror.previous(img)
    noisy = img.copy()
    noisy[..., 0] += 2
    assert mirror.typical_change(noisy) == 2 and not mirror.unchanged(img, 3.0)
    mirror.applied(noisy, None)
    assert mirror.image is None
    mirror.seeded(img)
    assert mirror.unchanged(img, 3.0)
    # fit's own resized image is kept, not copied; a stay that measures nothing forgets it and keeps the buffer
    mine = img.copy()
    owned = InputMirror(0, 0, (64, 80))
    owned.previous(mine, owned=True)
    assert owned.image is mine and owned.typical_change(noisy) == 2 and owned.activity(1.0) == 15 / 16  # (pad rows)
    owned.forget()
    assert owned.typical_change(noisy) is None and owned.activity(1.0) is None and owned.image is mine
    owned.seeded(noisy)  # an applied input again, copied into that buffer
    assert owned.image is mine and owned.unchanged(noisy, 3.0) and not owned.unchanged(img, 0.0)

    det = load_model("yolov5n")
    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), max_frames=11) as src:
        frames = list(src)
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=0.01,
                                   warmup=False))
    for f in frames[:10]:
        eng.process(f)
    hw = eng.ensure_prepared(frames[9].rgb.shape[:2])
    before, geo = det.fit(frames[9].rgb, hw)
    eng._track_input(before, geo, "dense")  # frame 9 ran on the dense engine
    keyframe = det.fit(frames[10].rgb, hw)[0]
    assert eng._noise_floor_for(keyframe) == 6.0  # 3 x its median change of 2 levels, as in a delta frame
    # the guard's activity of that frame comes from the same histogram, as guard.activity measures it on the canvas
    from deluceva.plan.guard import activity

    x_before, x_key = det.to_input(before, geo), det.to_input(keyframe, geo)
    for floor in (3.0, 6.0):
        shared, direct = eng._mirror.activity(floor), activity(x_key, x_before, floor * det.input_scale)
        assert shared == pytest.approx(direct, rel=0.15) and direct > 0.05
    eng._track_input(keyframe, geo, "refresh")  # re-seeded: an applied input, no stay's histogram
    assert eng._mirror.activity(3.0) is None


@pytest.mark.parametrize("model", ["yolov5n", "yolox-nano"])
def test_the_input_floor_rises_to_the_input_filters_floor_and_they_hold_nothing(model: str) -> None:
    """YOLOv5n's first conv filters the network input with the relative floor (0.2 x the input's std, ~13 grey
    levels) far above the input floor (3); YOLOX-Nano's first conv filters it behind the Focus stem's slices and
    concat, which only move whole pixels. The input delta takes that filter's floor, so a change under it waits in
    the input (x - applied) and the filter forwards every position it receives, holding none. (Coherence off:
    every pixel over the floor goes in.)"""
    from deluceva.engine import Engine, EngineConfig

    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), max_frames=40) as src:
        frames = list(src)
    det = load_model(model)
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=0.01,
                                   relative_floor=0.2, coherence=0.0, warmup=False))
    eng.process(frames[0])
    net = eng.delta_network
    (filt,) = net._input_filters
    assert filt is net._filters[0]  # the first conv's
    forwarded = 0
    for f in frames[1:]:
        x_before = net._x.clone()
        eng.process(f)
        floor = net.input_floor
        assert floor == max(net.config.input_floor, filt.floor) and floor > 2 * net.config.input_floor
        dx = net.last_input_delta
        if dx is None:
            continue
        assert float(dx.values.abs().amax(1).min()) > floor  # only changes above the filter's floor go in
        assert filt.candidates == filt.forwarded  # and the filter forwards all of them
        forwarded += dx.active
        # nothing dropped: the applied input moved by exactly the forwarded deltas
        moved = (net._x - x_before).permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.equal(moved.index_select(0, dx.index), dx.values)
        assert int(moved.abs().amax(1).gt(0).sum()) == dx.active
    assert forwarded > 0  # the person walks: pixels above the floor went through


def _person_pairs(frames: list[int], size: str = "768x448") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(previous, this) network inputs of YOLOv5n at `size` for the given frame indices of the person video (10
    fps, an H.264 keyframe every 10th frame)."""
    det = load_model("yolov5n")
    first = min(frames) - 1
    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), start=first / 10.0,
                     max_frames=max(frames) - first + 1) as src:
        got = {}
        for f in src:
            hw = det.input_hw(size, src.source_hw)
            got[f.index] = det.preprocess(f.rgb, hw)[0]
    return {k: (got[k - 1], got[k]) for k in frames}


def test_coherence_holds_keyframe_noise_and_forwards_a_walking_person() -> None:
    """Frame 210 of the person video is a codec keyframe: every pixel is requantised (half change by 2+ grey levels),
    nobody moves. Frame 65: a person walks near the camera. With the floor at 10 grey levels, the coherence test
    (8x8 windows, 12 grey levels) keeps under 5% of the keyframe's pixels over the floor and over 90% of the
    walking person's; what waits stays in x - applied, exactly."""
    pairs = _person_pairs([65, 210])
    floor, coherence = 10 / 255, 12 / 255
    kept = {}
    for k, (prev, x) in pairs.items():
        plain = input_delta(x, prev.clone(), floor)
        applied = prev.clone()
        d = input_delta(x, applied, floor, coherence)
        kept[k] = (0 if d is None else d.active) / plain.active
        moved = (applied - prev).permute(0, 2, 3, 1).reshape(-1, 3)
        if d is not None:  # forwarded pixels are applied fully, the others not at all
            assert torch.equal(moved.index_select(0, d.index), d.values)
            assert set(d.index.tolist()) <= set(plain.index.tolist())
        assert int(moved.abs().amax(1).gt(0).sum()) == (0 if d is None else d.active)  # the rest waits in x - applied
    assert kept[210] < 0.05, kept
    assert kept[65] > 0.9, kept


def test_coherent_kernel_matches_the_torch_reference() -> None:
    """The compiled kernel (its cells' sums only in the bands around pixels over the floor) forwards exactly the
    pixels of `coherent_mask` over the floor: real keyframe and walking frames, batch of 2, sizes not multiples of
    the cell, a change in one corner only."""
    from deluceva.delta import inputs

    if not inputs.HAVE_NUMBA:
        pytest.skip("numba is not installed: only the torch path exists")
    pairs = _person_pairs([65, 210], "384x224")
    cases = [(p, x) for p, x in pairs.values()]
    cases.append((torch.cat([pairs[65][0], pairs[210][0]]), torch.cat([pairs[65][1], pairs[210][1]])))
    cases += [(p[..., :221, :381].contiguous(), x[..., :221, :381].contiguous()) for p, x in pairs.values()]
    corner = pairs[210][0].clone()
    corner[..., 200:, 360:] += 0.2  # one coherent patch: the kernel sums the bands around it only
    cases.append((pairs[210][0], corner))
    for prev, x in cases:
        for floor, coherence in ((4 / 255, 6 / 255), (10 / 255, 12 / 255)):
            d = x - prev
            mask = (d.abs().amax(1) > floor) & inputs.coherent_mask(d, coherence)
            got = inputs.input_delta(x, prev.clone(), floor, coherence)
            want = mask.reshape(-1).nonzero().squeeze(1)
            assert torch.equal(got.index if got is not None else want[:0], want)
            if got is not None:
                rows = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1]).index_select(0, want)
                assert torch.equal(got.values, rows)
    assert int(mask.sum()) == 24 * 24  # the corner case: its patch, all of it


def test_coherence_is_off_when_exact() -> None:
    """--filter 0 forwards every change of a keyframe whatever the coherence (the network's applied input is the
    frame's); a coherence outside [0, 256) grey levels is refused."""
    from deluceva.engine import Engine, EngineConfig
    from deluceva.errors import DelucevaError

    with pytest.raises(DelucevaError, match="--coherence"):
        EngineConfig(mode="delta", coherence=-1.0)
    det = load_model("yolov5n")
    eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", coherence=50.0,
                                   warmup=False))
    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), start=20.9, max_frames=2) as src:
        frames = list(src)
    assert [f.index for f in frames] == [209, 210]
    for f in frames:
        eng.process(f)
    net = eng.delta_network
    assert net.config.input_coherence == 0.0 and not net.last_dense
    x = det.preprocess(frames[1].rgb, det.input_hw("384x224", frames[1].rgb.shape[:2]))[0]
    assert torch.equal(net._x, x) and net.last_input_delta.active > 1000


def test_idle_frames_after_a_keyframe_with_coherence_are_truly_idle(monkeypatch) -> None:
    """After a keyframe, its requantisation noise over the floor waits in the input (incoherent): the uint8 mirror
    still finds the next unchanged frames idle (no float input built), and on each such frame the float input
    delta would indeed forward nothing."""
    from deluceva.engine import Engine, EngineConfig

    det = load_model("yolov5n")
    built = []
    to_input = det.to_input
    monkeypatch.setattr(det, "to_input", lambda *a: built.append(1) or to_input(*a))
    eng = Engine(det, EngineConfig(mode="delta", imgsz="768x448", threads=1, plan="delta", filter_pct=0.01,
                                   relative_floor=0.2, warmup=False))
    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), start=20.5, max_frames=12) as src:
        frames = list(src)
    assert frames[5].index == 210
    idle_after_keyframe = 0
    for f in frames:
        built.clear()
        eng.process(f)
        if not built:  # the mirror found the frame idle
            net = eng.delta_network
            x = det.preprocess(f.rgb, det.input_hw("768x448", f.rgb.shape[:2]))[0]
            assert input_delta(x, net._x.clone(), net.input_floor, net.config.input_coherence) is None
            idle_after_keyframe += f.index > 210
    assert idle_after_keyframe >= 2


def test_coherence_is_off_under_a_low_input_floor() -> None:
    """With a relative floor of 0.05 the input floor stays ~3-4 grey levels: coherence 12 does not apply there
    (most pixels would be held and tested again every frame), so the keyframe's input delta is the plain one at
    its floor. With 0.2 the input floor rises to the first filter's ~13 levels (YOLOX-Nano's behind its Focus
    slices) and coherence holds part of the keyframe's requantisation noise."""
    from deluceva.delta.inputs import effective_coherence
    from deluceva.engine import Engine, EngineConfig

    with open_source(str(ROOT / "assets/video/one-by-one-person-detection.mp4"), start=20.9, max_frames=2) as src:
        frames = list(src)
    for model, relative, applies in (("yolov5n", 0.05, False), ("yolox-nano", 0.05, False), ("yolov5n", 0.2, True),
                                     ("yolox-nano", 0.2, True)):
        det = load_model(model)
        eng = Engine(det, EngineConfig(mode="delta", imgsz="384x224", threads=1, plan="delta", filter_pct=0.01,
                                       relative_floor=relative, warmup=False))
        eng.process(frames[0])
        net = eng.delta_network
        applied = net._x.clone()
        eng.process(frames[1])
        floor, coherence = net.input_floor, net.config.input_coherence
        assert coherence > 0.0 and (effective_coherence(floor, coherence) > 0.0) == applies
        x = det.preprocess(frames[1].rgb, det.input_hw("384x224", frames[1].rgb.shape[:2]))[0]
        plain = input_delta(x, applied.clone(), floor)
        got = net.last_input_delta
        if applies:
            assert got is None or got.active < plain.active
        else:
            assert got is not None and torch.equal(got.index, plain.index)
