"""Frozen run configuration, built once from argv (with argparse-dataclass) or from Python.

No `from __future__ import annotations` here: argparse-dataclass reads the field types at run
time, and `Optional[...]` (not `X | None`) is what it understands.
"""
import re
from dataclasses import dataclass, field
from typing import List, Optional

#: The model table's names, duplicated here (not imported from model.py) so that `--help` stays
#: free of torch; tests hold the two lists equal.
MODEL_NAMES = (
    "deeplabv3_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
)
DEFAULT_MODEL = "deeplabv3_resnet101"

#: libx264's speed presets, fastest first (here rather than in videowriter.py: `--help` lists them).
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _opt(*args: str, help: str, **more):
    return dict(args=list(args), help=help, **more)


@dataclass(frozen=True)
class Options:
    """Everything one `streamseg` run needs. Validation raises ValueError naming the value."""

    sources: List[str] = field(
        metadata=_opt(
            "sources",
            nargs="+",
            metavar="SOURCE",
            help="image file(s), directory or glob; video file; camera index (0, 1, ...); "
            "or rtsp:// / http(s):// stream URL",
        )
    )
    output: Optional[str] = field(
        default=None,
        metadata=_opt(
            "-o",
            "--output",
            metavar="PATH",
            help="images: output directory (default: current directory); video/camera/stream: "
            "output .mp4, or a directory to write <stem>_overlay.mp4 in (default for a video file: "
            "<stem>_overlay.mp4 in the current directory)",
        ),
    )
    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_opt(
            "-m",
            "--model",
            metavar="NAME|FILE.onnx",
            help=f"one of {', '.join(MODEL_NAMES)}, or an ONNX file (default: {DEFAULT_MODEL})",
        ),
    )
    weights: Optional[str] = field(
        default=None,
        metadata=_opt("--weights", metavar="FILE.pth", help="local state dict for a torchvision model"),
    )
    classes: str = field(
        default="car",
        metadata=_opt(
            "-c",
            "--classes",
            metavar="LIST",
            help="class names or ids, comma-separated; groups: vehicles, all (default: car)",
        ),
    )
    alpha: float = field(default=0.5, metadata=_opt("--alpha", help="overlay opacity 0..1 (default: 0.5)"))
    legend: bool = field(default=False, metadata=_opt("--legend", help="draw names and colours of the classes present"))
    device: str = field(
        default="auto",
        metadata=_opt("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto = CUDA when present)"),
    )
    precision: Optional[str] = field(
        default=None,
        metadata=_opt(
            "--precision",
            choices=["fp32", "fp16", "bf16"],
            help="model precision (default: fp16 on CUDA, fp32 on CPU)",
        ),
    )
    threads: Optional[int] = field(
        default=None,
        metadata=_opt("--threads", metavar="N", help="CPU threads for the model (default: all cores, or one fewer where a video run finds that faster)"),
    )
    compile: bool = field(default=False, metadata=_opt("--compile", help="torch.compile the model: faster frames after a slow first one (tens of seconds)"))
    input_size: Optional[str] = field(
        default=None,
        metadata=_opt("--input-size", metavar="WxH|N", help="ONNX: fixed input WxH, or N for the shorter side"),
    )
    mean: Optional[str] = field(default=None, metadata=_opt("--mean", metavar="R,G,B", help="ONNX: input mean, 0-255 scale"))
    std: Optional[str] = field(default=None, metadata=_opt("--std", metavar="R,G,B", help="ONNX: input std, 0-255 scale"))
    categories: Optional[str] = field(
        default=None, metadata=_opt("--categories", metavar="NAMES", help="ONNX: class names, background first")
    )
    stats: Optional[str] = field(
        default=None, metadata=_opt("--stats", metavar="FILE.jsonl", help="write per-image/per-frame class shares as JSON lines")
    )
    save_masks: Optional[str] = field(
        default=None,
        metadata=_opt("--save-masks", metavar="DIR", help="video: write each segmented frame's label map as DIR/<index>.png"),
    )
    preset: str = field(
        default="auto",
        metadata=_opt(
            "--preset",
            choices=["auto", *X264_PRESETS],
            metavar="NAME",
            help="video output: libx264 speed preset, ultrafast ... veryslow (default: auto = ultrafast "
            "when the model runs on the CPU, veryfast on a GPU; slower presets make smaller files)",
        ),
    )
    crf: int = field(
        default=20,
        metadata=_opt("--crf", metavar="N", help="video output: libx264 quality 1..51, lower is better and larger (default: 20)"),
    )
    stride: int = field(default=1, metadata=_opt("--stride", metavar="N", help="video: segment one frame in every N (default: 1)"))
    batch: Optional[int] = field(default=None, metadata=_opt("--batch", metavar="N", help="video files: frames per model call"))
    show: bool = field(default=False, metadata=_opt("--show", help="open a preview window (default for cameras and streams without -o)"))
    no_show: bool = field(default=False, metadata=_opt("--no-show", help="never open a preview window"))
    reconnect: int = field(
        default=10, metadata=_opt("--reconnect", metavar="N", help="streams: reconnect attempts after a drop (default: 10)")
    )
    overwrite: bool = field(default=False, metadata=_opt("--overwrite", help="replace existing output files"))
    quiet: bool = field(default=False, metadata=_opt("-q", "--quiet", help="print only warnings and errors"))
    debug: bool = field(default=False, metadata=_opt("--debug", help="show tracebacks and debug logs"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", list(self.sources))
        if not self.sources:
            raise ValueError("no SOURCE given")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be between 0 and 1, got {self.alpha:g}")
        if self.stride < 1:
            raise ValueError(f"--stride must be 1 or more, got {self.stride}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--batch must be 1 or more, got {self.batch}")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise ValueError(f"--threads must be 1 or more, got {self.threads}")
        if not 1 <= self.crf <= 51:
            # x264's CRF 0 is lossless, in the High 4:4:4 Predictive profile that browsers do not play.
            hint = " (0 is lossless H.264, which browsers do not play; 1 is near lossless)" if self.crf == 0 else ""
            raise ValueError(f"--crf must be between 1 and 51, got {self.crf}{hint}")
        if self.reconnect < 0:
            raise ValueError(f"--reconnect must be 0 or more, got {self.reconnect}")
        if not _DEVICE.match(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{self.device}'")
        if self.show and self.no_show:
            raise ValueError("--show and --no-show contradict each other")
        if self.input_size is not None:
            parse_input_size(self.input_size)
        for flag, value in (("--mean", self.mean), ("--std", self.std)):
            if value is not None:
                parse_triple(value, flag)

    @property
    def is_onnx(self) -> bool:
        return self.model.lower().endswith(".onnx")


@dataclass(frozen=True)
class ExportOptions:
    """`streamseg export`: write a model of the table to ONNX with streamseg metadata."""

    model: str = field(default=DEFAULT_MODEL, metadata=_opt("-m", "--model", help=f"one of {', '.join(MODEL_NAMES)} (default: {DEFAULT_MODEL})"))
    output: str = field(default="", metadata=_opt("-o", "--output", metavar="FILE.onnx", help="where to write the ONNX model"))
    weights: Optional[str] = field(default=None, metadata=_opt("--weights", metavar="FILE.pth", help="local state dict"))
    input_size: str = field(
        default="520x520",
        metadata=_opt("--input-size", metavar="WxH", help="fixed input size of the exported model (default: 520x520)"),
    )
    opset: int = field(default=17, metadata=_opt("--opset", help="ONNX opset (default: 17)"))
    overwrite: bool = field(default=False, metadata=_opt("--overwrite", help="replace an existing file"))
    quiet: bool = field(default=False, metadata=_opt("-q", "--quiet", help="print only warnings and errors"))
    debug: bool = field(default=False, metadata=_opt("--debug", help="show tracebacks"))

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("export needs -o FILE.onnx")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model '{self.model}'; choose one of {', '.join(MODEL_NAMES)}")
        size = parse_input_size(self.input_size)
        if isinstance(size, int):
            raise ValueError(f"--input-size for export must be WxH, got '{self.input_size}'")


def parse_input_size(text: str):
    """'520x520' -> (520, 520) as (width, height); '520' -> 520 (shorter side)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"--input-size must be WxH or N, got '{text}'")
    w = int(m.group(1))
    h = None if m.group(2) is None else int(m.group(2))
    if w < 1 or (h is not None and h < 1) or w > 8192 or (h or 1) > 8192:
        raise ValueError(f"--input-size out of range: '{text}'")
    return w if h is None else (w, h)


def parse_triple(text: str, flag: str) -> tuple:
    """'127.5,127.5,127.5' -> (127.5, 127.5, 127.5); one number is repeated three times."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be three numbers R,G,B, got '{text}'") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{flag} must be three numbers R,G,B, got '{text}'")
    if flag == "--std" and any(v <= 0 for v in values):
        raise ValueError(f"--std values must be positive, got '{text}'")
    return values
