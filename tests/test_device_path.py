"""The device fast path (upload once, paint on the device, one download) checked on the CPU.

On CUDA it is the default for torch models; here the same torch code runs with
`on_device=True`, so the arithmetic is held against the CPU painter without a GPU.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamseg.overlay import Painter
from streamseg.overlay_torch import blend_tensor, device_tables
from streamseg.labels import palette
from streamseg.segmenter import Segmenter
from streamseg.types import Frame, VideoInfo
from streamseg.video import VideoOutputs, VideoPipeline, VideoSettings

VOC = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
       "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def test_blend_tensor_matches_the_cpu_painter():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    labels = rng.integers(0, 21, (2, 37, 53), dtype=np.uint8)
    painter = Painter(selected=(7, 15, 6), palette=palette(VOC), alpha=0.35)
    lut, sel = device_tables(painter.lut, painter.mask_lut, torch.device("cpu"))
    got = blend_tensor(torch.from_numpy(frames), torch.from_numpy(labels), lut, sel, painter.alpha).numpy()
    for i in range(2):
        want = painter.blend(frames[i], labels[i])
        assert np.abs(got[i].astype(int) - want).max() <= 1
        untouched = ~np.isin(labels[i], (7, 15, 6))
        assert np.array_equal(got[i][untouched], frames[i][untouched])


@pytest.fixture(scope="module")
def segmenter():
    # classes=all: a randomly initialised model labels most pixels with one class or another.
    torch.manual_seed(0)
    return Segmenter("lraspp_mobilenet_v3_large", device="cpu", pretrained=False, classes="all")


def test_render_on_device_equals_the_cpu_path(segmenter):
    rng = np.random.default_rng(2)
    frames = [Frame(image=rng.integers(0, 256, (90, 161, 3), dtype=np.uint8), index=i, timestamp_s=i / 25) for i in range(3)]
    painter = Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=0.5)
    cpu = segmenter.render(frames, painter, on_device=False)
    dev = segmenter.render(frames, painter, on_device=True)
    for (s1, o1), (s2, o2) in zip(cpu, dev):
        assert s2.labels.shape == (90, 161) and s2.labels.dtype == np.uint8
        # The two paths preprocess with different (equally correct) arithmetic; a pixel where two
        # classes' resized logits tie to ~1e-5 may go either way.
        same = s1.labels == s2.labels
        assert same.mean() > 0.998
        assert np.abs(o1.astype(int) - o2)[same].max() <= 1
        assert o2.flags.c_contiguous and o2.shape == (90, 161, 3)


class _Frames:
    """A file-like source of synthetic frames: what VideoPipeline needs of a VideoSource."""

    def __init__(self, n: int):
        self.info = VideoInfo(width=96, height=64, fps=25.0, frame_count=n, live=False, name="synthetic")
        self._n, self._i = n, 0
        self._rng = np.random.default_rng(3)

    def read(self):
        if self._i >= self._n:
            return None
        f = Frame(image=self._rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), index=self._i, timestamp_s=self._i / 25)
        self._i += 1
        return f

    def grab(self):
        return None if self.read() is None else self._i - 1

    def close(self):
        pass


class _Collect:
    width, height = 96, 64

    def __init__(self):
        self.frames = []

    @property
    def frames_written(self):
        return len(self.frames)

    def write(self, image, timestamp_s=None):
        self.frames.append(image.copy())


@pytest.mark.parametrize("stride", [1, 2])
def test_pipeline_paints_on_device_like_on_the_cpu(segmenter, stride):
    painter = Painter(selected=segmenter.selected, palette=segmenter.palette, alpha=0.5)
    results = []
    rendered = []
    render = segmenter.render

    def counting_render(frames, *args, **kwargs):
        rendered.extend(f.index for f in frames)
        return render(frames, *args, **kwargs)

    for on_device in (False, True):
        out = _Collect()
        settings = VideoSettings(stride=stride, batch=3, paint_on_device=on_device)
        segmenter.render = counting_render
        try:
            report = VideoPipeline(_Frames(10), segmenter, VideoOutputs(writer=out), settings, painter=painter).run()
        finally:
            del segmenter.render
        results.append(out.frames)
        # Each frame to segment goes to the model once, whichever path paints it.
        assert report.frames_segmented == len(range(0, 10, stride))
    assert rendered == list(range(0, 10, stride))
    assert len(results[0]) == len(results[1]) == 10
    for a, b in zip(*results):
        # Equal to +-1 but for the rare pixel where two classes tie (see the test above).
        assert (np.abs(a.astype(int) - b).max(axis=2) > 1).mean() < 0.002
    assert not [t for t in threading.enumerate() if t.name.startswith("streamseg-")]
