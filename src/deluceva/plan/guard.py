"""Per-frame guard of a mixed plan: per frame, run the delta network, re-seed it, or run the frame on the dense
engine (ONNX Runtime) — whichever is predicted cheapest over the next frames.

Signals, all cheap: the frame's input activity `a` (fraction of pixels whose max-over-channels change since the
previous frame exceeds the input noise floor; `activity`, ~0.3 ms), the measured times of recent delta frames, of
the dense engine and of seeding frames.

Predicted delta-frame ms = recent measured delta ms (median of the last 3) plus the activity bump
`DeltaCost(a) - DeltaCost(a_recent)` (their median activity; no bump below it). When some of the last 64 delta
frames had about the same activity (within `SIMILAR_ACTIVITY`), the larger of the recent median and theirs instead.
With a relative floor, which the profile was made without, the bump is scaled by the recent ms over
`DeltaCost(a_recent)` (`scale_bump`): the floors filter most of a busy frame's small changes (the person video's
codec keyframes, activity ~0.3 every 10 frames, cost such a delta network little, yet the profile's bump sent each
to the dense engine for 3 frames and a re-seed). Right after a re-seed the base is the first delta frames after
earlier re-seeds instead (a fresh state's measured cost: with a relative floor the profile's is far off, and a
renewal re-seed then sent the guard to the dense engine for 8-32 frames); before any delta frame it is the
profile's `DeltaCost(a)`. The profile's cost rises linearly from its typical activity a0 through the cost it
measured on a synthetic exposure swing (the last profile frame 6% brighter) at that frame's activity. Rules
(`FrameGuard.decide`):

- swing: a frame predicted above `limit` (1.1) x the dense engine runs there ("ort"); one predicted between 1x and
  1.1x does so once the excess paid over the dense engine since the last cheap frames exceeds a re-seed's extra
  cost (ski rental: moving throws the delta state away). The delta state goes stale and the network is refreshed.
  While the scene keeps changing (activity above `calm_activity`: twice the lower quartile of recent delta frames'
  activity, at least 0.1) the guard stays there, so a sustained exposure swing costs dense-engine frames and one
  re-seed when it calms ("reseed": a dense seeding frame, about 2-4x the dense engine), taken only when the saving
  over the next `horizon` frames pays for it.
- backlog: with filtering > 0 the residuals the filters hold back accumulate and delta frames grow more expensive
  over time since the last seed. Renewal rule: when the recent delta ms exceed the mean ms per frame of the
  current cycle (the seeding frame plus the delta frames since) by 10% (timing noise), re-seed on the next calm
  frame (this minimises the long-run mean for costs that grow with time). A calm frame predicted above the dense
  engine also re-seeds when that pays. Re-seeds are never taken on frames that are not calm.
- repeated losses: when the delta network is measured slower than the dense engine within a few frames of a
  re-seed, the cycle is lost: the guard moves to the dense engine and the minimum stay there (after which it probes
  with a re-seed) doubles, up to 256 frames, so content the delta network cannot win on does not thrash.
- early return: a stay on the dense engine (and its back-off, which grows with every lost probe) ends early, at least
  PROBE_STAY frames after it began, when its last EARLY_WINDOW frames, each priced at what delta frames of about its
  activity were measured to cost on this content (`measured_ms`: the median of those among the last 64 delta frames
  within a factor 2 of its activity, at least 3; a calmer frame than any measured at the least busy ones, an upper
  bound; a busier one is not priced and keeps the stay), cost at most EARLY_RATIO x the dense engine on average with a
  re-seed's extra cost spread over `horizon` frames: the frame then re-seeds and probes. Pricing the window, periodic
  codec keyframes included, replaced a calm-activity level (the upper quartile of the delta frames measured under half
  the dense engine): on the person video that level sat at the idle frames' activity (~0.001) while delta frames at
  0.01-0.02 cost 0.3-0.7x ONNX Runtime. A cycle that ends having cost no more than the dense engine over its frames
  resets the back-off; each early return lost in a row doubles the stay before the next (PROBE_STAY up to 8x: on the
  car video the swings' calm gaps priced cheap, and re-seeds there lost). Activity is needed during stays once 3 delta
  frames have been measured and they could price a window under the early-return bar; the engine then reads it off
  its adaptive floor's histogram against the previous frame (otherwise it neither measures a frame nor keeps it:
  YOLOv5n, car video, 2 threads, ~1 ms extra per ONNX Runtime frame).
- probing (`probe`, for plan bands that run on the dense engine although their unit plan is predicted within
  PROBE_RATIO of it: the prediction comes from the profile clip, and calmer content runs the same units much
  faster): after the stay on the dense engine, a calm frame re-seeds and two delta frames are measured (one when
  the first is clearly slower: PROBE_LOSS); a probe whose cycle (re-seed and delta frames until the guard leaves)
  cost more than the dense engine over the same frames multiplies the stay by PROBE_BACKOFF, and by the cycle's cost
  over the dense engine's / PROBE_LOSS_REF when larger (a probe lost by far waits longer: on the pets video each
  YOLOX-Nano probe cost ~2.5x the dense engine's frames), so that exploring costs a few % at most; a won one keeps
  the delta network under the rules above. A frame of the probe's measurement that is not calm and is priced
  above `limit` x the dense engine with the profile's whole bump (unless delta frames of about its activity were
  measured) ends the probe on the dense engine instead: a swing at a probe's second frame ran at 3-4x the dense
  engine (car video) and lost the probe anyway. A probe is skipped (the stay starts again) when PROBE_PRICED or
  more of the first delta frames after the last re-seeds had about the frame's activity and all cost over
  PROBE_LOSS x the dense engine: the content has not changed in a way that could make it win (pets video, 2
  threads: each YOLOX-Nano probe cost 4-6x the dense engine's frames).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

import torch

from deluceva.plan.planner import Plan

DECISIONS = ("delta", "ort", "reseed")
PROBE_RATIO = 1.3  # dense-engine bands whose unit plan is predicted below this x the dense engine's time are probed
PROBE_STAY = 8  # frames on the dense engine before the first probe of such a band
PROBE_LOSS = 1.2  # a probe's first delta frame above this x the dense engine loses it at once
PROBE_BACKOFF = 4  # a lost probe multiplies the stay before the next one by this (8, 32, 128, 256 frames) ...
PROBE_LOSS_REF = 1.5  # ... and by its cycle's cost over the dense engine's / this, when larger (a probe lost by far)
PROBE_PRICED = 2  # a probe is skipped when this many fresh delta frames at about its activity were clear losses
SIMILAR_ACTIVITY = 0.25  # delta frames within this share of a frame's activity (+ 0.02) price it (`delta_ms`)
EARLY_WINDOW = 10  # a stay on the dense engine ends early when its last this many frames, priced as delta frames ...
EARLY_RATIO = 0.8  # ... cost at most this x the dense engine with a re-seed's extra cost spread over `horizon`
PRICED_MIN = 3  # measured delta frames of about an activity needed to price it (`measured_ms`) ...
PRICED_SPAN = 2.0  # ... their activity within this factor of it
# A frame on which at least WIDE_SHARE of the pixels changed by more than WIDE_LEVEL grey levels takes no re-seed:
# an exposure ramp too gentle to pass the input floor (car video, YOLOX-Nano: a re-seed at activity 0.07 in the
# middle of a swing cost 2-3x ONNX Runtime, and its first delta frame lost). The levels of `bench plan`'s swings.
WIDE_LEVEL, WIDE_SHARE = 3.0, 0.3


UNPROFILED_DELTA = 0.5  # an unprofiled network's guessed calm delta frame, x the dense engine (then measured) ...
UNPROFILED_SWING = 2.5  # ... and its guessed frame of activity 1 (the guard prices measured frames by activity)


def unprofiled_plan(pct: float, dense_ms: float) -> Plan:
    """The guard's plan when no profile prices the delta network (none for this model, size and threads, or a
    stale one): a dense-engine band that is always probed (kind "ort", its delta frames guessed at
    UNPROFILED_DELTA x `dense_ms`, the dense engine's ms timed on this machine), so the guard measures the delta
    network on the stream and keeps it where it wins; unit modes stay as they are (engine "auto")."""
    return Plan(float(pct), {}, dense_ms, "ort", delta_ms=UNPROFILED_DELTA * dense_ms,
                swing_ms=UNPROFILED_SWING * dense_ms, activity=0.01, dense_ms=dense_ms)


def activity(x: torch.Tensor, prev: torch.Tensor, floor: float, step: int = 4) -> float:
    """Fraction of pixels (sampled every `step` rows and columns) whose max-over-channels |x - prev| exceeds
    `floor` (network input units). x, prev: (N, C, H, W) of the same shape; vectorised. It runs on every frame of a
    units band, ORT frames included: ~0.25 ms at 768x448 with step 4 (0.57 ms with step 2; 0.8 ms inside the
    engine, YOLOX-Nano 416, a third of the mixed engine's extra time on an ONNX Runtime frame); the 12k-20k pixels
    sampled estimate the fraction within ~0.5%."""
    return change_shares(x, prev, (floor,), step)[0]


def change_shares(x: torch.Tensor, prev: torch.Tensor, levels: tuple[float, ...], step: int = 4) -> list[float]:
    """`activity` at each of `levels` (network input units) from one pass over the sampled pixels."""
    d = (x[..., ::step, ::step] - prev[..., ::step, ::step]).abs().amax(1)
    return [float((d > level).float().mean()) for level in levels]


def _near(frames: deque, a: float) -> list[float]:
    """The ms of the (ms, activity) frames whose activity is within a factor PRICED_SPAN of `a` (+ 0.001)."""
    lo, hi = a / PRICED_SPAN - 0.001, a * PRICED_SPAN + 0.001
    return [ms for ms, x in frames if lo <= x <= hi]


def _padded_median(measured: deque, initial: float, n: int = 3) -> float:
    """Median of the measured values, `initial` standing in for the missing ones up to n."""
    return median([*measured, *[initial] * max(0, n - len(measured))])


@dataclass
class DeltaCost:
    """Predicted ms of one delta frame as a function of input activity: `calm_ms` up to activity `a0` (the profile
    clip's mean), through `swing_ms` at `a_swing` (the profile's exposure-swing frame), linear (extrapolated up to
    a = 1) in between and beyond."""

    calm_ms: float
    swing_ms: float
    a0: float
    a_swing: float = 1.0

    def __call__(self, a: float) -> float:
        if a <= self.a0 or self.a_swing <= self.a0:
            return self.calm_ms
        s = (min(a, 1.0) - self.a0) / (self.a_swing - self.a0)
        return self.calm_ms + s * max(0.0, self.swing_ms - self.calm_ms)

    def scaled(self, k: float) -> DeltaCost:
        """The same model with times multiplied by k (e.g. this machine's load vs the profile's)."""
        return DeltaCost(self.calm_ms * k, self.swing_ms * k, self.a0, self.a_swing)


@dataclass
class FrameGuard:
    """Per-frame choice between the delta network, a re-seed and the dense engine (see module docs).

    cost: profile prediction of delta-frame ms by activity; ort_ms / seed_ms: initial dense-engine and seeding-frame
    ms, then running medians of measured times. limit: a frame predicted above limit x the dense engine's ms runs
    there; between 1x and limit x it stays on the delta network until the excess paid over the dense engine
    reaches a re-seed's extra cost (ski rental: leaving throws the state away). horizon: frames over which a
    re-seed must pay for itself. min_stay: initial minimum number of frames on the dense engine after moving there.
    calm_floor: frames up to this activity always count as calm (people moving close to the camera are not a
    swing). renew: apply the renewal rule (re-seed when the backlog makes it pay). scale_bump: the profile is known
    to overprice delta frames (a relative floor it was made without): its activity bump is scaled by the recent
    frames' ms over its prediction for them.
    """

    cost: DeltaCost
    ort_ms: float
    seed_ms: float
    limit: float = 1.1
    horizon: int = 10
    min_stay: int = 2
    min_cycle: int = 4
    calm_floor: float = 0.1
    renew: bool = True
    probe: bool = False
    scale_bump: bool = False
    state: str = "delta"
    stay: int = 0
    backoff: int = 0
    _reseed_next: bool = False
    _lost: bool = False
    _probing: bool = False
    _probe_lost: bool = False
    _stayed: int = 0  # frames on the dense engine since the current stay began
    # the frames of a stay on the dense engine, priced as delta frames (`measured_ms`, None: not priced): the delta
    # frames that price them do not change during a stay, so each is priced once, as it enters
    _window: deque = field(default_factory=lambda: deque(maxlen=EARLY_WINDOW))
    _early: bool = False  # the current cycle began with an early return
    _early_losses: int = 0  # early returns lost in a row (each doubles the stay before the next, up to 8x)
    _excess: float = 0.0
    _last_a: float = 0.0
    _cycle_ms: float = 0.0
    _cycle_n: int = 0
    _ort: deque = field(default_factory=lambda: deque(maxlen=15))
    _seed: deque = field(default_factory=lambda: deque(maxlen=5))
    _recent: deque = field(default_factory=lambda: deque(maxlen=3))
    _fresh: deque = field(default_factory=lambda: deque(maxlen=3))  # (ms, a) of delta frames right after re-seeds
    _seen: deque = field(default_factory=lambda: deque(maxlen=64))  # (ms, a) of the last delta frames
    _seen_floor: float = 0.0  # no price `measured_ms` gives is lower (their second least ms: see _may_end_early)
    _acts: deque = field(default_factory=lambda: deque(maxlen=101))

    def __post_init__(self) -> None:
        self.backoff = self.backoff or self.min_stay

    # -- estimates ---------------------------------------------------------------------------------------------
    @property
    def ort(self) -> float:
        """The dense engine's ms: the median of its measured frames, with the initial estimate filling in for the
        first 3 (a spike in one of the first two is not the estimate: YOLOv5n, car video, 2 threads, one 56 ms
        frame among 25-31 ms ones priced the dense engine at 44 ms for the next 50 delta frames)."""
        return _padded_median(self._ort, self.ort_ms)

    @property
    def seed(self) -> float:
        """A seeding frame's ms, likewise (the stream's first seed also measures the filters' scales)."""
        return _padded_median(self._seed, self.seed_ms)

    @property
    def calm_activity(self) -> float:
        """Activity up to which a frame counts as calm: twice the lower quartile of the last 101 delta frames'
        activity (at least that + 0.03, and at least `calm_floor`; the profile's activity until delta frames have
        been seen). The quartile stays at the scene's calm level through swings shorter than ~75 frames."""
        acts = sorted(self._acts)
        ref = acts[len(acts) // 4] if acts else self.cost.a0
        return max(2.0 * ref, ref + 0.03, self.calm_floor)

    def delta_ms(self, a: float, scale_bump: bool | None = None) -> float:
        """Predicted ms of a delta frame of activity `a` from the current state: the recent delta frames' median ms
        plus the profile's extra cost of `a` over their median activity (none when `a` is lower; with `scale_bump`
        times their ms over the profile's for them, when below 1); when some of the last 64 delta frames had about
        this activity, the larger of that median and theirs instead. Right after a
        re-seed (no delta frame since), the same from the first delta frames after earlier re-seeds (a fresh
        state's cost: the profile's may be far off, e.g. with a relative floor), else the profile's. scale_bump:
        overrides `self.scale_bump` (False: the profile's whole bump, an upper bound)."""
        frames = self._recent or self._fresh
        if not frames:
            return self.cost(a)
        base = median(ms for ms, _ in frames)
        near = [ms for ms, x in self._seen if abs(x - a) <= SIMILAR_ACTIVITY * a + 0.02]
        if near:  # delta frames of about this activity were measured: they, not the profile, price the bump
            return max(base, median(near))
        ref = self.cost(median(x for _, x in frames))
        bump = max(0.0, self.cost(a) - ref)
        scale = self.scale_bump if scale_bump is None else scale_bump
        if scale and ref > 0.0:  # the profile overprices these frames: its bump too, by as much
            bump *= min(1.0, base / ref)
        return base + bump

    def predict(self, decision: str, a: float | None) -> float:
        """Predicted ms of this frame run as `decision`."""
        if decision == "delta":
            return self.delta_ms(self.cost.a0 if a is None else a)
        return self.ort if decision == "ort" else self.seed

    def reseed_pays(self, a: float) -> bool:
        """Whether a re-seed pays now: fresh delta frames (the profile's calm cost) save more than the seed's extra
        cost over the dense engine within `horizon` frames."""
        return (self.ort - self.cost(a)) * self.horizon > self.seed - self.ort

    # -- decisions ---------------------------------------------------------------------------------------------
    def measured_ms(self, a: float) -> float | None:
        """This content's price of a delta frame of activity `a`: the median ms of the last 64 delta frames whose
        activity was within a factor PRICED_SPAN of `a` (+ 0.001), when there are PRICED_MIN of them; else, for a
        calmer frame than those, the median of the PRICED_MIN least busy ones busier than it (an upper bound: a
        delta frame's cost grows with activity); else None."""
        near = _near(self._seen, a)
        if len(near) < PRICED_MIN:
            near = [ms for _, ms in sorted((x, ms) for ms, x in self._seen if x > a)[:PRICED_MIN]]
        return median(near) if len(near) >= PRICED_MIN else None

    def needs_activity(self) -> bool:
        """Whether `decide` reads this frame's activity: not during a stay on the dense engine that cannot end
        early (`_may_end_early`; the caller may then skip measuring it and keeping the frame to compare the next
        with: ~0.5 ms of an ONNX Runtime frame's extra ~1 ms)."""
        return not (self.state == "ort" and self.stay > 0) or self._may_end_early()

    def _may_end_early(self) -> bool:
        """Whether some window of frames could end the current stay early: PRICED_MIN delta frames were measured
        and the least price `measured_ms` can give, with a re-seed's extra cost spread over `horizon` frames, is
        within EARLY_RATIO x the dense engine. A price is the median of PRICED_MIN or more measured frames, so never
        below the ((PRICED_MIN + 1) // 2)-th least of all (the second: one cheap frame, e.g. the first after the
        stream's first seed on the car video, prices nothing alone). When not, the window is emptied: it holds
        consecutive frames only."""
        if len(self._seen) >= PRICED_MIN and self._seen_floor <= self._early_bar():
            return True
        self._window.clear()
        return False

    def _early_bar(self) -> float:
        """The most a window's frames, priced as delta frames, may cost on average for a stay to end early:
        EARLY_RATIO x the dense engine, less a re-seed's extra cost spread over `horizon` frames."""
        ort = self.ort
        return EARLY_RATIO * ort - max(0.0, self.seed - ort) / self.horizon

    def decide(self, a: float | None, wide: float | None = None) -> str:
        """'delta' | 'ort' | 'reseed' for a frame of input activity `a` (the caller runs it and calls observe);
        `a` may be None when `needs_activity()` is False. wide: the share of the image's pixels that changed by more
        than WIDE_LEVEL grey levels (None: not measured); from WIDE_SHARE on, the frame takes no re-seed (no probe,
        early return, renewal or recovery re-seed: an exposure ramp under the input floor)."""
        ramp = wide is not None and wide >= WIDE_SHARE
        if self.state == "ort":
            self._stayed += 1
            early = a is not None and self._may_end_early() and self._ends_early(a)  # adds a to the window
            if early and not ramp and (self.stay > 0 or a <= self.calm_activity):
                self.stay = 0
                self._early = True
                return self._probe_now()  # judged like a probe: two delta frames, back with the back-off if lost
        if self.state == "ort" and self.stay > 0:
            self.stay -= 1
            return "ort"
        if a is None:
            raise ValueError("FrameGuard.decide: this frame's activity is needed")
        calm = a <= self.calm_activity
        seedable = calm and not ramp  # a re-seed's frame: calm, and no exposure ramp under the floor going on
        if self.state == "delta":
            probe_measures = self._probing and len(self._recent) < 2
            if probe_measures and not calm and self.delta_ms(a, scale_bump=False) > self.limit * self.ort:
                # a probe's frame that is no calm frame and, unless delta frames of about its activity were
                # measured, is priced as a swing by the profile's whole bump: the probe is over (a swing frame
                # measures nothing about the calm content it probes, and would run at 3-4x the dense engine)
                self._probing = False
                self._to_ort(self.min_stay)
                return "ort"
            if probe_measures or (not self._recent and calm):  # a probe, or a re-seed,
                # measures before it judges (leaving at once would throw the re-seed away unmeasured)
                self._acts.append(a)
                self._last_a = a
                return "delta"
            pred = self.delta_ms(a)
            if self._probe_lost:  # a probe measured the delta network slower: back to the dense engine now
                self._probe_lost = False
                self._to_ort(self.min_stay)
                return "ort"
            over = pred > self.limit * self.ort  # never run a frame above the limit on the delta network
            rent = pred > self.ort and self._excess + pred - self.ort > self.seed - self.ort  # ski rental
            if over or rent:
                if seedable and not self._lost and self._cycle_n > self.min_cycle and self.reseed_pays(a):  # backlog
                    # (not in a cycle's first frames: with a profile that underprices this content, each re-seed's
                    # first delta frame re-seeded again)
                    return self._reseed()
                self._to_ort(self.min_stay)  # swing, or this cycle lost from its start: probe again later
                return "ort"
            if self._reseed_next and seedable:
                return self._reseed()
            self._acts.append(a)
            self._last_a = a
            return "delta"
        if seedable and self.probe:
            if self._priced_lost(a):  # this content was measured a clear loss at about this activity: wait again
                self._to_ort(self.min_stay)
                return "ort"
            return self._probe_now()
        if seedable and self.reseed_pays(a):
            return self._reseed()
        return "ort"

    def _priced_lost(self, a: float) -> bool:
        """Whether a probe at activity `a` would be lost for sure: at least PROBE_PRICED of the first delta frames
        after the last re-seeds (a fresh state, the delta network's cheapest) had an activity within a factor
        PRICED_SPAN of it (+ 0.001), and all cost over PROBE_LOSS x the dense engine (one could be a one-off: the
        stream's first seed allocates the state)."""
        near = _near(self._fresh, a)
        return len(near) >= PROBE_PRICED and min(near) > PROBE_LOSS * self.ort

    def _ends_early(self, a: float) -> bool:
        """Whether this frame (activity `a`, added to the window of frames on the dense engine) ends the time there
        (module docs: early return): at least PROBE_STAY frames there (doubled per early return lost in a row, up to
        8x), and the window's last EARLY_WINDOW frames, priced as delta frames (`measured_ms`), cost at most
        EARLY_RATIO x the dense engine with a re-seed's extra cost spread over `horizon` frames."""
        self._window.append(self.measured_ms(a))
        if self._stayed < PROBE_STAY << min(self._early_losses, 3) or len(self._window) < EARLY_WINDOW:
            return False
        priced = self._window
        if None in priced:
            return False
        return sum(priced) / len(priced) <= self._early_bar()

    def enter_dense_band(self, probe: bool, stay: int = PROBE_STAY) -> None:
        """The running plan band changed to one on the dense engine: stay there (the back-off, at least `stay`
        frames), probing the delta network afterwards when `probe`."""
        self.probe = probe
        self.backoff = max(self.backoff, stay)
        self._to_ort(stay)

    def start_probe(self) -> str:
        """Probe the delta network from this frame on ('reseed', then judged like any probe): for a stream's first
        frame in a band probed at once. It has no activity to judge it by, but a stream seeds once anyway, and
        seeding its first frame rather than a later calm one (its third, after the minimum stay) costs the same on
        content the delta network loses and saves those frames' dense-engine runs where it wins."""
        return self._probe_now()

    def leave_dense_band(self) -> None:
        """The running band changed to a unit plan: back to the delta network (the stale state re-seeds)."""
        self.probe, self.state, self.stay = False, "delta", 0

    def observe(self, decision: str, ms: float) -> None:
        """Feed back the measured network ms of a frame run as `decision` (a delta network call that ran dense,
        e.g. its first frame, is a 'reseed')."""
        if decision == "ort":
            self._ort.append(ms)
        elif decision == "reseed":
            self._seed.append(ms)
            self.state, self._reseed_next = "delta", False
            self._cycle_ms, self._cycle_n, self._lost, self._excess = ms, 1, False, 0.0
            self._recent.clear()
        elif decision == "delta":
            self._recent.append((ms, self._last_a))
            self._seen.append((ms, self._last_a))
            if len(self._seen) >= PRICED_MIN:
                self._seen_floor = sorted(m for m, _ in self._seen)[(PRICED_MIN - 1) // 2]
            if self._cycle_n == 1:  # the first delta frame after a re-seed
                self._fresh.append((ms, self._last_a))
            self._cycle_ms += ms
            self._cycle_n += 1
            self._excess = max(0.0, self._excess + ms - self.ort)
            recent = median(m for m, _ in self._recent)
            if self.renew and self._cycle_n > self.min_cycle and recent > 1.1 * self._cycle_ms / self._cycle_n:
                self._reseed_next = True
            if self._probing:
                slow = len(self._recent) >= 2 and min(m for m, _ in self._recent) > self.ort
                if slow or ms > PROBE_LOSS * self.ort:
                    self._lost = self._probe_lost = True
                self._probing = not self._lost and len(self._recent) < 2
            elif len(self._recent) >= 2 and min(m for m, _ in self._recent) > self.ort and self._cycle_n <= 8 \
                    and not self._lost:
                self.backoff, self._lost = min(self.backoff * 2, 256), True  # lost right after a re-seed
            elif self._cycle_n > 30:
                self.backoff = self.min_stay

    def _probe_now(self) -> str:
        """Re-seed and measure the delta network as a probe (see `observe`)."""
        self._probing = True
        return self._reseed()

    def _reseed(self) -> str:
        self.state = "delta"
        return "reseed"

    def _to_ort(self, stay: int) -> None:
        if self.state == "delta":
            won = self._cycle_n > 1 and self._cycle_ms <= self._cycle_n * self.ort
            self._early_losses = 0 if won else self._early_losses + self._early
            self._early = False
            if won:
                self.backoff = self.min_stay  # this cycle won: the delta network pays on this content
            elif self.probe and self._cycle_n and self._cycle_ms > self._cycle_n * self.ort:
                # this probe's cycle cost more than dense: the more so, the longer until the next
                loss = self._cycle_ms / (self._cycle_n * self.ort)
                self.backoff = min(int(self.backoff * PROBE_BACKOFF * max(1.0, loss / PROBE_LOSS_REF)), 256)
            elif self._cycle_n and not self._lost and self._cycle_n <= 8:
                self.backoff = min(self.backoff * 2, 256)  # a short cycle lost: return (re-seed) less often
        self.state, self.stay = "ort", max(stay, self.backoff)
        self._stayed = 0
        self._window.clear()
