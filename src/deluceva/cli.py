"""The `deluceva` command line (Typer + Rich)."""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from deluceva.errors import DelucevaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Delta-based neural-network inference for fast video analytics on CPUs.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table and write JSON.")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
out_console = Console() if Console().is_terminal else Console(width=160)  # tables stay readable in logs


def progress_bar(transient: bool = False) -> Progress:
    """A progress bar with count, frames/s and ETA, drawn on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=transient,
    )


@app.command()
def detect(
    source: Annotated[str, typer.Argument(help="Video file, http(s)/rtsp URL, image folder or glob, /dev/videoN")],
    model: Annotated[str, typer.Option(help="Zoo name (see `deluceva models`) or path to .onnx / .cfg")] = "yolox-nano",
    family: Annotated[str | None, typer.Option(help="Pre/post-processing family of an .onnx: yolox|yolov5")] = None,
    names: Annotated[Path | None, typer.Option(help="Class names file, one per line")] = None,
    imgsz: Annotated[str | None, typer.Option(help="N, WxH or 'native' (multiples of 32); default: model's")] = None,
    mode: Annotated[str, typer.Option(help="dense | delta")] = "dense",
    filter_pct: Annotated[float, typer.Option("--filter", help="Delta mode: target filtering percentage 0..100")] = 0.0,
    refresh_every: Annotated[int | None, typer.Option(help="Delta mode: dense re-seed every N frames")] = None,
    error_target: Annotated[float | None, typer.Option(
        help="Delta mode: keep 1 - AP@0.5 against dense under this (e.g. 0.05): dense probes every --probe-every "
             "frames, a PI controller moves the filtering percentage (starting at --filter)")] = None,
    probe_every: Annotated[int, typer.Option(help="With --error-target: probe (also run dense) every N frames")] = 10,
    relative_floor: Annotated[float, typer.Option(
        help="Delta mode, --filter > 0: every filter also holds back changes up to this fraction of its input's "
             "std, measured at the stream's first frame (e.g. --filter 0.01 --relative-floor 0.2, YOLOv5n: mAP "
             "0.99-1.00 at 0.95-1.55x ONNX Runtime on the shipped videos, fastest on calm scenes; profiles and plans "
             "are made without it)")] = 0.0,
    coherence: Annotated[float, typer.Option(
        help="Delta mode, --filter > 0: an input pixel over the floor also waits unless its 8x8 window's mean "
             "change exceeds this many grey levels (codec keyframe noise averages out, moving objects do not; "
             "applies where the input floor is at least 3/4 of it, e.g. with --relative-floor 0.2); "
             "0: off")] = 12.0,
    filter_of: Annotated[str, typer.Option(
        help="Delta mode: --filter is a percentage of each filter's changed positions (changes) or of all its "
             "positions (positions: at most 100 - P % forwarded; profiles and plans are made with changes)")
    ] = "changes",
    fps: Annotated[float | None, typer.Option(help="Sample F frames per second by timestamps")] = None,
    start: Annotated[float, typer.Option(help="Start at this many seconds")] = 0.0,
    max_frames: Annotated[int | None, typer.Option(help="Stop after N processed frames")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for inference")] = 1,
    dense_engine: Annotated[str, typer.Option(help="auto | onnxruntime | torch-cl | torch")] = "auto",
    conf: Annotated[float | None, typer.Option(help="Score threshold (default: the model's)")] = None,
    iou: Annotated[float | None, typer.Option(help="NMS IoU threshold (default: the model's)")] = None,
    out: Annotated[Path | None, typer.Option(help="results.jsonl or results.parquet")] = None,
    video_out: Annotated[Path | None, typer.Option(help="Annotated video, e.g. annotated.mp4")] = None,
    stats: Annotated[Path | None, typer.Option(help="Delta mode: per-unit stats per frame (.parquet/.jsonl)")] = None,
    plan: Annotated[str, typer.Option(help="Delta mode: auto | dense | delta | plan or profile FILE")] = "auto",
) -> None:
    """Detect objects in every (sampled) frame of SOURCE and write per-frame results."""
    from deluceva.engine import Engine, EngineConfig
    from deluceva.sinks import AnnotatedVideoSink, open_sink
    from deluceva.video import open_source
    from deluceva.zoo.registry import load_model

    config = EngineConfig(mode=mode, imgsz=imgsz, filter_pct=filter_pct, threads=threads,  # type: ignore[arg-type]
                          dense_engine=dense_engine, refresh_every=refresh_every, plan=plan,
                          relative_floor=relative_floor, coherence=coherence, filter_of=filter_of,
                          error_target=error_target, probe_every=probe_every)
    if max_frames is not None and max_frames < 1:
        raise DelucevaError(f"--max-frames must be >= 1, got {max_frames}")
    if stats is not None and mode != "delta":
        raise DelucevaError("--stats needs --mode delta")
    detector = load_model(model, family=family, names=names)
    if conf is not None:
        detector.conf_threshold = conf
    if iou is not None:
        detector.iou_threshold = iou
    engine = Engine(detector, config)
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_source(source, fps=fps, start=start, max_frames=max_frames))
        engine.input_hw_for(src.source_hw)  # validates --imgsz before any output is created
        if mode == "delta":
            engine.ensure_prepared(src.source_hw)  # converts and resolves --plan before any output exists
            console.print(engine.plan_note)
        sink = stack.enter_context(open_sink(out)) if out else None
        stats_sink = stack.enter_context(open_sink(stats)) if stats else None
        vsink = None
        if video_out:
            vfps = fps or src.nominal_fps or 10.0
            vsink = stack.enter_context(AnnotatedVideoSink(video_out, fps=vfps, size_hw=src.source_hw,
                                                           names=detector.class_names))
        total = src.estimated_frames
        if max_frames is not None:
            total = min(total, max_frames) if total else max_frames
        with progress_bar() as bar:
            task = bar.add_task(f"{detector.name} {mode}", total=total, rate="")
            for frame in src:
                rec = engine.process(frame)
                records.append(rec)
                if sink:
                    sink.write(rec)
                if stats_sink:
                    for unit in engine.last_unit_stats:
                        stats_sink.write({"frame": rec["frame"], **unit})
                if vsink:
                    vsink.write(frame.rgb, rec["detections"])
                rate = 1000.0 / statistics.fmean(r["ms"] for r in records[-20:])
                shown = f"{rate:5.1f} fps"
                if error_target is not None:  # the controller at work: its percentage and the last probe's error
                    probe = engine.last_probe
                    shown += f"  filter {engine.filter_pct:4.1f}%" + (f"  error {probe['error']:.3f}" if probe else "")
                bar.update(task, advance=1, rate=shown)
    if not records:
        raise DelucevaError(f"no frames were decoded from {source}")
    _print_summary(records, detector.name, out, video_out, engine if error_target is not None else None)


def _print_summary(records: list[dict], model: str, out: Path | None, video_out: Path | None,
                   controlled: Any = None) -> None:
    """The run's table; `controlled`: the engine of an --error-target run (its probes and percentages)."""
    ms = [r["ms"] for r in records]
    n_det = sum(len(r["detections"]) for r in records)
    modes: dict[str, int] = {}
    for r in records:
        modes[r["mode"]] = modes.get(r["mode"], 0) + 1
    t = Table(title=f"deluceva detect — {model}", show_header=False)
    t.add_row("frames", str(len(records)))
    t.add_row("modes", ", ".join(f"{k}: {v}" for k, v in modes.items()))
    t.add_row("ms/frame (median, mean)", f"{statistics.median(ms):.1f}, {statistics.fmean(ms):.1f}")
    t.add_row("detections", str(n_det))
    if controlled is not None:
        errors = controlled.errors_measured
        pcts = [r["filter_pct"] for r in records if r["mode"] == "delta"]
        t.add_row("probes (error: mean, max)", f"{len(errors)}" + (
            f" ({statistics.fmean(errors):.3f}, {max(errors):.3f})" if errors else ""))
        if pcts:
            t.add_row("filter % on delta frames (mean, last)", f"{statistics.fmean(pcts):.1f}, {pcts[-1]:.1f}")
    for label, path in (("results", out), ("annotated video", video_out)):
        if path:
            t.add_row(label, str(path))
    console.print(t)


