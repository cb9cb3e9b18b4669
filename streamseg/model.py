"""Models: the torchvision table, weights loading, ONNX sessions, device and precision.

Two backends share one small interface (`categories`, `spec`, `device`, `logits`, `predict`), so the
segmenter does not care which one runs. torchvision is imported lazily: `--help` must not pay
for it.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .preprocess import InputSpec
from .types import DeviceError, ModelLoadError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One row of the model table: a torchvision builder and its weights enum."""

    builder: str
    weights: str
    aux: bool  # whether the official checkpoint carries an auxiliary head


#: `--model` name -> torchvision builder and weights (default weights: COCO with VOC labels).
MODELS: dict[str, ModelEntry] = {
    "deeplabv3_resnet101": ModelEntry("deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights", True),
    "deeplabv3_resnet50": ModelEntry("deeplabv3_resnet50", "DeepLabV3_ResNet50_Weights", True),
    "deeplabv3_mobilenet_v3_large": ModelEntry(
        "deeplabv3_mobilenet_v3_large", "DeepLabV3_MobileNet_V3_Large_Weights", True
    ),
    "lraspp_mobilenet_v3_large": ModelEntry("lraspp_mobilenet_v3_large", "LRASPP_MobileNet_V3_Large_Weights", False),
    "fcn_resnet50": ModelEntry("fcn_resnet50", "FCN_ResNet50_Weights", True),
    "fcn_resnet101": ModelEntry("fcn_resnet101", "FCN_ResNet101_Weights", True),
}

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; an absent device that was asked for is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}' was asked for but CUDA is not available on this machine")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' was asked for but Apple MPS is not available on this machine")
        return torch.device("mps")
    return torch.device("cpu")


def weights_for(name: str):
    """The torchvision weights enum value (DEFAULT) of a table entry."""
    import torchvision.models.segmentation as seg

    return getattr(seg, MODELS[name].weights).DEFAULT


def spec_from_weights(weights) -> InputSpec:
    """InputSpec from the weights' own transforms, never typed in by hand."""
    t = weights.transforms()
    size = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return InputSpec(
        size=int(size) if size else None,
        mean=tuple(float(m) * 255.0 for m in t.mean),
        std=tuple(float(s) * 255.0 for s in t.std),
    )


class _Logits(torch.nn.Module):
    """A torchvision segmentation model's logits at its own output stride (1/8 of the input).

    torchvision's forward ends by resizing the logits bilinearly to the input size and returns
    {'out': ..., 'aux': ...}. streamseg resizes them once, straight to the frame's size
    (postprocess.py), so the forward stops before that resize; the auxiliary head is dropped too.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        from torchvision.models.segmentation.lraspp import LRASPP

        self.model = model
        self._lraspp = isinstance(model, LRASPP)  # its classifier takes the whole feature dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.backbone(x)
        if self._lraspp:
            return self.model.classifier(features)
        return self.model.classifier(features["out"])


class TorchModel:
    """A torchvision segmentation model, ready for inference on one device and precision."""

    def __init__(
        self,
        name: str,
        *,
        device: torch.device,
        precision: Optional[str] = None,
        weights_file: Optional[str] = None,
        pretrained: bool = True,
        channels_last: bool = True,
        compile: bool = False,
    ):
        if name not in MODELS:
            raise UsageError(f"unknown model '{name}'; choose one of {', '.join(MODELS)} or an ONNX file")
        self.name = name
        self.device = device
        weights = weights_for(name)
        self.categories: tuple[str, ...] = tuple(weights.meta["categories"])
        self.spec = spec_from_weights(weights)
        precision = precision or ("fp16" if device.type == "cuda" else "fp32")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.channels_last = channels_last
        net = _build(name, weights, weights_file=weights_file, pretrained=pretrained, num_classes=len(self.categories))
        # The auxiliary head only helps training; dropping it saves its whole forward pass.
        if getattr(net, "aux_classifier", None) is not None:
            net.aux_classifier = None
        net = _Logits(net).eval().to(device=device, dtype=self.dtype)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            # Set here, when a CUDA segmenter is built, not at import time: fixed-size frames let
            # cuDNN pick its fastest kernels once.
            torch.backends.cudnn.benchmark = True
        self.net = net  # the eager module: its weights, and what `streamseg export` traces
        self._run = _Compiled(net) if compile else net

    @property
    def compiled(self) -> bool:
        """Whether forward passes run torch.compile's graph: --compile was given, and the first
        pass compiled it (see `_Compiled`)."""
        return isinstance(self._run, _Compiled) and self._run.state == "compiled"

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised input -> (N, C, h/8, w/8) logits, on the model's device."""
        return self._run(x)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised input -> (N, h/8, w/8) uint8 class ids at the model's own
        resolution, on the model's device. Frame-sized labels come from `postprocess.labels_at`."""
        return self._run(x).argmax(1).to(torch.uint8)


