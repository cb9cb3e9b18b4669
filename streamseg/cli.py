"""argv -> config -> pipeline. The only place that prints, sets up logging and picks exit codes.

Exit status: 0 success, 1 runtime error, 2 usage error, 130 interrupted by Ctrl-C (SIGINT),
143 stopped by SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import os
import math
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Sequence

from argparse_dataclass import ArgumentParser

from . import __version__
from .config import ExportOptions, Options, parse_input_size, parse_triple
from .types import StreamsegError, UsageError

log = logging.getLogger("streamseg")

DESCRIPTION = (
    "Semantic segmentation (DeepLabV3 and friends) of still images, video files, cameras and "
    "network streams: colours the chosen classes and writes overlays, masks and browser-playable videos."
)
EPILOG = """examples:
  streamseg photo.jpg -o out/                       three PNGs per image: overlay, mask, labels
  streamseg dashcam.mp4 -o annotated.mp4 --stride 2  H.264 MP4 with the source's audio
  streamseg 0 --classes person,car                   live webcam preview (q quits)
  streamseg export -m lraspp_mobilenet_v3_large -o lraspp.onnx
"""


class _Parser(ArgumentParser):
    """argparse prints usage and exits; streamseg raises, so the CLI prints one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        # argparse_dataclass builds (so validates) the options before argparse looks for unknown
        # arguments: a misspelt `--ouput x.onnx` read as a missing -o. The typo is named first.
        _, unknown = argparse.ArgumentParser.parse_known_args(self, args)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args, namespace)


def build_parser() -> _Parser:
    parser = _Parser(
        Options,
        prog="streamseg",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"streamseg {__version__}")
    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"streamseg: error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"streamseg: warning: {msg}"
        return msg


class _Handler(logging.StreamHandler):
    """Writes to stderr; while a progress bar is drawn there, through tqdm.write, which clears
    the bar, prints the line whole and redraws the bar. Log lines come from any thread (a
    corrupt frame is reported by the capture thread while the output stage moves the bar), and
    written directly they would land in the middle of the bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _setup_logging(*, quiet: bool, debug: bool) -> None:
    handler = _Handler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("streamseg")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


def _fail(message: str, code: int) -> int:
    print(f"streamseg: error: {message}", file=sys.stderr)
    return code


class _SignalInterrupt(KeyboardInterrupt):
    """What streamseg's signal handlers raise; every `except KeyboardInterrupt` catches it.

    Not KeyboardInterrupt itself: CPython remembers a KeyboardInterrupt that passes through code
    run by PyRun_String (as some extension modules do while they are imported) and then ends the
    process by SIGINT at exit, whatever main() returned. A subclass does not trip that.
    """


_REPEAT_S = 1.0  # signals this soon after the last raised interruption are only noted


class _Interrupts:
    """SIGINT/SIGTERM for the whole run (video runs refine this with `_Signals`).

    A signal raises KeyboardInterrupt wherever the program is, so `with` blocks and `finally`
    clauses remove temporary files; SIGTERM's default action would kill the process on the spot
    and leave them behind. Which signal came first is remembered: it sets the exit status, and
    library code sometimes turns the KeyboardInterrupt into an error of its own (a C extension
    half-way through its import reports "ImportError: initialization failed"), which main() then
    still reports as the interruption. While one interruption unwinds the program, signals that
    follow within a second are only noted, so that clean-up is not cut short by a double Ctrl-C.

    SIGXFSZ (a file-size limit, `ulimit -f`, was hit) is ignored, so the write fails with EFBIG
    and is reported like a full disk instead of killing the process without a word. (The python
    executable ignores it from start-up already; an embedding program may not.)
    """

    def __init__(self) -> None:
        self.raised: Optional[int] = None
        self._deferring = False
        self._pending: Optional[int] = None
        self._last_raise = -math.inf

    def interrupt(self, signum: int) -> None:
        """Raise the interruption for `signum`: now, or inside deferred() when that block ends."""
        self.raised = self.raised or signum
        if self._deferring:
            self._pending = signum
            return
        now = time.monotonic()
        if now - self._last_raise < _REPEAT_S:
            return
        self._last_raise = now
        raise _SignalInterrupt

    def _handle(self, signum, _frame) -> None:
        self.interrupt(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals are only noted while the block runs, then raised. For importing torch and
        friends: their C++ initialisation calls back into Python, and an exception raised there
        ends in std::terminate, an abort with a core dump instead of a clean stop. And for
        writing one still image's files and stats line, which belong together. A block inside
        another defers to the outer one's end."""
        outer = self._deferring
        self._deferring = True
        if not outer:
            self._pending = None
        try:
            yield
        finally:
            self._deferring = outer
        if not outer and self._pending is not None:
            self.interrupt(self._pending)

    @contextmanager
    def installed(self, *, program: bool) -> Iterator["_Interrupts"]:
        """The handlers for one main() call. Afterwards the old ones come back; for the program
        itself (`program`), the default actions instead: a signal while the interpreter shuts
        down, all outputs complete, then ends it quietly rather than with a traceback from an
        atexit hook."""
        self.raised, self._deferring, self._pending, self._last_raise = None, False, None, -math.inf
        restore = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal() works there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.signal(sig, self._handle)
                restore[sig] = signal.SIG_DFL if program else old
            if hasattr(signal, "SIGXFSZ"):
                restore[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            yield self
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)

    def report(self) -> int:
        if self.raised == signal.SIGTERM:
            print("streamseg: terminated", file=sys.stderr)
            return 128 + int(signal.SIGTERM)
        print("streamseg: interrupted", file=sys.stderr)
        return 130


