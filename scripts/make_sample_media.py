#!/usr/bin/env python3
"""Draw the media that ships in sample_media/: a synthetic dashcam view of a road with two cars
seen from behind, as stills and as a short MP4 with a sine-tone audio track. Everything is drawn
here, so the project may ship it.

    python scripts/make_sample_media.py [OUT_DIR]

The cars are shaded, glazed, lit and cast a shadow, and the picture carries a little sensor
noise: flat cartoon cars are not cars to a segmentation model trained on photographs (the
earlier flat drawing gave no class at all with the small MobileNetV2 model in ../shared/models).
"""
from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

W, H = 640, 360
FPS = Fraction(24)
SECONDS = 2
SS = 2  # drawn at twice the size, then reduced: smooth edges
HORIZON = 190
GRASS = (60, 110, 80)
GLASS_TOP, GLASS_BOT = (140, 128, 120), (70, 64, 60)
Point = tuple[float, float]


def _shade(color: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in color)  # type: ignore[return-value]


def _pts(points: list[Point]) -> np.ndarray:
    return np.round(np.array(points) * SS).astype(np.int32)


def _poly(img: np.ndarray, points: list[Point], color: tuple[int, int, int]) -> None:
    cv2.fillPoly(img, [_pts(points)], color, cv2.LINE_AA)


def _rrect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, r: float, color: tuple[int, int, int]) -> None:
    """A filled rectangle with corners rounded by radius r (all in 1x pixels)."""
    x0, y0, x1, y1, r = (int(round(v * SS)) for v in (x0, y0, x1, y1, r))
    r = max(1, min(r, (x1 - x0) // 2, (y1 - y0) // 2))
    cv2.rectangle(img, (x0 + r, y0), (x1 - r, y1), color, -1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0 + r), (x1, y1 - r), color, -1, cv2.LINE_AA)
    for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)