class _Compiled:
    """`torch.compile` of the model (--compile), or the model itself where compiling fails.

    Fixed-size frames suit one compiled graph; the first forward pass pays for compiling it (tens
    of seconds), later ones run faster (LR-ASPP on a 2-core CPU: 72 instead of 83 ms). Compiling
    happens at that first pass, not at `torch.compile()`, and it can fail there for reasons of
    the machine: on the CPU it needs a working C++ compiler. A run that asked for --compile then
    goes on uncompiled, with one warning, rather than failing. Errors after a first pass that
    compiled (out of memory, say) are the model's own and are raised as they are.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            # Its notice that a CPU-only torch has no CUDA runtime is noise to a CPU user.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._eager = net
        self._compiled = torch.compile(net, dynamic=False)
        self.state = "untried"  # then "compiled" or "failed"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.state == "compiled":
            return self._compiled(x)
        if self.state == "failed":
            return self._eager(x)
        try:
            out = self._compiled(x)
        except torch.cuda.OutOfMemoryError:
            raise  # the frames do not fit, compiled or not
        except Exception as exc:  # torch._dynamo / inductor errors have no common public base
            self.state = "failed"
            text = str(exc).strip().splitlines()
            log.warning("--compile: torch.compile failed on this machine (%s); the model runs uncompiled",
                        text[0] if text else type(exc).__name__)
            return self._eager(x)
        self.state = "compiled"
        return out


def _misfit(net: torch.nn.Module, state: dict, exc: RuntimeError) -> str:
    """What torch's load_state_dict error says (a header, then a line per key) in one line."""
    try:  # torch's own lists (a missing BatchNorm counter is no misfit); the net is discarded
        found = net.load_state_dict(state, strict=False)
        missing, unexpected = found.missing_keys, found.unexpected_keys
    except RuntimeError:  # shapes differ too
        missing = unexpected = []
    parts = [f"{len(keys)} {what} tensor{'s' if len(keys) > 1 else ''} ({keys[0]}{', ...' if len(keys) > 1 else ''})"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if not parts:  # the same names in other shapes: torch's first detail line says which
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        parts = lines[1:2] or lines[:1]
    return "; ".join(parts)


def _build(name: str, weights, *, weights_file: Optional[str], pretrained: bool, num_classes: int,
           verify: bool = True) -> torch.nn.Module:
    import torchvision.models.segmentation as seg

    entry = MODELS[name]
    builder = getattr(seg, entry.builder)
    if weights_file is not None:
        state = load_state_dict(weights_file, official=weights, verify=verify)
        aux = any(k.startswith("aux_classifier.") for k in state)
        kwargs = {"aux_loss": True} if aux else {}
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"weights file '{weights_file}' does not fit model {name}: {_misfit(net, state, exc)}") from exc
        return net
    if not pretrained:
        return builder(weights=None, weights_backbone=None, num_classes=num_classes)
    path = _download(name, weights)
    try:
        return _build(name, weights, weights_file=str(path), pretrained=False, num_classes=num_classes,
                      verify=False)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"cached weights '{path}' for {name} cannot be loaded ({exc}); "
            f"delete it to download again, or pass --weights FILE"
        ) from exc


