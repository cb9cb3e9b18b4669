"""CUDA paths. They run where a GPU is present and skip with a reason elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamseg.overlay import Painter
from streamseg.preprocess import to_input
from streamseg.segmenter import Segmenter
from streamseg.types import Frame

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]


def _photo(h=360, w=640):
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def test_preprocessing_on_cuda_matches_the_cpu():
    from streamseg.model import spec_from_weights, weights_for

    spec = spec_from_weights(weights_for("deeplabv3_resnet101"))
    img = _photo()
    cpu = to_input([img], spec)
    gpu = to_input([img], spec, device=torch.device("cuda")).cpu()
    assert cpu.shape == gpu.shape
    assert (cpu - gpu).abs().mean() < 0.01


def test_fp16_labels_agree_with_fp32():
    img = _photo()
    fp32 = Segmenter("deeplabv3_resnet101", device="cuda", precision="fp32", pretrained=False, classes="all")
    fp16 = Segmenter("deeplabv3_resnet101", device="cuda", precision="fp16", pretrained=False, classes="all")
    fp16.model.net.load_state_dict(fp32.model.net.state_dict())  # same random weights
    a, b = fp32(img).labels, fp16(img).labels
    assert (a == b).mean() >= 0.99


def test_render_on_cuda_equals_the_cpu_painter():
    seg = Segmenter("lraspp_mobilenet_v3_large", device="cuda", pretrained=False, classes="all")
    painter = Painter(selected=seg.selected, palette=seg.palette, alpha=0.5)
    frames = [Frame(image=_photo(), index=i, timestamp_s=0.0) for i in range(4)]
    for s, overlay in seg.render(frames, painter):
        want = painter.blend(s.frame.image, s.labels)
        assert np.abs(overlay.astype(int) - want).max() <= 1