_interrupts = _Interrupts()


def configure_process() -> None:
    """Process-wide settings for a video run, made before torch is imported (the benchmark makes
    them too, so that it measures what the command runs).

    - OpenMP workers wait passively: decode, model and encode share the cores in parallel threads,
      and workers that busy-wait between the model's operators take time from the others (LR-ASPP
      end to end +8 % on two cores). Read by libgomp when torch loads.
    - glibc keeps freed blocks of up to 32 MiB for reuse instead of unmapping them: otherwise each
      frame's activations and images are mapped afresh and every page faults in again (LR-ASPP:
      47 ms of kernel time per 720p frame, down to 15-20; end to end +10 %).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest; blocks above it are still mapped
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_top_pad, 64 << 20)


def main(argv: Optional[Sequence[str]] = None) -> int:
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_process()
    try:
        with _interrupts.installed(program=program):
            code = _main(argv)
    except KeyboardInterrupt:  # a signal just as the run ended, between its own handlers
        code = _interrupts.report()
    if program and any(t.name == "streamseg-capture" and t.is_alive() for t in threading.enumerate()):
        # A stream that stopped sending keeps its capture thread inside OpenCV's read until the
        # read timeout; every output is finished. The interpreter's shutdown would stop that
        # thread inside C++ code (an abort), so the process ends here, as it is.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "export":
            return _export(argv[1:])
        try:
            opts = build_parser().parse_args(argv)
        except ValueError as exc:  # Options.__post_init__ validation
            raise UsageError(str(exc)) from exc
        _setup_logging(quiet=opts.quiet, debug=opts.debug)
        return _run(opts)
    except KeyboardInterrupt:
        return _interrupts.report()
    except StreamsegError as exc:
        if _interrupts.raised:  # the interruption, reworded by the code it interrupted
            return _interrupts.report()
        if debug:
            traceback.print_exc()
        return _fail(str(exc), exc.exit_code)
    except Exception as exc:  # a bug, not a user mistake: still one line, traceback with --debug
        if _interrupts.raised:
            return _interrupts.report()
        if debug:
            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


def _libraries(opts: Options, *, video: bool = False) -> None:
    """Import the heavy libraries this run needs, with signals deferred (see _Interrupts.deferred):
    the first step of loading the model."""
    log.debug("loading model %s", opts.model)
    with _interrupts.deferred():
        import importlib

        from . import segmenter  # noqa: F401  (torch)

        importlib.import_module("onnxruntime" if opts.is_onnx else "torchvision.models.segmentation")
        if video:
            try:
                import av  # noqa: F401  (the video writer's; without it, the writer falls back and says so)
            except ImportError:
                pass


def _segmenter(opts: Options):
    from .segmenter import Segmenter

    kwargs = {}
    if opts.is_onnx:
        kwargs = dict(
            input_size=parse_input_size(opts.input_size) if opts.input_size else None,
            mean=parse_triple(opts.mean, "--mean") if opts.mean else None,
            std=parse_triple(opts.std, "--std") if opts.std else None,
            categories=[c.strip() for c in opts.categories.split(",")] if opts.categories else None,
        )
    elif any(v is not None for v in (opts.input_size, opts.mean, opts.std, opts.categories)):
        raise UsageError("--input-size, --mean, --std and --categories apply to ONNX models only")
    return Segmenter(
        opts.model,
        device=opts.device,
        classes=opts.classes,
        weights=opts.weights,
        precision=opts.precision,
        threads=opts.threads,
        **kwargs,
        **({"compile": True} if opts.compile else {}),
    )


def _run(opts: Options) -> int:
    with _interrupts.deferred():
        from .sources import expand_image_sources, source_kind  # OpenCV

    kinds = {source_kind(s) for s in opts.sources}
    if kinds == {"images"}:
        return _run_images(opts, expand_image_sources(opts.sources))
    if len(opts.sources) > 1:
        raise UsageError("give one video, camera or stream SOURCE at a time (several SOURCEs must all be images)")
    return _run_video(opts, kinds.pop())


#: Options that only videos, cameras and streams use, as the flags a user typed.
_VIDEO_ONLY = {"save_masks": "--save-masks", "stride": "--stride", "preset": "--preset", "crf": "--crf",
               "batch": "--batch", "show": "--show", "no_show": "--no-show", "reconnect": "--reconnect"}


def _run_images(opts: Options, paths) -> int:
    from dataclasses import fields

    from .sources import IMAGE_SUFFIXES

    defaults = {f.name: f.default for f in fields(opts)}
    given = [flag for name, flag in _VIDEO_ONLY.items() if getattr(opts, name) != defaults[name]]
    if given:  # said, rather than ignored: `--save-masks DIR` would leave DIR empty without a word
        hint = " (each image's label map is <name>_labels.png)" if "--save-masks" in given else ""
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to videos, cameras and "
                         f"streams, not to still images{hint}")

    out_dir = Path(opts.output) if opts.output else Path(".")
    # `-o result.png` would quietly become a directory of that name; one that exists already is a
    # directory the user chose.
    file_like = out_dir.suffix.lower() in IMAGE_SUFFIXES and not out_dir.is_dir()
    if file_like or out_dir.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi"):
        raise UsageError(f"-o for images is a directory (each image gets <name>_overlay.png, _mask.png and "
                         f"_labels.png in it), got '{out_dir}'")
    _libraries(opts)
    from .pipeline import check_image_targets, run_images
    from .sinks import JsonLines

    _distinct_outputs(("-o", out_dir), ("--stats", opts.stats))
    check_image_targets(paths, out_dir, overwrite=opts.overwrite)
    if opts.stats:  # before the model loads: a bad --stats path should not cost a model load first
        from .sinks import check_dir, check_target

        check_dir(Path(opts.stats).parent)
        check_target(Path(opts.stats), overwrite=opts.overwrite, inputs=tuple(paths))
    segmenter = _segmenter(opts)
    failures = 0
    # As for video, the stats file is published when the run ends, if it got a line.
    with (JsonLines(Path(opts.stats), overwrite=opts.overwrite, inputs=tuple(paths))
          if opts.stats else nullcontext()) as stats:
        for result in run_images(
            paths, segmenter, out_dir=out_dir, alpha=opts.alpha, legend=opts.legend, stats=stats,
            writing=_interrupts.deferred,
        ):
            if result.error:
                failures += 1
                print(f"streamseg: error: {result.error}", file=sys.stderr)
                continue
            seg = result.segmentation
            h, w = seg.labels.shape
            # With many classes selected (vehicles, all), list those present; else all asked for.
            listed = seg.selected if len(seg.selected) <= 3 else seg.present
            parts = [f"{seg.categories[c]} {seg.count(c):,} px ({100 * seg.share(c):.2f} %)" for c in listed]
            if not parts:
                parts = ["no selected class found"]
            if not opts.quiet:
                print(f"{result.path}: {w}x{h}  " + ", ".join(parts))
    if not opts.quiet and failures < len(paths):
        print(f"wrote {3 * (len(paths) - failures)} files to {out_dir}/")
    return 1 if failures else 0


def _distinct_outputs(*outputs) -> None:
    """Two outputs in one place (`--stats out` beside `-o out/`) would fail only at the end."""
    seen: dict[Path, str] = {}
    for flag, value in outputs:
        if value is None:
            continue
        where = Path(value).resolve()
        if where in seen:
            raise UsageError(f"{seen[where]} and {flag} both name '{value}'; give each output its own place")
        seen[where] = flag


def _export(argv: Sequence[str]) -> int:
    parser = _Parser(ExportOptions, prog="streamseg export", description="Write a model of the table to ONNX with streamseg metadata.")
    try:
        opts = parser.parse_args(list(argv))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _setup_logging(quiet=opts.quiet, debug=opts.debug)
    with _interrupts.deferred():
        from .export import export_onnx  # torch, torchvision

    path = export_onnx(opts)
    if not opts.quiet:
        print(f"wrote {path} ({opts.model}, ONNX opset {opts.opset})")
    return 0


class _Signals:
    """SIGINT/SIGTERM policy for video runs.

    Before frames flow, a signal interrupts at once (nothing has been written). While frames flow,
    the first signal sets the stop event so every stage winds down and the output is finalised;
    a second SIGINT interrupts at once.
    """

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.received: Optional[int] = None
        self.flowing = False
        self._old: dict = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, _frame) -> None:
        first = self.received is None
        self.received = self.received or signum
        if self.flowing and first:
            self.stop.set()
            return
        _interrupts.interrupt(signum)

    @property
    def exit_code(self) -> Optional[int]:
        if self.received is None:
            return None
        return 128 + int(self.received)


class _FinishedWhole:
    """Enters a writer; leaving it (finishing the video: the encoder's last frames, the index,
    the move into place) runs with SIGINT/SIGTERM held back, then raises them. A signal inside
    FFmpeg's trailer would leave a file that cannot be finished, and the video so far would be
    lost at the very end; finishing takes milliseconds, a few seconds for a long video."""

    def __init__(self, writer):
        self._writer = writer

    def __enter__(self):
        return self._writer.__enter__()

    def __exit__(self, *exc_info):
        with _interrupts.deferred():
            return self._writer.__exit__(*exc_info)


def _video_output(opts: Options, kind: str, spec: str) -> Optional[Path]:
    """-o as given; a directory gets <stem>_overlay.mp4; a video file without -o gets that in '.'."""
    stem = Path(spec).stem if kind == "video" else ("camera" + spec if kind == "camera" else "stream")
    if opts.output is None:
        return Path(f"{stem}_overlay.mp4") if kind == "video" else None
    out = Path(opts.output)
    if out.is_dir() or opts.output.endswith(("/", "\\")):
        return out / f"{stem}_overlay.mp4"
    if out.suffix.lower() not in (".mp4", ".m4v", ".mov"):
        raise UsageError(f"video output must be an .mp4 file or a directory, got '{opts.output}'")
    return out


def _run_video(opts: Options, kind: str) -> int:
    from .sinks import check_dir, check_mask_dir, check_target, ensure_dir

    spec = opts.sources[0]
    inputs = (Path(spec),) if kind == "video" else ()
    if kind == "video":  # say what is wrong with the file before the model loads
        from .sources import probe_video

        probe_video(spec)
    out = _video_output(opts, kind, spec)
    if out is not None:
        ensure_dir(out.parent if str(out.parent) else Path("."))
        check_target(out, overwrite=opts.overwrite, inputs=inputs)
    # Every output place is checked before the model loads and before a frame is read.
    _distinct_outputs(("-o", out), ("--stats", opts.stats), ("--save-masks", opts.save_masks))
    if opts.stats:
        check_dir(Path(opts.stats).parent)
        check_target(Path(opts.stats), overwrite=opts.overwrite, inputs=inputs)
    if opts.save_masks:
        check_mask_dir(Path(opts.save_masks), overwrite=opts.overwrite)
    show = opts.show or (kind != "video" and out is None and not opts.no_show)
    if show:
        from .window import ensure_display

        ensure_display()
    if not (out or show or opts.stats or opts.save_masks):
        raise UsageError("nothing to do: give -o, --show, --stats or --save-masks")

    stop = threading.Event()
    with _Signals(stop) as signals:
        try:
            _libraries(opts, video=True)
            segmenter = _segmenter(opts)
            code = _run_video_with(opts, kind, spec, out, show, segmenter, stop, signals)
        except KeyboardInterrupt:
            # A signal before frames flowed (or a second one): stop at once. SIGTERM keeps its own
            # exit status (143), as after frames flowed; SIGINT goes on to main()'s 130.
            if signals.received != signal.SIGTERM:
                raise
            print("streamseg: terminated", file=sys.stderr)
            return signals.exit_code
    return signals.exit_code or code


def _run_video_with(opts, kind, spec, out, show, segmenter, stop, signals) -> int:
    from contextlib import ExitStack

    from tqdm import tqdm

    from .overlay import Painter
    from .sinks import JsonLines, MaskDir
    from .sources import VideoSource, decode_threads_for
    from .video import VideoOutputs, VideoPipeline, VideoSettings

    batch = opts.batch or (4 if segmenter.device.type == "cuda" and kind == "video" else 1)
    with ExitStack() as stack:
        source = stack.enter_context(
            VideoSource(spec, reconnect=opts.reconnect, stop=stop, decode_threads=decode_threads_for(segmenter.device.type))
        )
        info = source.info
        writer = window = None
        if out is not None:
            from .videowriter import VideoWriter, auto_preset

            preset = auto_preset(segmenter.device.type) if opts.preset == "auto" else opts.preset
            writer = stack.enter_context(
                _FinishedWhole(VideoWriter(
                    out,
                    width=info.width,
                    height=info.height,
                    fps=info.fps,
                    audio_from=Path(spec) if kind == "video" else None,
                    overwrite=opts.overwrite,
                    crf=opts.crf,
                    preset=preset,
                ))
            )
        if show:
            from .window import Window

            window = stack.enter_context(Window(f"streamseg - {info.name}"))
        stats = stack.enter_context(JsonLines(Path(opts.stats), overwrite=opts.overwrite)) if opts.stats else None
        masks = stack.enter_context(MaskDir(Path(opts.save_masks), overwrite=opts.overwrite)) if opts.save_masks else None
        outputs = VideoOutputs(
            writer=writer,
            window=window,
            masks=masks,
            stats=stats,
            snapshot_dir=out.parent if out is not None else Path("."),
        )
        settings = VideoSettings(stride=opts.stride, batch=batch, alpha=opts.alpha, legend=opts.legend)
        painter = Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=opts.alpha)
        log.info(
            "%s: %dx%d @ %.3f fps, %s frames; model %s on %s",
            info.name, info.width, info.height, info.fps,
            info.frame_count if info.frame_count is not None else "live", segmenter.model.name, segmenter.device,
        )
        bar = None
        on_frame = None
        if info.live:
            on_frame = _LiveLog().tick
        elif not opts.quiet:
            bar = stack.enter_context(tqdm(total=info.frame_count, unit="frame", dynamic_ncols=True, leave=True))
            on_frame = lambda _index: bar.update(1)  # noqa: E731
        pipeline = VideoPipeline(source, segmenter, outputs, settings, painter=painter, stop=stop, on_frame=on_frame)
        signals.flowing = True
        report = pipeline.run()
    # Leaving the ExitStack finalised the video and the stats file, and replaced earlier masks.
    if not opts.quiet:
        skipped = report.frames_skipped
        corrupt = f", {skipped} corrupt frame{'s' if skipped != 1 else ''} skipped" if skipped else ""
        if out is not None and report.frames_written:
            if skipped:
                corrupt += " (previous overlay repeated)"
            if report.recorded_s is not None:  # live: frames at their capture times
                timing = f"over {report.recorded_s:.1f} s"
            else:
                timing = "at " + f"{float(writer.rate):.3f}".rstrip("0").rstrip(".") + " fps"
            print(f"wrote {out}: {report.frames_written} frames {timing} ({writer.codec}), "
                  f"{report.frames_segmented} segmented{corrupt}")
        else:
            print(f"{report.frames_read} frames read, {report.frames_segmented} segmented{corrupt}")
    if report.frames_dropped and info.live:
        log.info("%d live frames were replaced by newer ones before they could be shown", report.frames_dropped)
    return 0


class _LiveLog:
    """A log line every few seconds for live sources (the window title shows FPS too)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.last = time.monotonic()
        self.n = 0

    def tick(self, index: int) -> None:
        self.n += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            # The rate since the previous line, not since the start: a stall or a reconnect shows.
            log.info("frame %d, %.1f fps shown", index, self.n / (now - self.last))
            self.last, self.n = now, 0