def _blend(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """img = img * (1 - alpha) + color * alpha, alpha (h, w) in [0, 1], color broadcastable."""
    a = alpha[..., None]
    img[:] = (img * (1 - a) + color * a).astype(np.uint8)


def car(img: np.ndarray, *, cx: float, base: float, w: float, color: tuple[int, int, int]) -> None:
    """A car seen from behind, w pixels wide, its tyres on the line y = base (1x pixels)."""
    x0, x1 = cx - w / 2, cx + w / 2
    shadow = np.zeros(img.shape[:2], np.float32)
    cv2.ellipse(shadow, (int(cx * SS), int((base - 0.01 * w) * SS)), (int(0.56 * w * SS), int(0.07 * w * SS)), 0, 0, 360, 1.0, -1)
    _blend(img, 0.7 * cv2.GaussianBlur(shadow, (0, 0), 0.03 * w * SS), np.zeros(3, np.float32))
    for a in (x0 + 0.05 * w, x1 - 0.21 * w):  # tyres
        _rrect(img, a, base - 0.16 * w, a + 0.16 * w, base, 0.03 * w, (22, 22, 24))
    # cabin, then the rear window: a glass gradient with the sky reflected in one corner
    _poly(img, [(x0 + 0.08 * w, base - 0.56 * w), (x0 + 0.2 * w, base - 0.8 * w), (x1 - 0.2 * w, base - 0.8 * w), (x1 - 0.08 * w, base - 0.56 * w)], _shade(color, 0.85))
    glass = np.zeros(img.shape[:2], np.uint8)
    cv2.fillPoly(glass, [_pts([(x0 + 0.16 * w, base - 0.58 * w), (x0 + 0.245 * w, base - 0.77 * w), (x1 - 0.245 * w, base - 0.77 * w), (x1 - 0.16 * w, base - 0.58 * w)])], 255, cv2.LINE_AA)
    y = np.linspace(0, 1, img.shape[0], dtype=np.float32)[:, None, None]
    _blend(img, glass.astype(np.float32) / 255, np.array(GLASS_TOP, np.float32) * (1 - y) + np.array(GLASS_BOT, np.float32) * y)
    _poly(img, [(x0 + 0.3 * w, base - 0.77 * w), (x0 + 0.42 * w, base - 0.77 * w), (x0 + 0.3 * w, base - 0.58 * w), (x0 + 0.2 * w, base - 0.58 * w)], (95, 85, 80))
    for a in (x0 - 0.035 * w, x1 - 0.045 * w):  # door mirrors
        _rrect(img, a, base - 0.63 * w, a + 0.08 * w, base - 0.56 * w, 0.015 * w, _shade(color, 0.75))
    # body, lit from above: lighter at the boot lid, darker towards the road
    _rrect(img, x0, base - 0.57 * w, x1, base - 0.12 * w, 0.07 * w, color)
    r0, r1, c0, c1 = int((base - 0.57 * w) * SS), int((base - 0.12 * w) * SS), int(x0 * SS), int(x1 * SS)
    band = img[r0:r1, c0:c1].astype(np.float32)
    light = np.linspace(1.15, 0.7, r1 - r0, dtype=np.float32)[:, None, None]
    is_body = np.all(band == np.array(color, np.float32), axis=2, keepdims=True)
    img[r0:r1, c0:c1] = np.where(is_body, np.clip(band * light, 0, 255), band).astype(np.uint8)
    y_lid = int((base - 0.5 * w) * SS)
    cv2.line(img, (int((x0 + 0.1 * w) * SS), y_lid), (int((x1 - 0.1 * w) * SS), y_lid), _shade(color, 1.5), max(1, int(0.012 * w * SS)), cv2.LINE_AA)
    for a, b in ((x0 + 0.02 * w, x0 + 0.25 * w), (x1 - 0.25 * w, x1 - 0.02 * w)):  # tail lights
        _rrect(img, a, base - 0.49 * w, b, base - 0.4 * w, 0.02 * w, (20, 20, 150))
        _rrect(img, a + 0.03 * w, base - 0.47 * w, b - 0.03 * w, base - 0.43 * w, 0.01 * w, (60, 60, 235))
    _rrect(img, cx - 0.13 * w, base - 0.37 * w, cx + 0.13 * w, base - 0.29 * w, 0.005 * w, (225, 228, 230))  # plate
    for k in range(6):
        a = cx - 0.11 * w + k * 0.037 * w
        _rrect(img, a, base - 0.355 * w, a + 0.022 * w, base - 0.305 * w, 0.002 * w, (40, 40, 40))
    _rrect(img, x0 + 0.03 * w, base - 0.2 * w, x1 - 0.03 * w, base - 0.12 * w, 0.03 * w, (35, 35, 38))  # bumper


def scene(t: float, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 BGR dashcam view at time t seconds: sky, hills, trees, a three-lane road,
    a red car ahead in this lane and a white one in the next lane to the left."""
    img = np.zeros((H * SS, W * SS, 3), np.uint8)
    k = np.linspace(0, 1, HORIZON * SS, dtype=np.float32)[:, None]
    img[: HORIZON * SS] = (np.array([235, 190, 140], np.float32) + k * np.array([-50, -20, 10], np.float32))[:, None, :].astype(np.uint8)
    _poly(img, [(0, 160), (90, 140), (200, 155), (330, 128), (470, 150), (640, 138), (640, HORIZON), (0, HORIZON)], (95, 120, 110))
    treeline = [(float(x), 170 - 8 * np.sin(x / 9.0) - 4 * np.sin(x / 3.1)) for x in range(0, W + 1, 4)]
    _poly(img, [(0, 175), *treeline, (W, HORIZON), (0, HORIZON)], (45, 85, 55))
    img[HORIZON * SS :] = (88, 90, 92)  # asphalt
    vx = W / 2  # vanishing point (vx, HORIZON)
    _poly(img, [(0, HORIZON), (vx, HORIZON), (-500, H), (0, H)], GRASS)
    _poly(img, [(vx, HORIZON), (W, HORIZON), (W, H), (1200, H)], GRASS)
    for xb in (-500, 1200):  # road edges
        _poly(img, [(vx - 1, HORIZON), (vx + 1, HORIZON), (xb + 6, H), (xb - 6, H)], (215, 215, 215))
    depth = H - HORIZON
    for i in range(10):  # lane dashes, coming towards the viewer
        f = (i / 10 + t * 0.6) % 1.0
        y1, y2 = HORIZON + depth * f**2, HORIZON + depth * min(1.0, f + 0.045) ** 2
        for xb in (155, 655):
            xa, xc = vx + (xb - vx) * (y1 - HORIZON) / depth, vx + (xb - vx) * (y2 - HORIZON) / depth
            half = 1 + 5 * (y2 - HORIZON) / depth
            _poly(img, [(xa - 0.6 * half, y1), (xa + 0.6 * half, y1), (xc + half, y2), (xc - half, y2)], (225, 225, 225))
    car(img, cx=180 - 10 * t, base=262, w=120, color=(205, 205, 210))
    car(img, cx=420 + 15 * np.sin(t), base=312, w=240, color=(40, 40, 175))
    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(seed).normal(0, 3.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_video(path: Path) -> None:
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = out.add_stream("aac", rate=44100)
        a.layout = "mono"
        for i in range(int(FPS * SECONDS)):
            frame = av.VideoFrame.from_ndarray(scene(i / float(FPS), seed=i), format="bgr24")
            for p in v.encode(frame):
                out.mux(p)
        samples = 44100 * SECONDS
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 44100)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = tone[start : start + 1024][None]
            af = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
            af.sample_rate, af.pts = 44100, start
            for p in a.encode(af):
                out.mux(p)
        for stream in (v, a):
            for p in stream.encode(None):
                out.mux(p)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "sample_media")
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "road_1.jpg"), scene(0.0), [cv2.IMWRITE_JPEG_QUALITY, 92])
    cv2.imwrite(str(out / "road_2.jpg"), scene(1.5, seed=1), [cv2.IMWRITE_JPEG_QUALITY, 92])
    write_video(out / "road.mp4")
    print(f"wrote road_1.jpg, road_2.jpg, road.mp4 to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
