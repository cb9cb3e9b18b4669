"""`streamseg export`: a model of the table as an ONNX file that the ONNX path runs as it is.

    >>> from streamseg.config import ExportOptions
    >>> export_onnx(ExportOptions(model="lraspp_mobilenet_v3_large", output="lraspp.onnx"))  # doctest: +SKIP
    PosixPath('lraspp.onnx')

The file has a fixed input size (N, 3, H, W) float32 RGB, normalised, and carries its
preprocessing in `metadata_props`, so `streamseg IMAGE --model lraspp.onnx` needs no flags:

| key | value |
|---|---|
| `streamseg.input_size` | `WxH` of the export |
| `streamseg.mean`, `streamseg.std` | RGB, 0-255 scale, from the weights' own transforms |
| `streamseg.categories` | the weights' class names, background first, comma-separated |
| `streamseg.source` | which torchvision model and weights it came from |

The batch dimension is dynamic. The legacy (TorchScript) exporter is used: the torch.export-based
one needs `onnxscript`, which streamseg does not otherwise depend on, and gives nothing these
plain convolutional graphs need.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .config import ExportOptions, parse_input_size
from .model import TorchModel, weights_for
from .sinks import atomic_path, check_target, ensure_dir
from .types import ModelLoadError, SinkError, UsageError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "out"


def export_onnx(opts: ExportOptions) -> Path:
    """Write `opts.model` (weights from `opts.weights`, or torchvision's download cache) to
    `opts.output` as ONNX at the fixed input size `opts.input_size` (WxH). Returns the path.

    Raises SinkError when the output exists (without `overwrite`) or cannot be written, and
    ModelLoadError when the weights cannot be loaded or the exporter fails.
    """
    opsets = supported_opsets()
    if opts.opset not in opsets:  # before anything is built or traced
        raise UsageError(f"--opset {opts.opset} is not supported: torch {torch.__version__} exports "
                         f"opsets {opsets.start} to {opsets.stop - 1}")
    out = Path(opts.output)
    width, height = parse_input_size(opts.input_size)
    # Check the target before loading anything: a refused overwrite should cost nothing.
    ensure_dir(out.parent if str(out.parent) else Path("."))
    check_target(out, overwrite=opts.overwrite)
    model = TorchModel(
        opts.model,
        device=torch.device("cpu"),
        precision="fp32",
        weights_file=opts.weights,
        channels_last=False,  # the exported graph is layout-free; onnxruntime picks its own
    )
    data = _export_bytes(model.net, width=width, height=height, opset=opts.opset, name=opts.model)
    spec = model.spec
    metadata = {
        "streamseg.input_size": f"{width}x{height}",
        "streamseg.mean": ",".join(f"{v:.6g}" for v in spec.mean),
        "streamseg.std": ",".join(f"{v:.6g}" for v in spec.std),
        "streamseg.categories": ",".join(model.categories),
        "streamseg.source": f"torchvision {opts.model} ({_weights_label(opts)})",
    }
    data = _with_metadata(data, metadata)
    try:
        with atomic_path(out, suffix=".onnx") as tmp:
            tmp.write_bytes(data)
            # mkstemp creates 0600; a model file is for everyone the umask lets read it.
            os.chmod(tmp, 0o666 & ~_umask())
            # Last check right before the rename: the file may have appeared during the export.
            if out.exists() and not opts.overwrite:
                raise SinkError(f"output '{out}' exists; pass --overwrite to replace it")
    except OSError as exc:
        raise SinkError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    # The CLI says "wrote ..." once; this is for --debug.
    log.debug("exported %s at %dx%d (opset %d) to %s", opts.model, width, height, opts.opset, out)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _weights_label(opts: ExportOptions) -> str:
    if opts.weights:
        return f"weights file {Path(opts.weights).name}"
    return str(weights_for(opts.model))


def supported_opsets() -> range:
    """The ONNX opsets that the installed torch's TorchScript-based exporter (the one streamseg
    uses) writes: 7 to 20 in torch 2.5 to 2.14."""
    try:
        from torch.onnx import _constants  # private: fall back to what torch 2.14 says

        return range(_constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET + 1)
    except (ImportError, AttributeError):
        return range(7, 21)


@contextmanager
def _native_output_to_debug_log() -> Iterator[None]:
    """Hold back what the block writes to file descriptors 1 and 2; it goes to the debug log.

    When the TorchScript exporter fails, its C++ side prints the whole traced graph to stderr,
    hundreds of lines before streamseg's one-line error; `--debug` still shows it."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no such descriptors to redirect (an embedding program): nothing to hold back
        yield
        return
    with tempfile.TemporaryFile() as held:
        try:
            os.dup2(held.fileno(), 1)
            os.dup2(held.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if log.isEnabledFor(logging.DEBUG) and held.tell():
                held.seek(0)
                log.debug("the ONNX exporter printed:\n%s", held.read().decode("utf-8", "replace").rstrip())


def _export_bytes(net: torch.nn.Module, *, width: int, height: int, opset: int, name: str) -> bytes:
    """The ONNX protobuf of `net` (N, 3, H, W) -> (N, C, H, W) logits, traced at H x W."""
    example = torch.zeros(1, 3, height, width)
    buf = io.BytesIO()
    try:
        with _native_output_to_debug_log(), warnings.catch_warnings(record=True) as caught:
            # The legacy exporter announces its own deprecation on every call; that is ours to
            # track, not the user's to read.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                net,
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types (RuntimeError, OnnxExporterError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot export {name} to ONNX at {width}x{height}, opset {opset}: {first}") from exc
    # What the exporter warns about (a Resize that may not match torch below opset 11), one line each.
    for text in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        log.warning("ONNX exporter: %s", text)
    return buf.getvalue()


def _with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The ONNX model `data` with `metadata` set in its metadata_props."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelLoadError("streamseg export needs the 'onnx' package: pip install 'streamseg[export]'") from exc
    proto = onnx.load_from_string(data)
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()
