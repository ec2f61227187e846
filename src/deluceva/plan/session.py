"""End-to-end helpers behind the CLI: profile a zoo model on a real clip, find this machine's profile, resolve a
`--plan` option into something `apply_plan` takes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deluceva.errors import DelucevaError
from deluceva.plan.planner import PlanSet, apply_plan, make_planset
from deluceva.plan.profiler import MODES, PCTS, profile_network
from deluceva.plan.store import Profile, ProfileKey, default_profile_path, stale_reasons
from deluceva.threads import use_threads

DEFAULT_VIDEO = Path("assets/video/one-by-one-person-detection.mp4")


SWING_GAIN = 1.06  # the profile's synthetic exposure swing: every pixel 6% brighter (real auto-exposure steps
# on car-detection.mp4 move the mean by ~2-7% per frame)


def decode_frames(detector: Any, hw: tuple[int, int], video: Path, n: int, with_swing: bool = False
                  ) -> list[torch.Tensor]:
    """The first `n` frames of `video`, pre-processed for `detector` at input size hw: float32 (1, 3, h, w) each.
    with_swing: append one more tensor, the last frame with its RGB brightened by SWING_GAIN (`swing_frame`)."""
    from deluceva.video import open_source

    frames, last = [], None
    with open_source(str(video), max_frames=n) as src:
        for f in src:
            frames.append(detector.preprocess(f.rgb, hw)[0])
            last = f.rgb
    if len(frames) < 2:
        raise DelucevaError(f"profiling needs at least 2 frames, {video} gave {len(frames)}")
    if with_swing:
        frames.append(swing_frame(detector, last, hw))
    return frames


def swing_frame(detector: Any, rgb: np.ndarray, hw: tuple[int, int], gain: float = SWING_GAIN) -> torch.Tensor:
    """A full-frame exposure change of a real frame: RGB uint8 (H, W, 3) times `gain`, pre-processed at hw."""
    bright = np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return detector.preprocess(bright, hw)[0]


def profile_model(model: str, imgsz: str | None, threads: int, video: Path = DEFAULT_VIDEO, frames: int = 30,
                  pcts: tuple[float, ...] = PCTS, out: Path | None = None,
                  progress: Callable[[int], Callable[[str], None]] | None = None) -> tuple[Profile, Path]:
    """Load, convert and profile a model; save the profile (default: this machine's cache). Returns it and its path.

    progress(total_steps) -> tick(description): optional progress reporting, one tick per profiled frame.
    """
    from deluceva.convert import convert
    from deluceva.dense import make_dense
    from deluceva.engine import EngineConfig
    from deluceva.seeding import make_seeder
    from deluceva.zoo.registry import load_model

    use_threads(threads)
    det = load_model(model)
    src_hw = _video_hw(video)
    hw = det.input_hw(imgsz, src_hw)
    *xs, swing = decode_frames(det, hw, video, frames, with_swing=True)
    net = convert(det.network, xs[0])
    ort = make_dense(det.network, hw, threads, "onnxruntime")
    key = ProfileKey(det.name, (int(hw[0]), int(hw[1])), threads)
    tick = progress(len(pcts) * len(MODES) * (len(xs) - 1)) if progress else None
    floor = float(EngineConfig().input_noise_floor) * float(getattr(det, "input_scale", 1 / 255))
    prof = profile_network(net, xs, key, pcts, tick, input_floor=floor, swing=swing, dense_run=ort,
                           seeder=make_seeder(net, hw, threads)[0])
    prof.meta.update(video=str(video), swing_gain=SWING_GAIN)
    path = prof.save(out or default_profile_path(key))
    return prof, path


def _video_hw(video: Path) -> tuple[int, int]:
    from deluceva.video import open_source

    with open_source(str(video), max_frames=1) as src:
        return tuple(src.source_hw)  # type: ignore[return-value]


def find_profile(key: ProfileKey, path: Path | None = None) -> tuple[Profile | None, list[str]]:
    """This machine's profile for `key` (or the one at `path`) and the reasons it is stale ([] = usable).
    (None, []) when there is none."""
    p = path or default_profile_path(key)
    if path is None and not p.is_file():
        return None, []
    prof = Profile.load(p)
    return prof, prof.stale_reasons() + key_mismatch(prof.key, key)


def key_mismatch(have: ProfileKey, want: ProfileKey) -> list[str]:
    """[] when a profile/plan made for `have` fits `want` (model, input size, threads), else the difference."""
    if (have.model, tuple(have.hw), have.threads) == (want.model, tuple(want.hw), want.threads):
        return []
    return [f"made for {have.model} {have.hw[1]}x{have.hw[0]} {have.threads} thread(s), not "
            f"{want.model} {want.hw[1]}x{want.hw[0]} {want.threads} thread(s)"]


def resolve_plan(spec: str, key: ProfileKey) -> tuple[PlanSet | str, str]:
    """--plan value -> (PlanSet or a uniform unit mode for apply_plan, a one-line note on what is used).

    'dense' | 'delta': every unit in that mode. 'auto': the plans of this machine's stored profile for the key if
    present and fresh, else the engine's own per-unit 'auto' mode (the note says why, naming a stale profile's
    differences). A path: a plan file (`deluceva plan --save`) or a profile file (plans made from it); a stale or
    mismatched one raises DelucevaError.
    """
    if spec in ("dense", "delta"):
        return spec, f"plan: every unit {spec}"
    if spec == "auto":
        path = default_profile_path(key)
        prof, reasons = find_profile(key)
        if prof is None:
            return "auto", f"plan: no profile at {path}; units pick dense/delta by break-even (engine auto)"
        if reasons:
            return "auto", (f"plan: stale profile {path} NOT used ({'; '.join(reasons)}); re-run `deluceva "
                            "profile`; units pick dense/delta by break-even (engine auto)")
        return make_planset(prof), f"plan: from profile {path}{_no_dense_note(prof)}"
    path = Path(spec)
    if not path.is_file():
        raise DelucevaError(f"--plan must be auto, dense, delta or a plan/profile file; no such file: {spec}")
    try:
        kind = json.loads(path.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise DelucevaError(f"not a deluceva plan or profile file: {spec}") from None
    if kind == "deluceva-plan":
        plans = PlanSet.load(path)
        reasons = stale_reasons(plans.stamp) + key_mismatch(plans.key, key)
    else:
        prof, reasons = find_profile(key, path)
        plans = make_planset(prof)  # type: ignore[arg-type]
    if reasons:
        raise DelucevaError(f"stale plan/profile {spec}: {'; '.join(reasons)} (re-run `deluceva profile`)")
    return plans, f"plan: from {spec}"


def _no_dense_note(prof: Profile) -> str:
    if prof.meta.get("dense_engine"):
        return ""
    return " (it has no ONNX Runtime timing: no dense-engine bands nor swing guard; re-run `deluceva profile`)"


def plan_engine(engine: Any, spec: str, source_hw: tuple[int, int]) -> str:
    """Prepare a delta-mode Engine for `source_hw` and apply the --plan `spec` at its filter; returns the note."""
    hw = engine.ensure_prepared(source_hw)
    key = ProfileKey(engine.detector.name, (int(hw[0]), int(hw[1])), int(engine.config.threads))
    plans, note = resolve_plan(spec, key)
    apply_plan(engine.delta_network, plans, engine.config.filter_pct)
    return note