def _download(name: str, weights) -> Path:
    """The official weights file in torchvision's cache (TORCH_HOME), downloaded first if needed,
    with a progress bar and the sha256 prefix of its name checked.

    Not torchvision's own `builder(weights=...)`: that loads the file with plain pickle
    (torch.hub's weights_only=False); here it is loaded like any --weights file, weights only.
    """
    filename = weights.url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / filename
    if path.exists():
        return path
    digest = torch.hub.HASH_REGEX.search(filename)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file beside `path` and moves it there only when complete and checked.
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=digest.group(1) if digest else None,
                                       progress=True)
    # http.client.HTTPException: a connection dropped mid-download (IncompleteRead) is not an OSError.
    except (OSError, RuntimeError, http.client.HTTPException) as exc:
        raise ModelLoadError(
            f"cannot download weights for {name} ({_short(exc)}): put {filename} from {weights.url} "
            f"into {cache}, or pass --weights FILE"
        ) from exc
    return path


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_state_dict(path: str, *, official=None, verify: bool = True) -> dict:
    """A state dict from a local file, loaded with weights_only=True (never plain pickle).

    When the file carries an official torchvision name (…-586e9e4e.pth), the sha256 prefix in
    that name is checked first (`verify`; off for torchvision's cache, checked when downloaded).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"weights file '{path}' not found")
    m = re.search(r"-([0-9a-f]{8,})\.pth$", p.name)
    official_name = official.url.rsplit("/", 1)[-1] if official is not None else None
    if verify and m and (official_name is None or p.name == official_name or "_coco-" in p.name):
        digest = _sha256(p)
        if not digest.startswith(m.group(1)):
            raise ModelLoadError(
                f"weights file '{path}' is damaged or not the official file: sha256 starts with "
                f"{digest[:len(m.group(1))]}, its name says {m.group(1)}"
            )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on files it is about to refuse anyway.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here (UnpicklingError, RuntimeError, ...)
        raise ModelLoadError(f"weights file '{path}' cannot be loaded as a state dict: {_load_failure(exc)}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file '{path}' does not hold a state dict of tensors")
    return state


def _load_failure(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words.

    torch's own message opens with advice to retry with weights_only=False, which would run
    whatever code the file carries: never pass that on.
    """
    text = str(exc)
    if "Weights only load failed" not in text:
        return _short(exc)
    found = re.search(r"unsupported GLOBAL (\S+)", text)
    if found:
        return (f"it holds a reference to {found.group(1)}, which loading with weights_only refuses "
                "(a pickle that could run code); only plain tensors load")
    return "not a PyTorch weights file (or a pickle that loading with weights_only refuses)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OnnxModel:
    """An ONNX segmentation model in onnxruntime; preprocessing from its metadata or overrides."""

    def __init__(
        self,
        path: str,
        *,
        device: torch.device,
        input_size=None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        categories: Optional[Sequence[str]] = None,
        threads: Optional[int] = None,
    ):
        import onnxruntime as ort

        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"ONNX model '{path}' not found")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        elif device.type == "cuda":
            log.warning("onnxruntime has no CUDA provider here; running %s on the CPU", p.name)
            device = torch.device("cpu")
        self._ort = ort
        self._path = p
        self._providers = providers
        self.threads = threads or os.cpu_count() or 1
        self.session = self._session(self.threads)
        self._sessions: dict[int, Any] = {}  # sessions made for other thread counts
        self.name = p.name
        self.device = device
        self.precision = "fp32"
        meta = self.session.get_modelmeta().custom_metadata_map
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = isinstance(inp.shape[0], int) and inp.shape[0] == 1
        self.categories, self.spec = _onnx_spec(path, meta, inp.shape, input_size, mean, std, categories)
        _check_onnx_shapes(path, inp.shape, self.session.get_outputs()[0].shape, self.spec, self.categories)

    def _session(self, threads: int):
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        # No busy-waiting between operators: in a video run, decoding and encoding threads share
        # the cores, and spinning workers took their time (end to end 20 -> 26 frames/s on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(self._path), sess_options=opts, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise ModelLoadError(f"'{self._path}' is not a usable ONNX model: {_short(exc)}") from exc

    def set_threads(self, threads: int) -> None:
        """Run with `threads` intra-op threads from now on. onnxruntime fixes a session's thread
        count when it is made, so this makes a new session (tens of ms for a small model); one
        made before is kept, for a run that tries a thread count and goes back."""
        if threads != self.threads:
            self._sessions[self.threads] = self.session
            self.session = self._sessions.get(threads) or self._session(threads)
            self.threads = threads

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised input -> (N, C, h', w') logits at the model's output size (CPU tensor)."""
        arr = x.detach().cpu().float().numpy()
        if self.fixed_batch and len(arr) > 1:
            outs = [self.session.run(None, {self.input_name: arr[i : i + 1]})[0] for i in range(len(arr))]
            logits = np.concatenate(outs)
        else:
            logits = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(logits)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) normalised input -> (N, h', w') uint8 class ids at the model's output size."""
        return self.logits(x).argmax(1).to(torch.uint8)


def _onnx_spec(path, meta, shape, input_size, mean, std, categories):
    from .config import parse_input_size, parse_triple

    missing = []
    size = input_size if input_size is not None else meta.get("streamseg.input_size")
    if isinstance(size, str):
        size = parse_input_size(size)
    if size is None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        size = (int(shape[3]), int(shape[2]))  # a static NCHW shape says it all
    if size is None:
        missing.append("streamseg.input_size (--input-size)")
    if mean is None and "streamseg.mean" in meta:
        mean = parse_triple(meta["streamseg.mean"], "streamseg.mean")
    if mean is None:
        missing.append("streamseg.mean (--mean)")
    if std is None and "streamseg.std" in meta:
        std = parse_triple(meta["streamseg.std"], "streamseg.std")
    if std is None:
        missing.append("streamseg.std (--std)")
    if categories is None and "streamseg.categories" in meta:
        categories = [c.strip() for c in meta["streamseg.categories"].split(",")]
    if not categories:
        missing.append("streamseg.categories (--categories)")
    if missing:
        raise ModelLoadError(f"ONNX model '{path}' lacks preprocessing metadata: {', '.join(missing)}; pass the flags")
    return tuple(categories), InputSpec(size=size, mean=tuple(mean), std=tuple(std))


def _check_onnx_shapes(path, in_shape, out_shape, spec: InputSpec, categories) -> None:
    """Catch at load time what would otherwise fail deep inside onnxruntime, or silently mislabel."""
    if len(in_shape) == 4 and all(isinstance(d, int) for d in in_shape[2:]):
        static = (int(in_shape[3]), int(in_shape[2]))
        if spec.size != static:
            asked = f"{spec.size[0]}x{spec.size[1]}" if isinstance(spec.size, tuple) else str(spec.size)
            raise ModelLoadError(
                f"ONNX model '{path}' takes a fixed {static[0]}x{static[1]} input; input size {asked} does not fit"
            )
    # One name per output channel: otherwise class ids and names disagree without a word.
    if len(out_shape) == 4 and isinstance(out_shape[1], int) and out_shape[1] != len(categories):
        raise ModelLoadError(
            f"ONNX model '{path}' outputs {out_shape[1]} classes but has {len(categories)} category names"
        )