@app.command()
def profile(
    model: Annotated[str, typer.Option(help="Zoo name or path")] = "yolov5n",
    imgsz: Annotated[str | None, typer.Option(help="N, WxH or native; default the model's")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads")] = 1,
    video: Annotated[Path, typer.Option(help="Real frames come from this video")] = Path(
        "assets/video/one-by-one-person-detection.mp4"),
    frames: Annotated[int, typer.Option(help="Consecutive frames per pass (the first seeds)")] = 30,
    out: Annotated[Path | None, typer.Option(help="Profile JSON (default ~/.cache/deluceva/profiles/...)")] = None,
) -> None:
    """Time every unit densely and as a delta unit at filtering 0..99.5% on real frames; save the profile."""
    from deluceva.plan.session import profile_model

    if frames < 2:
        raise DelucevaError(f"--frames must be >= 2, got {frames}")
    with progress_bar() as bar:
        def start(total: int):  # noqa: ANN202
            task = bar.add_task(f"profile {model}", total=total, rate="")
            return lambda desc: bar.update(task, advance=1, rate=desc)

        prof, path = profile_model(model, imgsz, threads, video, frames, out=out, progress=start)
    t = Table(title=f"deluceva profile — {prof.key.model} {prof.key.hw[1]}x{prof.key.hw[0]}, {threads} thread(s)")
    for col in ("filter %", "all-delta ms/frame", "all-dense ms/frame"):
        t.add_column(col, justify="right")
    for p in prof.pcts:
        k = f"{p:g}"
        t.add_row(k, *(f"{prof.frame_ms.get(m, {}).get(k, float('nan')):.1f}" for m in ("delta", "dense")))
    t.caption = f"saved {path}"
    out_console.print(t)


@app.command("plan")
def plan_cmd(
    model: Annotated[str, typer.Option(help="Zoo name or path")] = "yolov5n",
    imgsz: Annotated[str | None, typer.Option(help="N, WxH or native; default the model's")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads the profile was made with")] = 1,
    filter_pct: Annotated[float, typer.Option("--filter", help="Filtering percentage to plan for")] = 90.0,
    profile_path: Annotated[Path | None, typer.Option("--profile", help="Profile JSON (default: stored)")] = None,
    save: Annotated[Path | None, typer.Option(help="Write the plans for all bands (JSON) for detect --plan")] = None,
) -> None:
    """Print the physical plan: per operator its cost dense and delta at --filter and the choice, with totals."""
    from deluceva.plan import CostModel, ProfileKey, make_plan, make_planset
    from deluceva.plan.report import plan_table
    from deluceva.plan.session import find_profile
    from deluceva.zoo.base import native_input_hw, parse_imgsz
    from deluceva.zoo.registry import ZOO

    if not 0.0 <= filter_pct <= 100.0:
        raise DelucevaError(f"--filter must be in [0, 100], got {filter_pct}")
    if profile_path is not None:
        prof, reasons = find_profile(ProfileKey("", (0, 0), threads), profile_path)
        reasons = prof.stale_reasons() if prof else reasons
    else:
        native = ZOO[model].native_hw if model in ZOO else (640, 640)
        hw = parse_imgsz(imgsz, native)
        hw = native_input_hw(native) if hw == "native" else hw
        prof, reasons = find_profile(ProfileKey(model, hw, threads))  # type: ignore[arg-type]
        if prof is None:
            raise DelucevaError(f"no profile for {model} {hw[1]}x{hw[0]} {threads} thread(s); run `deluceva "
                                f"profile --model {model} --imgsz {hw[1]}x{hw[0]} --threads {threads}`")
    if reasons:
        console.print(f"[yellow]warning: stale profile ({'; '.join(reasons)}); timings may not hold here")
    cost = CostModel(prof)  # type: ignore[arg-type]
    out_console.print(plan_table(cost, make_plan(cost, filter_pct)))
    if save:
        make_planset(prof).save(save)  # type: ignore[arg-type]
        console.print(f"plans saved to {save}")


@app.command()
def models() -> None:
    """List the shipped model zoo: input size, classes, license."""
    from deluceva.zoo.registry import ZOO

    t = Table(title="Deluceva model zoo", caption="AGPL-3.0 models live in the repository's models/ folder, "
              "outside the Python package.")
    for col in ("name", "family", "input WxH", "classes", "license", "available", "description"):
        t.add_column(col, no_wrap=col != "description")
    for e in ZOO.values():
        names = e.path.parent / "coco.names"
        n_cls = str(sum(1 for line in names.read_text().splitlines() if line.strip())) if names.is_file() else "?"
        t.add_row(e.name, e.family, f"{e.native_hw[1]}x{e.native_hw[0]}", n_cls, e.license,
                  "yes" if e.path.is_file() else "no: needs a checkout", e.description)
    out_console.print(t)


@bench_app.command("dense")
def bench_dense(
    models_: Annotated[list[str] | None, typer.Option("--model", help="Zoo models (default: all)")] = None,
    threads: Annotated[list[int] | None, typer.Option("--threads", help="Thread counts (default: 1 2)")] = None,
    sizes: Annotated[list[str] | None, typer.Option("--imgsz", help="Sizes (default: native 768x448)")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per cell (median)")] = 20,
    video: Annotated[Path, typer.Option(help="Frames come from this video")] = Path(
        "assets/video/one-by-one-person-detection.mp4"),
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("bench/results/dense.json"),
) -> None:
    """Dense baselines: our PyTorch paths vs ONNX Runtime vs OpenCV dnn, ms/frame."""
    from deluceva.eval.bench_dense import run_dense_benchmark

    run_dense_benchmark(models_ or None, threads or [1, 2], sizes or ["native", "768x448"], repeats, video, out,
                        out_console, progress_bar)


@bench_app.command("delta")
def bench_delta(
    model: Annotated[str, typer.Option(help="Zoo name or path")] = "yolov5n",
    imgsz: Annotated[str | None, typer.Option(help="N, WxH or native; default the model's")] = "768x448",
    video: Annotated[list[Path] | None, typer.Option(help="Videos (default: the three shipped ones)")] = None,
    frames: Annotated[int, typer.Option(help="Frames per video")] = 300,
    fps: Annotated[float | None, typer.Option(help="Sample rate (default: every frame)")] = None,
    filters: Annotated[str, typer.Option(help="Comma-separated filtering percentages")] = "0,50,90,95",
    threads: Annotated[int, typer.Option(help="CPU threads (dense and delta alike)")] = 1,
    refresh_every: Annotated[int | None, typer.Option(help="Dense re-seed every N frames")] = None,
    dense_engine: Annotated[str, typer.Option(help="Dense baseline engine")] = "auto",
    relative_floor: Annotated[float, typer.Option(help="Delta engine's relative floor (see detect)")] = 0.0,
    error_target: Annotated[float | None, typer.Option(
        help="Delta engine's error target (see detect; --filters are then the starting percentages)")] = None,
    probe_every: Annotated[int, typer.Option(help="With --error-target: probe every N frames")] = 10,
    plan: Annotated[str, typer.Option(help="Delta engine's plan: auto | dense | delta | FILE")] = "auto",
    filter_of: Annotated[str, typer.Option(help="Delta engine's --filter-of: changes | positions (see detect)")
                         ] = "changes",
    out: Annotated[Path, typer.Option(help="JSON output")] = Path("bench/results/delta.json"),
) -> None:
    """End to end: delta engine vs the fastest dense engine, speed-up and mAP@0.5 against dense."""
    from deluceva.eval.bench_delta import run_delta_benchmark

    videos = video or sorted(Path("assets/video").glob("*.mp4")) + sorted(Path("assets/video").glob("*.avi"))
    run_delta_benchmark(model, imgsz, videos, frames, fps, [float(f) for f in filters.split(",")], threads,
                        refresh_every, dense_engine, out, out_console, progress_bar, relative_floor=relative_floor,
                        plan=plan, filter_of=filter_of, error_target=error_target, probe_every=probe_every)


@bench_app.command("plan")
def bench_plan(
    models_: Annotated[list[str] | None, typer.Option("--model", help="Zoo models (default: yolov5n, yolox-nano)")
                       ] = None,
    sizes: Annotated[list[str] | None, typer.Option("--imgsz", help="Sizes (default: 768x448, default = native)")
                     ] = None,
    threads: Annotated[list[int] | None, typer.Option("--threads", help="Thread counts (default: 1 2)")] = None,
    filters: Annotated[str, typer.Option(help="Comma-separated filtering percentages")] = "0,50,75,90,95",
    video: Annotated[list[Path] | None, typer.Option(help="Videos (default: the three shipped ones)")] = None,
    frames: Annotated[int, typer.Option(help="Consecutive frames per video")] = 120,
    start: Annotated[float, typer.Option(help="Start each video at this many seconds")] = 0.0,
    repeats: Annotated[int, typer.Option(help="Runs per cell (per-frame median)")] = 1,
    profile_frames: Annotated[int, typer.Option(help="Frames per profiling pass when a profile is made")] = 30,
    reprofile: Annotated[bool, typer.Option(help="Re-profile even when a fresh profile exists")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON output (default bench/results/plan_<models>.json)")] = None,
    schedule: Annotated[str | None, typer.Option(
        help="frame: engines interleaved frame by frame; block: engines take turns over blocks of 10 frames; "
             "clip: each engine runs the whole clip (default: frame with 1 thread, block with more: another "
             "runtime's spinning threads would slow the engine that follows)"
    )] = None,
    relative_floor: Annotated[float, typer.Option(
        help="The delta engines' --relative-floor (see detect; their plan comes from the profile made without it)"
    )] = 0.0,
    coherence: Annotated[float, typer.Option(help="The delta engines' --coherence in grey levels (see detect)")
                         ] = 12.0,
) -> None:
    """Mixed plan (plan=auto) vs all-dense, all-delta and ONNX Runtime, end to end, with predicted vs measured."""
    from deluceva.engine import EngineConfig
    from deluceva.eval.bench_plan import SCHEDULES, run_plan_benchmark

    if frames < 2 or repeats < 1:
        raise DelucevaError("--frames must be >= 2 and --repeats >= 1")
    # their checks of the floors, before decoding or profiling
    EngineConfig(mode="delta", relative_floor=relative_floor, coherence=coherence)
    if schedule is not None and schedule not in SCHEDULES:
        raise DelucevaError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    models_ = models_ or ["yolov5n", "yolox-nano"]
    videos = video or sorted(Path("assets/video").glob("*.mp4")) + sorted(Path("assets/video").glob("*.avi"))
    out = out or Path(f"bench/results/plan_{'_'.join(models_)}.json")
    run_plan_benchmark(models_, sizes or ["768x448", "default"], threads or [1, 2],
                       [float(f) for f in filters.split(",")], videos, frames, start, repeats, profile_frames,
                       reprofile, out, out_console, progress_bar, schedule, relative_floor, coherence)


@bench_app.command("plot")
def bench_plot(
    result: Annotated[Path, typer.Argument(help="A `deluceva bench plan` JSON")],
    out: Annotated[Path | None, typer.Option(help="PNG output (default: the JSON's path with .png)")] = None,
    models_: Annotated[list[str] | None, typer.Option("--model", help="Only these models' rows")] = None,
    videos: Annotated[list[str] | None, typer.Option("--video", help="Only these videos' rows (file name or stem)")
                      ] = None,
    threads: Annotated[list[int] | None, typer.Option("--threads", help="Only these thread counts' rows")] = None,
    filters: Annotated[list[float] | None, typer.Option("--filter", help="Only these filtering percentages' rows")
                       ] = None,
) -> None:
    """Per-frame timelines of a `bench plan` result: ms per frame of each engine, the mixed engine's decisions."""
    from deluceva.eval.plan_plot import load_result, plot_timelines, select_rows

    chosen = select_rows(load_result(result), models_, videos, threads, filters)
    out_console.print(f"wrote {plot_timelines(chosen, out or result.with_suffix('.png'))}")


@bench_app.command("ops", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_ops(ctx: typer.Context) -> None:
    """Per-operator dense vs delta at active fractions 0.5..50% (options: see `python bench/ops.py --help`)."""
    from deluceva.delta.kernels.opbench import main as ops_main

    raise typer.Exit(ops_main(list(ctx.args)))


def main() -> None:
    """Entry point: user errors print one line on stderr and exit 2, without a traceback."""
    try:
        app(standalone_mode=False)
    except DelucevaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; partial outputs were removed", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
