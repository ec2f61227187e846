"""The engine: runs a detector over a stream of frames, densely or as a delta network, and owns its state.

Per frame it pre-processes, runs the network (dense executor, or the converted delta network), post-processes, and
returns the DESIGN.md record: {frame, pts, mode, filter_pct, ms, detections}.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from deluceva.control import ErrorProbe, PIController
from deluceva.delta.inputs import InputMirror, effective_coherence
from deluceva.delta.pixels import PixelDelta
from deluceva.dense import DenseRun, make_dense, resolve_dense_engine
from deluceva.errors import DelucevaError
from deluceva.plan import apply_plan
from deluceva.threads import single_threaded, use_threads
from deluceva.zoo.base import Detections, Detector, Geometry

Mode = Literal["dense", "delta"]
FILTER_OF = ("changes", "positions")


class FrameLike(Protocol):
    index: int
    pts_seconds: float
    rgb: np.ndarray


@dataclass
class EngineConfig:
    """mode: dense or delta; imgsz: None (model's native), N, 'WxH' or 'native' (the video's own size);
    filter_pct: the delta network's target filtering percentage (0 = exact); refresh_every: in delta mode, run a
    dense frame every N frames to re-seed the state (None = never); dense_engine: auto|onnxruntime|torch-cl|torch.
    input_noise_floor: with filter_pct > 0, input changes up to this many grey levels (codec noise) wait until they
    accumulate beyond it (converted with the detector's input_scale); adaptive_floor: with filter_pct > 0, a frame
    whose typical pixel changed by at least 1 but under input_noise_floor grey levels against the input the network
    applied (the median, sampled) is codec noise, and its input floor is adaptive_floor x that median when higher
    (a codec keyframe re-quantises every pixel by 1-3 levels: on the person video 30% of the input pixels passed a
    3-level floor at each keyframe); a larger median is a global change (exposure) and keeps the base floor; 0: off.
    relative_floor: with filter_pct > 0, every filter also holds back changes up to this fraction of its input's
    std. coherence: with filter_pct > 0, an input pixel over the floor also waits unless it lies in a window of 8 x 8
    pixels whose mean change exceeds this many grey levels in some channel (`delta.inputs.coherent_mask`: a codec
    keyframe's requantisation noise averages out over such a window, a moving object's change does not), where the
    network's input floor is at least 3/4 of it (`delta.inputs.effective_coherence`: YOLOv5n with a relative floor,
    whose first conv raises the input floor to ~13 grey levels; not YOLOX-Nano's 3-6); 0: off.
    At filter_pct = 0 all floors are off (exact).
    filter_of: what filter_pct is a percentage of: "changes" (each filter's changed positions) or "positions" (all
    its positions: at most (100 - filter_pct)% forwarded, every change while fewer changed; FilterConfig.percent_of).
    plan: delta mode's physical plan, auto | dense | delta | plan/profile file (see deluceva.plan).
    dense_seed: in delta mode, seeding frames (the first, re-seeds) take the units' full values from one ONNX Runtime
    run of the network with its intermediate tensors exported (deluceva.seeding) when the dense engine is ONNX
    Runtime; off: the units compute them in PyTorch.
    error_target: delta mode, error control (deluceva.control): every `probe_every`-th delta frame also runs dense
    (its dense detections are the frame's result and re-seed the state), and a PI controller moves the filtering
    percentage, starting from filter_pct, so that 1 - AP@0.5 of the delta detections against the dense ones over
    the last probes stays under error_target. None: the percentage stays filter_pct.
    warmup: delta mode, run a short synthetic clip through the converted network once at preparation, so that the
    first real frames do not pay the kernels' first-call loading (deluceva.delta.warmup)."""

    mode: Mode = "dense"
    imgsz: str | int | tuple[int, int] | None = None
    filter_pct: float = 0.0
    threads: int = 1
    dense_engine: str = "auto"
    refresh_every: int | None = None
    input_noise_floor: float = 3.0
    adaptive_floor: float = 3.0
    relative_floor: float = 0.0
    coherence: float = 12.0
    filter_of: str = "changes"
    plan: str = "auto"
    dense_seed: bool = True
    error_target: float | None = None
    probe_every: int = 10
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "delta"):
            raise DelucevaError(f"--mode must be dense or delta, got {self.mode!r}")
        if not 0.0 <= self.filter_pct < 100.0:
            raise DelucevaError(f"--filter must be in [0, 100), got {self.filter_pct}")
        if self.filter_of not in FILTER_OF:
            raise DelucevaError(f"--filter-of must be one of {', '.join(FILTER_OF)}, got {self.filter_of!r}")
        if self.adaptive_floor < 0.0:
            raise DelucevaError(f"adaptive_floor must be >= 0, got {self.adaptive_floor}")
        if self.relative_floor < 0.0:
            raise DelucevaError(f"--relative-floor must be >= 0, got {self.relative_floor}")
        if not 0.0 <= self.coherence < 256.0:
            raise DelucevaError(f"--coherence must be in [0, 256) grey levels, got {self.coherence}")
        if self.threads < 1:
            raise DelucevaError(f"--threads must be >= 1, got {self.threads}")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise DelucevaError(f"--refresh-every must be >= 1, got {self.refresh_every}")
        if self.error_target is not None:
            if self.mode != "delta":
                raise DelucevaError("--error-target needs --mode delta")
            ErrorProbe(self.probe_every)  # validates probe_every
            PIController(self.error_target, self.filter_pct)  # validates the target


# ONNX Runtime's first runs of a new session grow its memory arena and wake its thread pool: YOLOv5n 768x448,
# 2 threads, runs 2-6 cost 35-55 ms against a steady 28 ms, and timed then they priced the dense engine 1.6x high
# for the guard until it had measured dense-engine frames (a stream probed from its first frame has none)
DENSE_WARMUP_RUNS = 10


class Engine:
    """Stateful per-stream runner. `process(frame) -> record`; `reset()` forgets the stream."""

    def __init__(self, detector: Detector, config: EngineConfig | None = None) -> None:
        self.detector = detector
        self.config = config or EngineConfig()
        use_threads(self.config.threads)
        self._input_hw: tuple[int, int] | None = None
        self._dense: dict[tuple[int, int], DenseRun] = {}
        self._delta = None
        self._seeders: dict[tuple[int, int], Any] = {}
        self._plans = None
        self.plan_note = ""
        self._frames_since_dense = 0
        self._stats_frame: int | None = None  # the delta network's frame `last_unit_stats` describes
        self._mirror: InputMirror | None = None  # delta mode: uint8 copy of the network's applied input
        self._frame_floor = self.config.input_noise_floor  # this frame's input floor (grey levels; _noise_floor_for)
        self._content_share = 1.0  # the frame's share of the network input (the rest: letterbox padding)
        self.filter_pct = self.config.filter_pct  # the current target percentage (error control moves it)
        self._probe: ErrorProbe | None = None
        self._controller: PIController | None = None
        if self.config.error_target is not None:
            self._probe = ErrorProbe(self.config.probe_every)
            self._controller = PIController(self.config.error_target, self.config.filter_pct)
        self.last_probe: dict[str, float] | None = None  # the last probe: {error, filter_pct, next_filter_pct}
        self._last_delta_dets: tuple[int, Geometry, Detections] | None = None

    # -- preparation -------------------------------------------------------------------------------------------
    def input_hw_for(self, source_hw: tuple[int, int]) -> tuple[int, int]:
        return self.detector.input_hw(self.config.imgsz, source_hw)

    def prepare(self, source_hw: tuple[int, int]) -> tuple[int, int]:
        """Build the executor for this source size (ONNX export or delta conversion happens here, once)."""
        hw = self.input_hw_for(source_hw)
        if self.config.mode == "dense":
            if hw not in self._dense:
                self._dense[hw] = make_dense(self.detector.network, hw, self.config.threads, self.config.dense_engine)
        elif self._delta is None:
            from deluceva.convert import convert
            from deluceva.plan import ProfileKey
            from deluceva.plan.session import resolve_plan

            self._delta = convert(self.detector.network, torch.zeros(1, 3, *hw), filter_pct=self.config.filter_pct)
            self._plans, self.plan_note = resolve_plan(self.config.plan,
                                                       ProfileKey(self.detector.name, hw, self.config.threads))
            if self.config.filter_of != "changes" and not isinstance(self._plans, str):
                self.plan_note += " (the profile was measured with --filter-of changes: its predictions assume it)"
            if self.config.warmup:
                from deluceva.delta.inputs import warm_up_mirror
                from deluceva.delta.warmup import warm_up

                warm_up(self._delta, (1, 3, *hw))
                warm_up_mirror()
        if self.config.mode == "delta":
            self._prepare_dense_engine(hw)
            self._prepare_seeder(hw)
        self._input_hw = hw
        return hw

    def _prepare_seeder(self, hw: tuple[int, int]) -> None:
        """The ONNX Runtime seeder of the delta network at hw (`EngineConfig.dense_seed`), once per input size; a
        network that does not export seeds itself (noted in `plan_note`)."""
        cfg = self.config
        if hw in self._seeders or not cfg.dense_seed or resolve_dense_engine(cfg.dense_engine) != "onnxruntime":
            return
        from deluceva.seeding import make_seeder

        self._seeders[hw], why = make_seeder(self._delta, hw, cfg.threads)
        if why:
            self.plan_note += f" (seeding in PyTorch: {why})"

    def _prepare_dense_engine(self, hw: tuple[int, int]) -> None:
        """For plans with dense-engine bands or timings: the dense executor at hw (ONNX export, once) and a fresh
        per-frame guard (deluceva.plan.guard). Other plans run every frame on the delta network."""
        from deluceva.plan import PlanSet

        self._guard = None
        self._band: str | None = None  # kind of the last frame's plan band: units | ort | ort-probe
        self._x_prev: torch.Tensor | None = None
        self._dense_ms: float | None = None
        self._unprofiled: Any = None  # the guard's plan when no profile prices the units (`unprofiled_plan`)
        unprofiled = self._plans == "auto" and resolve_dense_engine(self.config.dense_engine) == "onnxruntime"
        if (isinstance(self._plans, PlanSet) and self._plans.uses_dense_engine) or unprofiled:
            if hw not in self._dense:
                self._dense[hw] = make_dense(self.detector.network, hw, self.config.threads, self.config.dense_engine)
            run, x0, ms = self._dense[hw], torch.zeros(1, 3, *hw), []
            for _ in range(DENSE_WARMUP_RUNS):
                run(x0)
            for _ in range(5):  # this machine's dense-engine time now (the profile's may be from a busier moment)
                t0 = time.perf_counter()
                run(x0)
                ms.append((time.perf_counter() - t0) * 1e3)
            self._dense_ms = sorted(ms)[2]
            if unprofiled:
                from deluceva.plan.guard import unprofiled_plan

                self._unprofiled = unprofiled_plan(self.filter_pct, self._dense_ms)
                self.plan_note += (f"; frames guarded against ONNX Runtime timed now ({self._dense_ms:.0f} ms), "
                                   "the delta network probed and measured on the stream")

    def ensure_prepared(self, source_hw: tuple[int, int]) -> tuple[int, int]:
        hw = self.input_hw_for(source_hw)
        if hw != self._input_hw or (self.config.mode == "dense" and hw not in self._dense):
            self.prepare(source_hw)
        return hw

    def reset(self) -> None:
        if self._delta is not None:
            self._delta.reset()
        self._frames_since_dense = 0
        self._mirror = None
        self._last_delta_dets = None
        self._stats_frame = None

    @property
    def last_unit_stats(self) -> list[dict[str, Any]]:
        """Per-unit statistics of the last frame when the delta network ran it (`DeltaNetwork.last_stats`), else
        []. Built on request: building them every frame cost ~1 ms of a 25 ms YOLOv5n frame."""
        net = self._delta
        if net is None or self._stats_frame is None or self._stats_frame != getattr(net, "frames_since_reset", None):
            return []
        return list(getattr(net, "last_stats", []) or [])

    @property
    def delta_network(self):
        return self._delta

    # -- per frame -----------------------------------------------------------------------------------------------
    def _run_delta(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], str]:
        """One frame of delta mode: the plan band for the filter, then (guard) the delta network, a re-seed, or the
        dense engine (the delta state is then refreshed). Sets `last_plan_info` {decision, net_ms, predicted_ms,
        activity, kind}."""
        net = self._delta
        cfg = self.config
        if self._refresh_due():
            net.refresh()
        pct = self.filter_pct
        plan = apply_plan(net, self._plans, pct)  # sets net.filter_pct and the plan band's unit modes
        on = pct > 0.0
        scale = float(getattr(self.detector, "input_scale", 1 / 255))
        floor = self._input_floor_grey() * scale
        net.config.input_floor = floor
        net.config.input_coherence = cfg.coherence * scale if on else 0.0
        net.config.relative_floor = cfg.relative_floor if on else 0.0
        net.config.percent_of = cfg.filter_of
        decision, act, guard = self._guard_decision(plan or self._unprofiled, x, floor)
        if decision != "ort" and plan is not None and plan.kind == "ort":  # probing a dense-engine band's units
            apply_plan(net, dataclasses.replace(plan, kind="units"), pct)
        t0 = time.perf_counter()
        if decision == "ort":
            outs = self._dense[self._input_hw](x)
            net.refresh()  # the delta state goes stale: its next frame re-seeds
            ran = "dense"
        else:
            if decision == "reseed":
                net.refresh()
            seeder = self._seeders.get(self._input_hw)
            with torch.inference_mode():
                out = seeder(x) if seeder is not None and net.needs_seed(x) else net(x)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            ran = "refresh" if net.last_dense else "delta"
            decision = "reseed" if net.last_dense else "delta"
        net_ms = (time.perf_counter() - t0) * 1e3
        self._x_prev = x
        self._frames_since_dense = self._frames_since_dense + 1 if ran == "delta" else 0
        self._stats_frame = getattr(net, "frames_since_reset", None) if ran != "dense" else None
        predicted = None
        if guard is not None:
            predicted = guard.predict(decision, act)
            guard.observe(decision, net_ms)
        elif plan is not None:
            predicted = plan.predicted_ms if decision != "reseed" else plan.seed_ms
        self.last_plan_info = {"decision": decision, "net_ms": net_ms, "predicted_ms": predicted, "activity": act,
                               "kind": None if plan is None else plan.kind}
        return outs, ran

    def _guard_decision(self, plan: Any, x: torch.Tensor, floor: float) -> tuple[str, float | None, Any]:
        """('delta' | 'ort' | 'reseed', input activity or None, the guard or None) for this frame and plan band."""
        from deluceva.plan.guard import PROBE_RATIO, PROBE_STAY, WIDE_LEVEL, DeltaCost, FrameGuard, change_shares

        if plan is None or plan.dense_ms is None or self._input_hw not in self._dense:
            return "delta", None, None
        prev = self._x_prev
        band = plan.kind
        # the profile is made without floors: with a relative floor its delta times are upper bounds, so a band it
        # put on the dense engine is always probed, from the first frames
        floored = self.config.relative_floor > 0.0 and self.filter_pct > 0.0
        if band == "ort" and plan.delta_ms is not None and (floored or plan.delta_ms < PROBE_RATIO * plan.dense_ms):
            band = "ort-probe"  # predicted close to the dense engine on the profile clip: worth probing here
        now = self._dense_ms or float(plan.dense_ms)
        load = min(2.0, max(0.5, now / float(plan.dense_ms)))  # profile times -> this machine's load now
        cost = DeltaCost(float(plan.delta_ms), float(plan.swing_ms or plan.delta_ms), float(plan.activity),
                         float(plan.swing_activity))
        guard = self._guard
        if guard is None:
            guard = self._guard = FrameGuard(cost, now, load * float(plan.seed_ms or 3 * plan.dense_ms))
        guard.cost = cost.scaled(load)  # the running band's prediction (the filter may change between frames)
        guard.scale_bump = floored
        last, self._band = self._band, band
        if band == "ort":  # the whole band runs on the dense engine: no activity needed
            guard.leave_dense_band()  # leaving the band re-seeds (the network was refreshed)
            return "ort", None, guard
        at_once = floored or plan is self._unprofiled  # what a stay would wait for is a guess: probe at once
        if band != last and band == "ort-probe":
            guard.enter_dense_band(probe=True, stay=0 if at_once else PROBE_STAY)
            if at_once and prev is None:  # a stream's first frame: it seeds, as in a units band (see start_probe)
                return guard.start_probe(), None, guard
        elif band != last and last == "ort-probe":
            guard.leave_dense_band()
        wide = None  # share of the image's pixels changed by more than WIDE_LEVEL grey levels (a ramp: no re-seed)
        if prev is None or prev.shape != x.shape:
            act = 1.0
        elif guard.needs_activity():  # during a stay, off the adaptive floor's histogram against the previous frame
            grey = self._input_floor_grey()
            shares = None if self._mirror is None else self._mirror.change_shares((grey, WIDE_LEVEL))
            if shares is None:
                scale = float(getattr(self.detector, "input_scale", 1 / 255))
                with single_threaded():
                    shares = change_shares(x, prev, (floor, WIDE_LEVEL * scale))
            act, wide = shares[0], shares[1] / max(self._content_share, 0.05)  # the share of the image, not canvas
        else:
            act = None  # a stay on the dense engine
        if prev is None and band == "units":
            return "reseed", act, guard
        return guard.decide(act, wide), act, guard

    def share_dense_engine(self, other: Engine) -> None:
        """Run dense frames on `other`'s dense executors (one ONNX Runtime session and thread pool per input size for
        both engines): two sessions' worker threads busy-waiting on the same cores slow each other down."""
        engines = {resolve_dense_engine(e.config.dense_engine) for e in (self, other)}
        if other.config.threads != self.config.threads or len(engines) > 1:
            raise ValueError("share_dense_engine: the engines differ in threads or dense engine")
        self._dense = other._dense

    def infer(self, rgb: np.ndarray) -> tuple[Detections, str]:
        """Detections for one RGB frame and the mode it actually ran in (dense|delta|refresh).

        In delta mode, a frame that changed none of the network's outputs (`DeltaNetwork.last_changed` False: the
        outputs are exactly the previous call's) reuses the previous frame's detections without post-processing."""
        hw = self.ensure_prepared(rgb.shape[:2])
        delta = self.config.mode == "delta"
        with single_threaded():  # small work between runs of the network (deluceva.threads)
            fitted = self.detector.fit(rgb, hw) if delta else None
            self._frame_floor = self.config.input_noise_floor
            if fitted is None:
                x, geo = self.detector.preprocess(rgb, hw)
            else:
                img, geo = fitted
                if not self._dense_stay():  # a frame that stays on the dense engine needs no adaptive floor
                    self._frame_floor = self._noise_floor_for(img)
                idle = self._idle_frame(img, geo)
                if idle is not None:
                    return idle, "delta"
                x = self.detector.to_input(img, geo)
        if not delta:
            outs = self._dense[hw](x)
            with single_threaded():
                return self.detector.postprocess(outs, geo), "dense"
        sh, sw = geo.source_hw
        self._content_share = min(1.0, sh * geo.scale_xy[1] * sw * geo.scale_xy[0] / (hw[0] * hw[1]))
        outs, mode = self._run_delta(x)
        net = self._delta
        probe = self._probe
        probed = None
        if probe is not None and mode == "delta" and probe.due() and not net.last_skipped:
            outs, probed = self._probe_frame(x, outs, geo)
            mode = "refresh"
        elif probe is not None and probe.tick(mode) and self._controller is not None:
            self.filter_pct = self._controller.update(0.0)  # dense-engine frames are exact
        if fitted is not None:
            self._track_input(fitted[0], geo, mode, owned=not np.may_share_memory(fitted[0], rgb))
        frame = getattr(net, "frames_since_reset", None)
        last = self._last_delta_dets  # (network frame, geometry, detections) of the last post-process
        if (mode == "delta" and last is not None and frame is not None and last[0] == frame - 1 and last[1] == geo
                and not getattr(net, "last_changed", True)):
            self._last_delta_dets = (frame, geo, last[2])
            return last[2], mode
        if probed is not None:
            dets = probed
        else:
            with single_threaded():
                dets = self.detector.postprocess(outs, geo)
        self._last_delta_dets = (frame, geo, dets) if mode != "dense" else None
        return dets, mode

    def _dense_stay(self) -> bool:
        """Whether the guard keeps this frame on the dense engine without reading its activity (a stay that cannot
        end early, or a plan band run on the dense engine as a whole, e.g. at 0%): its input floor and change
        histogram are then not needed, nor a copy of the frame to compare the next with (~0.2 ms at 768x448)."""
        if self._band == "ort":
            return True
        guard = self._guard
        return guard is not None and not guard.needs_activity()  # False outside such a stay

    def _refresh_due(self) -> bool:
        """Whether `refresh_every` asks for a dense re-seed at this frame."""
        every = self.config.refresh_every
        return every is not None and self._frames_since_dense >= every

    def _input_floor_grey(self) -> float:
        """The input noise floor in grey levels of this frame at the current percentage (0: exact, every change goes
        through)."""
        return self._frame_floor if self.filter_pct > 0.0 else 0.0

    def _idle_floor_grey(self) -> float:
        """The floor in grey levels under which a pixel's change leaves the network idle: the input floor, or the
        network's input filters' floor when higher (`DeltaNetwork.input_filter_floor`)."""
        floor = self._input_floor_grey()
        if floor <= 0.0:
            return floor
        scale = float(getattr(self.detector, "input_scale", 1 / 255))
        return max(floor, self._delta.input_filter_floor / scale)

    def _noise_floor_for(self, img: np.ndarray) -> float:
        """The input floor in grey levels for the fitted uint8 image `img` (EngineConfig.adaptive_floor): the base
        floor, or adaptive_floor x the typical change when that is codec noise."""
        base, k = self.config.input_noise_floor, self.config.adaptive_floor
        mirror = self._mirror
        if k <= 0.0 or self.filter_pct <= 0.0 or mirror is None:
            return base
        typical = mirror.typical_change(img)
        if typical is None or typical >= base:  # no applied input to compare with, or a global change
            return base
        return max(base, k * typical)

    def _idle_frame(self, img: np.ndarray, geo: Geometry) -> Detections | None:
        """The detections of a delta frame whose fitted uint8 image changes no pixel beyond the input floor against
        the input the network applied (InputMirror), found before the float input is built: the network's idle
        call and the previous detections. None when the frame must run normally (a change, a re-seed due, pending
        filter work, no previous detections for this geometry)."""
        mirror, net = self._mirror, self._delta
        last = self._last_delta_dets
        if (mirror is None or net is None or last is None or last[1] != geo
                or last[0] != net.frames_since_reset  # the last detections are of the network's last frame
                or self._refresh_due()):
            return None
        floor = self._idle_floor_grey()
        # coherence as input_delta tests it, checked only after a frame whose input forwarded nothing (a frame after
        # one with coherent changes is rarely idle, and the check costs 0.3-1 ms where the plain one stops early)
        coherence = effective_coherence(floor, self.config.coherence) if net.last_input_delta is None else 0.0
        if not mirror.unchanged(img, floor, coherence):
            return None
        t0 = time.perf_counter()
        if net.idle_frame() is None:
            return None
        net_ms = (time.perf_counter() - t0) * 1e3
        frame = net.frames_since_reset
        self._frames_since_dense += 1
        if self._probe is not None:
            self._probe.tick("delta")  # an idle frame is not probed: its output is the last one
        self._last_delta_dets = (frame, geo, last[2])
        self._stats_frame = frame
        guard = self._guard
        predicted = None
        if guard is not None:
            predicted = guard.predict("delta", 0.0)
            guard.observe("delta", net_ms)
        self.last_plan_info = {"decision": "delta", "net_ms": net_ms, "predicted_ms": predicted, "activity": 0.0,
                               "kind": self._band}
        return last[2]

    @property
    def errors_measured(self) -> list[float]:
        """The errors of every probe so far (error control; empty without it)."""
        return list(self._probe.errors) if self._probe is not None else []

    def _probe_frame(self, x: torch.Tensor, outs: tuple[torch.Tensor, ...], geo: Geometry
                     ) -> tuple[tuple[torch.Tensor, ...], Detections]:
        """A probed frame: the delta outputs just computed are compared with a dense run of the same frame, which
        re-seeds the state and is the frame's result (its outputs and detections are returned); the controller sets
        the percentage for the next frames."""
        net = self._delta
        with single_threaded():
            delta_dets = self.detector.postprocess(outs, geo)
        net.refresh()
        seeder = self._seeders.get(self._input_hw)
        with torch.inference_mode():
            out = seeder(x) if seeder is not None and net.needs_seed(x) else net(x)
        dense_outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        with single_threaded():
            dense_dets = self.detector.postprocess(dense_outs, geo)
        assert self._probe is not None and self._controller is not None
        error = self._probe.observe(dense_dets, delta_dets)
        used = self.filter_pct
        self.filter_pct = self._controller.update(error)
        self._frames_since_dense = 0
        self.last_probe = {"error": error, "filter_pct": used, "next_filter_pct": self.filter_pct}
        return dense_outs, dense_dets

    def _track_input(self, img: np.ndarray, geo: Geometry, mode: str, owned: bool = False) -> None:
        """Keep the uint8 mirror of the network's applied input in step with the frame just run (`mode`); owned:
        nobody else holds `img` (a resized copy of the caller's frame)."""
        net = self._delta
        mirror = self._mirror
        key = (geo.input_hw, int(geo.pad_xy[1]), int(geo.pad_xy[0]))
        if mirror is None or (mirror.canvas_hw, mirror.top, mirror.left) != key:
            mirror = self._mirror = InputMirror(key[1], key[2], geo.input_hw)
        dx = getattr(net, "last_input_delta", None)
        if mode == "refresh":
            mirror.seeded(img)
        elif mode == "delta" and (dx is None or isinstance(dx, PixelDelta)):
            mirror.applied(img, None if dx is None else dx.index_np)
        elif mode == "dense" and self._dense_stay():  # the next frame stays there unmeasured: no copy (~0.2 ms)
            mirror.forget()
        elif mode == "dense":  # the dense engine ran (the network re-seeds next): the next frame's floor compares
            mirror.previous(img, owned)  # with this one, as a delta frame's does with the applied input (activity)
        else:  # an input delta of another form
            mirror.invalidate()

    def process(self, frame: FrameLike) -> dict[str, Any]:
        self.ensure_prepared(frame.rgb.shape[:2])  # one-off export/conversion is not frame time
        pct = self.filter_pct  # the frame's percentage (a probe may move it for the next frames)
        t0 = time.perf_counter()
        dets, mode = self.infer(frame.rgb)
        ms = (time.perf_counter() - t0) * 1000.0
        return {
            "frame": int(frame.index),
            "pts": round(float(frame.pts_seconds), 6),
            "mode": mode,
            "filter_pct": float(pct) if mode == "delta" else 0.0,
            "ms": round(ms, 3),
            "detections": dets.to_records(self.detector.class_names),
        }
