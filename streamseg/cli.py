"""argv -> config -> pipeline. The only place that prints, sets up logging and picks exit codes.

Exit status: 0 success, 1 runtime error, 2 usage error, 130 interrupted by Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import NoReturn, Optional, Sequence

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


def _setup_logging(*, quiet: bool, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("streamseg")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


def _fail(message: str, code: int) -> int:
    print(f"streamseg: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    except StreamsegError as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("streamseg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: still one line, traceback with --debug
        if debug:
            traceback.print_exc()
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


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
        **kwargs,
    )


def _run(opts: Options) -> int:
    from .sources import expand_image_sources, source_kind

    kinds = {source_kind(s) for s in opts.sources}
    if kinds == {"images"}:
        return _run_images(opts, expand_image_sources(opts.sources))
    if len(opts.sources) > 1:
        raise UsageError("give one video, camera or stream SOURCE at a time (several SOURCEs must all be images)")
    from .app import run_video

    return run_video(opts, kinds.pop(), _segmenter)


def _run_images(opts: Options, paths) -> int:
    from .pipeline import check_image_targets, run_images
    from .sinks import JsonLines

    out_dir = Path(opts.output) if opts.output else Path(".")
    if out_dir.suffix.lower() in (".mp4", ".mkv", ".mov", ".avi"):
        raise UsageError(f"-o for images is a directory, got '{out_dir}'")
    check_image_targets(paths, out_dir, overwrite=opts.overwrite)
    segmenter = _segmenter(opts)
    stats = JsonLines(Path(opts.stats), overwrite=opts.overwrite, inputs=tuple(paths)) if opts.stats else None
    failures = 0
    try:
        for result in run_images(
            paths, segmenter, out_dir=out_dir, alpha=opts.alpha, legend=opts.legend, stats=stats
        ):
            if result.error:
                failures += 1
                print(f"streamseg: error: {result.error}", file=sys.stderr)
                continue
            seg = result.segmentation
            h, w = seg.labels.shape
            parts = [f"{seg.categories[c]} {seg.count(c):,} px ({100 * seg.share(c):.2f} %)" for c in seg.selected]
            if not opts.quiet:
                print(f"{result.path}: {w}x{h}  " + ", ".join(parts))
    finally:
        if stats is not None:
            stats.close()
    if not opts.quiet:
        print(f"wrote {3 * (len(paths) - failures)} files to {out_dir}/")
    return 1 if failures else 0


def _export(argv: Sequence[str]) -> int:
    parser = _Parser(ExportOptions, prog="streamseg export", description="Write a model of the table to ONNX with streamseg metadata.")
    try:
        opts = parser.parse_args(list(argv))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _setup_logging(quiet=False, debug=opts.debug)
    from .export import export_onnx

    path = export_onnx(opts)
    print(f"wrote {path}")
    return 0
