"""`Segmenter`: the shared core of every mode. Frame in, `Segmentation` out.

    >>> from streamseg import Segmenter
    >>> seg = Segmenter("deeplabv3_resnet101", device="auto", classes="car")   # doctest: +SKIP
    >>> result = seg(frame_bgr)                                               # doctest: +SKIP
    >>> result.labels.shape == frame_bgr.shape[:2], result.shares             # doctest: +SKIP
    (True, {'car': 0.031})
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import torch

from .labels import palette as make_palette
from .labels import parse_classes
from .model import MODELS, OnnxModel, TorchModel, resolve_device
from .postprocess import labels_at, labels_tensor
from .preprocess import to_input
from .types import Frame, ModelLoadError, Segmentation, UsageError

log = logging.getLogger(__name__)


class Segmenter:
    """Built once from a model name (or an .onnx path), a device and the classes to show.

    Call it on a (H, W, 3) uint8 BGR frame, or a `Frame`; `segment_batch` takes several frames
    of one size. Labels come back at the frame's own resolution.
    """

    def __init__(
        self,
        model: str = "deeplabv3_resnet101",
        *,
        device: str = "auto",
        classes: str = "car",
        weights: Optional[str] = None,
        pretrained: bool = True,
        precision: Optional[str] = None,
        input_size=None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        categories: Optional[Sequence[str]] = None,
        channels_last: bool = True,
        compile: bool = False,
        threads: Optional[int] = None,
    ):
        dev = resolve_device(device)
        #: True when the caller left the model's thread count to streamseg (a video pipeline may
        #: then give one core to the other stages, see `video._Balance`)
        self.auto_threads = threads is None
        threads = _configure_threads(dev, threads)
        if model.lower().endswith(".onnx"):
            # The ONNX file fixes its own weights and number format, and onnxruntime compiles
            # nothing at run time: options that would do nothing say so instead.
            given = [flag for flag, value in (("--weights", weights is not None), ("--precision", precision is not None),
                                              ("--compile", compile)) if value]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise UsageError(f"{' and '.join(given)} {verb} to torchvision models, not to ONNX files")
            try:
                self.model: Union[TorchModel, OnnxModel] = OnnxModel(
                    model, device=dev, input_size=input_size, mean=mean, std=std, categories=categories,
                    threads=threads,
                )
            except ValueError as exc:  # metadata that does not parse
                raise ModelLoadError(f"ONNX model '{model}': {exc}") from exc
        else:
            if model not in MODELS:
                raise UsageError(f"unknown model '{model}'; choose one of {', '.join(MODELS)} or a path to an .onnx file")
            self.model = TorchModel(
                model,
                device=dev,
                precision=precision,
                weights_file=weights,
                pretrained=pretrained,
                channels_last=channels_last,
                compile=compile,
            )
        self.categories: tuple[str, ...] = self.model.categories
        self.selected: tuple[int, ...] = parse_classes(classes, self.categories)
        self.palette = make_palette(self.categories)
        self.device = self.model.device
        #: the model's CPU threads (torch's intra-op pool, or onnxruntime's)
        self.threads = threads
        self._tables = None  # the painter's colour tables on the device, uploaded once

    @property
    def spec(self):
        return self.model.spec

    def set_threads(self, threads: int) -> None:
        """Give the model `threads` CPU threads from now on (between two forward passes)."""
        if threads < 1:
            raise ValueError(f"threads must be 1 or more, got {threads}")
        if isinstance(self.model, OnnxModel):
            self.model.set_threads(threads)
        elif self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.threads = threads

    def __call__(self, frame: Union[np.ndarray, Frame]) -> Segmentation:
        return self.segment_batch([frame])[0]

    def segment_batch(self, frames: Sequence[Union[np.ndarray, Frame]]) -> list[Segmentation]:
        """Segment frames of one size in one model call (none: an empty list)."""
        if len(frames) == 0:
            return []
        return self.infer(frames).result()

    def infer(
        self, frames: Sequence[Union[np.ndarray, Frame]], *, prepared: Optional[Sequence[torch.Tensor]] = None
    ) -> "PendingSegmentation":
        """The model's part of `segment_batch`: the forward pass, after `prepare` unless the
        frames come `prepared` already (one `prepare` result per frame, or one for all). The label maps are made by the returned object's
        `result()`. A video pipeline runs the three parts in three threads, so that the model's
        thread runs nothing but the model."""
        frames = [f if isinstance(f, Frame) else Frame(image=_check_image(f), index=i, timestamp_s=0.0) for i, f in enumerate(frames)]
        if prepared is None:
            x = self.prepare([f.image for f in frames])
        else:
            x = prepared[0] if len(prepared) == 1 else torch.cat(list(prepared))
        return PendingSegmentation(self, frames, self.model.logits(x))

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 BGR images of one size -> the model's normalised input on its device."""
        m = self.model
        use_cl = isinstance(m, TorchModel) and m.channels_last
        dtype = m.dtype if isinstance(m, TorchModel) else torch.float32
        return to_input(images, m.spec, device=m.device, dtype=dtype, channels_last=use_cl)

    def labels(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 BGR images of one size -> (H, W) uint8 label maps at that size."""
        # Bilinear logits at the frame's size, argmax; on a GPU on the device, then one download.
        return labels_at(self.model.logits(self.prepare(images)), images[0].shape[:2])


    def render(self, frames: Sequence[Frame], painter, *, on_device: Optional[bool] = None) -> list[tuple[Segmentation, np.ndarray]]:
        """Segment frames of one size and paint them: [(Segmentation, (H, W, 3) uint8 BGR overlay)].

        With a torch model on CUDA (or `on_device=True`), everything after the single upload runs
        on the device: resize, normalisation, model, the logits' resize to frame size, argmax,
        colouring and blending; overlay and label map come back in one uint8 download per frame.
        Elsewhere the CPU path does the same with `painter.blend`.
        """
        m = self.model
        if on_device is None:
            on_device = isinstance(m, TorchModel) and m.device.type == "cuda"
        if not on_device or not isinstance(m, TorchModel):
            return [(seg, painter.blend(seg.frame.image, seg.labels)) for seg in self.segment_batch(frames)]
        from .overlay_torch import blend_tensor, device_tables
        from .preprocess import tensor_to_input, upload

        height, width = frames[0].image.shape[:2]
        key = (id(painter), m.device)
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, device_tables(painter.lut, painter.mask_lut, m.device))
        lut, selected = self._tables[1]
        with torch.inference_mode():
            batch = upload([f.image for f in frames], m.device)
            logits = m.logits(tensor_to_input(batch, m.spec, dtype=m.dtype, channels_last=m.channels_last))
            labels = labels_tensor(logits, (height, width))
            overlay = blend_tensor(batch, labels, lut, selected, painter.alpha)
            packed = torch.cat([overlay, labels[..., None]], dim=-1).cpu().numpy()  # one download
        return [
            (
                Segmentation(frame=f, labels=np.ascontiguousarray(p[..., 3]), categories=self.categories, selected=self.selected),
                np.ascontiguousarray(p[..., :3]),
            )
            for f, p in zip(frames, packed)
        ]


class PendingSegmentation:
    """Frames whose logits are computed and whose label maps are not made yet (`Segmenter.infer`)."""

    def __init__(self, segmenter: Segmenter, frames: list[Frame], logits: torch.Tensor):
        self._segmenter = segmenter
        self._frames = frames
        self._logits: Optional[torch.Tensor] = logits
        self._result: Optional[list[Segmentation]] = None

    def __len__(self) -> int:
        return len(self._frames)

    def result(self) -> list[Segmentation]:
        """One `Segmentation` per frame, made on the first call (by one thread at a time)."""
        if self._result is None:
            seg = self._segmenter
            labels = labels_at(self._logits, self._frames[0].image.shape[:2])
            self._result = [
                Segmentation(frame=f, labels=lab, categories=seg.categories, selected=seg.selected)
                for f, lab in zip(self._frames, labels)
            ]
            self._logits = None  # the logits' memory goes as soon as the maps exist
        return self._result


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        if image is None:  # what cv2.imread returns for a file it cannot read
            got = "None (cv2.imread gives None for a file it cannot read)"
        elif isinstance(image, np.ndarray):
            got = f"a {image.shape} {image.dtype} array"
        else:
            got = type(image).__name__
        raise ValueError(f"expected a (H, W, 3) uint8 BGR array, got {got}")
    return image


def _configure_threads(device: torch.device, threads: Optional[int]) -> int:
    """One owner for the CPU cores: the model's intra-op pool gets `threads` of them (default:
    all); OpenCV's own pool, which would fight it on a 2-core machine, is limited to one thread.
    Returns the model's thread count."""
    threads = threads or max(1, os.cpu_count() or 1)
    if device.type == "cpu":
        cv2.setNumThreads(1)
        torch.set_num_threads(threads)
    return threads
