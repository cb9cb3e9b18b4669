#!/usr/bin/env python3
"""Draw the media that ships in sample_media/: a synthetic road scene as stills and as a short
MP4 with a sine-tone audio track. Everything is drawn here, so the project may ship it.

    python scripts/make_sample_media.py [OUT_DIR]
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


def scene(t: float) -> np.ndarray:
    """(H, W, 3) uint8 BGR road scene at time t seconds: sky, hills, road, lane marks, two cars."""
    img = np.zeros((H, W, 3), np.uint8)
    for y in range(H // 2):  # sky gradient
        img[y] = (235 - y // 3, 200 - y // 4, 150 - y // 5)
    hills = np.array([[0, 180], [120, 140], [260, 170], [400, 130], [640, 175], [640, 200], [0, 200]], np.int32)
    cv2.fillPoly(img, [hills], (60, 110, 70))
    img[200:] = (70, 70, 72)  # road
    horizon = (W // 2, 200)
    for x0 in (-200, W + 200):
        cv2.line(img, (x0, H), horizon, (200, 200, 200), 3)
    for k in range(8):  # dashes moving towards the viewer
        f = ((k / 8) + t * 0.5) % 1.0
        y1, y2 = int(200 + 160 * f**2), int(200 + 160 * min(1.0, (f + 0.05)) ** 2)
        cv2.line(img, (W // 2, y1), (W // 2, y2), (240, 240, 240), max(1, int(6 * f)))
    car(img, cx=int(420 + 20 * np.sin(t)), base=300, width=170, body=(40, 40, 180))
    car(img, cx=int(230 - 10 * t), base=250, width=90, body=(200, 200, 205))
    return img


def car(img: np.ndarray, *, cx: int, base: int, width: int, body: tuple[int, int, int]) -> None:
    h = int(width * 0.55)
    x0, x1 = cx - width // 2, cx + width // 2
    cv2.rectangle(img, (x0, base - h // 2), (x1, base), body, -1)
    roof = np.array([[x0 + width // 6, base - h // 2], [x0 + width // 4, base - h], [x1 - width // 4, base - h], [x1 - width // 6, base - h // 2]], np.int32)
    cv2.fillPoly(img, [roof], body)
    cv2.fillPoly(img, [roof + np.array([[4, -2], [5, 5], [-5, 5], [-4, -2]], np.int32)], (90, 60, 40))
    for wx in (x0 + width // 5, x1 - width // 5):
        cv2.circle(img, (wx, base), width // 9, (20, 20, 20), -1)
    cv2.rectangle(img, (x0 + 6, base - h // 3), (x0 + 6 + width // 8, base - h // 3 + 8), (0, 0, 230), -1)
    cv2.rectangle(img, (x1 - 6 - width // 8, base - h // 3), (x1 - 6, base - h // 3 + 8), (0, 0, 230), -1)


def write_video(path: Path) -> None:
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        v = out.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = out.add_stream("aac", rate=44100)
        a.layout = "mono"
        for i in range(int(FPS * SECONDS)):
            frame = av.VideoFrame.from_ndarray(scene(i / float(FPS)), format="bgr24")
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
    cv2.imwrite(str(out / "road_1.png"), scene(0.0))
    cv2.imwrite(str(out / "road_2.png"), scene(1.5))
    write_video(out / "road.mp4")
    print(f"wrote road_1.png, road_2.png, road.mp4 to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
