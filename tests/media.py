"""Test videos written with PyAV: one encoding loop for every synthetic clip the tests make."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import av
import numpy as np


#: When the tone of make_sound_source starts, in seconds.
BURST_S = 0.4


def encode_video(path: Path, images: Iterable[np.ndarray], *, width: int, height: int,
                 rate: Union[int, Fraction] = 25, codec: str = "libx264", pix_fmt: str = "yuv420p",
                 options: Optional[Mapping[str, str]] = None, container_format: Optional[str] = None,
                 container_options: Optional[Mapping[str, str]] = None) -> Path:
    """Encode (height, width, 3) uint8 BGR `images` as `codec` into `path`; returns `path`."""
    with av.open(str(path), "w", format=container_format, options=dict(container_options or {})) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = dict(options)
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded_frames(path: Path) -> int:
    """How many frames PyAV decodes from `path`."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def make_sound_source(path: Path, *, audio: str, container: str, frames: int = 25, layout: str = "stereo",
                      sample_rate: int = 48000, tracks: int = 1) -> Path:
    """A 64x48, 25 fps video with an `audio` track exactly as long as it: silence, then from
    BURST_S on a 440 Hz tone, so where the sound sits in time can be read back. `tracks` > 1:
    that many such tracks (a film's language or commentary tracks)."""
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sounds = [out.add_stream(audio, rate=sample_rate) for _ in range(tracks)]
        for sound in sounds:
            sound.layout = layout
        for i in range(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * i, np.uint8), "bgr24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        total = frames * sample_rate // 25
        t = np.arange(total) / sample_rate
        pcm = np.where(t >= BURST_S, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
        for sound in sounds:
            channels = sound.codec_context.layout.nb_channels
            for start in range(0, total, 1024):
                frame = av.AudioFrame.from_ndarray(np.repeat(pcm[None, start:start + 1024], channels, axis=0),
                                                   format="fltp", layout=layout)
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path



def sound_onset_s(path: Path) -> float:
    """When the tone of make_sound_source starts, in seconds of the file's own timeline."""
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.audio[0]):
            samples = np.abs(frame.to_ndarray().astype(np.float32))
            if not frame.format.is_planar:  # interleaved: one row, channels side by side
                samples = samples.reshape(-1, len(frame.layout.channels)).T
            if frame.format.name.startswith("s16"):
                samples /= 32768
            loud = np.nonzero(samples.max(axis=0) > 0.1)[0]
            if loud.size:
                return float(frame.pts * frame.time_base) + loud[0] / frame.sample_rate
    raise AssertionError(f"no tone in {path}")


def make_vfr_video(path: Path, times_s: Iterable[float], *, width: int = 64, height: int = 48,
                   audio: bool = True) -> Path:
    """An H.264 MP4 whose frame i is shown at times_s[i] (a variable frame rate) and is a flat grey
    of level 20 + 2 * i, with (audio=True) a 440 Hz AAC tone from 0 to the end, as mk_vfr_audio does."""
    times = list(times_s)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast"}
        video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        sound = None
        if audio:
            sound = out.add_stream("aac", rate=48000)
            sound.layout = "mono"
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 + 2 * i, np.uint8), format="bgr24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None:
            total = round((times[-1] + 0.2) * 48000)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / 48000)).astype(np.float32)
            for start in range(0, total, 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def frame_times_s(path: Path) -> list[float]:
    """When each video frame of `path` is shown, in seconds, in display order."""
    with av.open(str(path)) as container:
        return [float(f.pts * f.time_base) for f in container.decode(video=0)]
