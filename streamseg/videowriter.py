"""MP4 output that browsers play: H.264 through PyAV, with the source's audio copied through.

    with VideoWriter(Path("out.mp4"), width=640, height=360, fps=30000 / 1001, audio_from=src) as w:
        for image in images:      # (360, 640, 3) uint8 BGR
            w.write(image)

Policy, in one place:

* The file is written under a hidden temporary name next to `path` (``.out.mp4.<random>.part.mp4``) and
  renamed over `path` only by close(), so a crash never leaves a half-written file under the real name.
* H.264 (libx264), yuv420p, BT.601 matrix, limited range, tagged as such, ``movflags=+faststart`` so the
  index (moov) sits in front of the data and a browser can start playing before the download ends.
  OpenCV converts BGR to 4:2:0 (0.6 ms per 720p frame, where swscale through PyAV takes 3 ms); its
  conversion is BT.601, and the stream says so, so players use the same matrix back.
* Encoder speed: `auto_preset()` picks ``ultrafast`` when the model runs on the CPU (the encoder
  shares the cores with it: 7 ms per 720p frame against 29 ms for ``veryfast``, for files about 1.8x
  larger at the same CRF) and ``veryfast`` when a GPU runs the model.
* Timing is exact: fps becomes a fraction (29.97002997 -> 30000/1001, 25.0 -> 25). A frame written
  with its source timestamp keeps it, so a variable-frame-rate video stays in sync with its audio;
  a timestamp within a millisecond of the nominal grid n/fps is put exactly on it, so a
  constant-rate source keeps its frame count, rate and duration exactly. A frame without one
  follows the previous frame by 1/fps. (The 'mp4v' fallback writes every frame 1/fps apart.)
* Odd sizes: H.264 4:2:0 cannot describe an odd width or height (its cropping window counts in
  2-pixel units), so an odd frame is padded right/bottom by one replicated pixel: 641x361 -> 642x362.
* Audio from `audio_from`, interleaved with the video as frames arrive: AAC, MP3 and Opus (what MP4
  carries and Chrome, Firefox and Safari play there) are remuxed packet by packet, untouched; any
  other codec (PCM, AC-3, FLAC, Vorbis ...) is decoded and re-encoded to AAC, with one info line,
  keeping its offset to the video and its length. If fewer frames are written than the source
  holds, the audio stops at the video's end. Audio that cannot be decoded or encoded is dropped
  with one warning: the video is written without it.
* If libx264 cannot be opened (PyAV missing, encoder not built in), or ``STREAMSEG_FORCE_MP4V=1`` is set,
  OpenCV writes MPEG-4 Part 2 ('mp4v') instead, video only, with one warning.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import numbers
import os
import secrets
import shutil
import time
import weakref
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Optional

import cv2
import numpy as np

from .config import X264_PRESETS
from .types import SinkError

log = logging.getLogger(__name__)

#: Set to 1 to skip libx264 and write with OpenCV's 'mp4v' (for tests and broken PyAV installs).
FORCE_MP4V_ENV = "STREAMSEG_FORCE_MP4V"

DEFAULT_CRF = 20


def auto_preset(model_device_type: str) -> str:
    """The libx264 preset for a run whose model runs on `model_device_type` ('cpu', 'cuda', ...).

    With the model on the CPU, encoding competes with it for the same cores, and ``veryfast``
    costs a light model half its speed; a GPU leaves the cores to the encoder.
    """
    return "ultrafast" if model_device_type == "cpu" else "veryfast"


def exact_rate(fps: float) -> Fraction:
    """fps as the fraction a container can hold exactly: 29.97002997 -> 30000/1001, 25.0 -> 25."""
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:  # an fps below 1/1001 rounds to zero
        raise ValueError(f"fps {fps!r} is too small to write")
    return rate


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _AudioCopy:
    """Remuxes the audio packets of one source file into an output stream, in time order."""

    def __init__(self, source: Any, in_stream: Any, out_stream: Any, video_start_s: Fraction,
                 video_duration_s: Optional[Fraction], read_errors: tuple[type[BaseException], ...]) -> None:
        self._source = source
        self._read_errors = read_errors
        self._in = in_stream
        self._out = out_stream
        self._tb: Fraction = in_stream.time_base
        # The output video starts at the source video's first frame; audio keeps its offset to it.
        self._shift = round(video_start_s / self._tb)
        self.video_duration_s = video_duration_s
        self._packets: Iterator[Any] = source.demux(in_stream)
        self._pending: Any = None
        self._done = False

    def _next(self) -> Any:
        if self._pending is None and not self._done:
            try:
                for packet in self._packets:
                    if packet.size == 0:  # demux ends with an empty flush packet: nothing to copy
                        continue
                    if packet.pts is None and packet.dts is None:
                        continue  # cannot be placed in time; a decoder would drop it too
                    self._pending = packet
                    break
                else:
                    self._done = True
            except self._read_errors as error:
                # A damaged source costs the rest of the audio, not the video being written.
                log.warning("cannot read more audio from %s (%s); the rest of the output is silent",
                            self._source.name, error)
                self._done = True
        return self._pending

    def copy_until(self, container: Any, end_s: Optional[Fraction]) -> None:
        """Mux every packet that starts before `end_s` (seconds of output time; None: all of them)."""
        while (packet := self._next()) is not None:
            start = packet.pts if packet.pts is not None else packet.dts
            # Compare the packet's middle: whole packets only (no re-encode), so the audio ends
            # within half a packet (about 10 ms for AAC) of the cut.
            middle = start - self._shift + (packet.duration or 0) / 2
            if end_s is not None and middle * self._tb >= end_s:
                return
            self._pending = None
            if packet.pts is not None:
                packet.pts -= self._shift
            if packet.dts is not None:
                packet.dts -= self._shift
            packet.stream = self._out
            container.mux(packet)

    def finish(self, container: Any, end_s: Optional[Fraction]) -> None:
        """The last call: mux what is left up to `end_s` (None: all of it)."""
        self.copy_until(container, end_s)

    def close(self) -> None:
        self._source.close()


#: Audio codecs that MP4 carries and that Chrome, Firefox and Safari all play there: copied untouched.
#: Anything else (PCM, AC-3, FLAC, Vorbis, ...) plays in some browsers or none, so it becomes AAC.
BROWSER_AUDIO = frozenset({"aac", "mp3", "opus"})


#: Audio packets read, before the output is started, to prove the audio decodes at all (a damaged
#: track is not read to its end to find that out).
_FIRST_AUDIO_PACKETS = 64


class _AudioUnusable(Exception):
    """The source's audio cannot be decoded, or AAC cannot be encoded from it."""


class _AudioEncode:
    """Decodes the audio of one source file and encodes it as AAC into the output, in time order.

    The samples stay continuous from the source's first audio frame on, which keeps its offset to
    the video (placed as _AudioCopy places packets); the sample rate is kept where AAC has it
    (48 kHz otherwise), and so are the channels where AAC can hold their layout (stereo otherwise).
    """

    def __init__(self, av: Any, source: Any, in_stream: Any, container: Any, video_start_s: Fraction,
                 video_duration_s: Optional[Fraction], read_errors: tuple[type[BaseException], ...]) -> None:
        self._source = source
        self._read_errors = read_errors
        self.video_duration_s = video_duration_s
        self._packets: Iterator[Any] = source.demux(in_stream)
        self._decoded: list[Any] = []  # source frames decoded but not yet resampled
        self._done = False
        try:
            # Decoded before the output's header is written, so that audio which cannot be read
            # costs the audio track, not the run.
            first = self._decode_more(limit=_FIRST_AUDIO_PACKETS)
        except read_errors as error:
            raise _AudioUnusable(f"cannot decode it: {error}") from error
        if first is None:
            raise _AudioUnusable(f"none of its first {_FIRST_AUDIO_PACKETS} packets decodes")
        ctx = in_stream.codec_context
        rates = av.codec.Codec("aac", "w").audio_rates or ()
        self.rate = ctx.sample_rate if ctx.sample_rate in rates else 48000
        self._out = self._open_encoder(av, container, first.layout)
        self.layout = self._out.codec_context.layout.name
        size = self._out.codec_context.frame_size or 1024
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.rate, frame_size=size)
        # Output time of the first sample: the first frame's offset to the video's first frame.
        start = first.pts * first.time_base if first.pts is not None and first.time_base else Fraction(0)
        self._next_pts = round((start - video_start_s) * self.rate)
        self._ready: list[Any] = []  # resampled AAC-sized frames, pts set, not yet encoded
        self._flushed = False

    def _open_encoder(self, av: Any, container: Any, layout: Any) -> Any:
        """An AAC stream in `container`, with the source's channel layout where AAC can hold it
        (tried on a stand-alone encoder first: a stream once added cannot be taken out again)."""
        errors = []
        for name in dict.fromkeys((layout.name, "stereo" if layout.nb_channels > 1 else "mono")):
            trial = av.CodecContext.create("aac", "w")
            try:
                trial.sample_rate, trial.layout, trial.format = self.rate, name, "fltp"
                trial.open()
            except (ValueError, av.FFmpegError) as error:
                errors.append(f"{name}: {error}")
                continue
            stream = container.add_stream("aac", rate=self.rate)
            stream.layout = name
            stream.codec_context.open()
            return stream
        raise _AudioUnusable("AAC cannot encode its channels (" + "; ".join(errors) + ")")

    def _decode_more(self, limit: Optional[int] = None) -> Optional[Any]:
        """Decode packets (at most `limit`) until a frame is waiting; the first waiting one, or None."""
        while not self._decoded and not self._done and limit != 0:
            packet = next(self._packets, None)
            if packet is None:
                self._done = True
                break
            self._decoded.extend(packet.decode())  # the final empty packet flushes the decoder
            limit = None if limit is None else limit - 1
        return self._decoded[0] if self._decoded else None

    def _next(self) -> Optional[Any]:
        while not self._ready and not self._flushed:
            try:
                frame = self._decode_more()
            except self._read_errors as error:
                # A damaged source costs the rest of the audio, not the video being written.
                log.warning("cannot read more audio from %s (%s); the rest of the output is silent",
                            self._source.name, error)
                self._done, frame = True, None
                self._decoded.clear()
            if frame is not None:
                self._decoded.pop(0)
            else:
                self._flushed = True  # the resampler hands out its last, shorter frame
            for out in self._resampler.resample(frame):
                out.pts, out.time_base = self._next_pts, Fraction(1, self.rate)
                self._next_pts += out.samples
                self._ready.append(out)
        return self._ready[0] if self._ready else None

    def copy_until(self, container: Any, end_s: Optional[Fraction], *, cut: bool = False) -> None:
        """Encode and mux every frame that starts before `end_s` (seconds of output time; None: all).
        With `cut`, the frame across `end_s` is shortened to end there."""
        while (frame := self._next()) is not None:
            if end_s is not None and frame.pts >= end_s * self.rate:
                return
            self._ready.pop(0)
            keep = None if end_s is None else math.ceil(end_s * self.rate) - frame.pts
            if cut and keep is not None and keep < frame.samples:
                frame = self._shortened(frame, keep)
            for packet in self._out.encode(frame):
                container.mux(packet)

    def _shortened(self, frame: Any, samples: int) -> Any:
        short = type(frame).from_ndarray(frame.to_ndarray()[:, :samples], format=frame.format.name,
                                         layout=self.layout)
        short.sample_rate, short.pts, short.time_base = self.rate, frame.pts, frame.time_base
        return short

    def finish(self, container: Any, end_s: Optional[Fraction]) -> None:
        """The last call: encode up to `end_s` (None: all of it), cut there, and flush the encoder."""
        self.copy_until(container, end_s, cut=True)
        for packet in self._out.encode(None):
            container.mux(packet)

    def close(self) -> None:
        self._source.close()


class _AudioRefused(Exception):
    """The MP4 muxer would not take the copied audio stream."""


class _H264Output:
    """libx264 through PyAV into an MP4 container, plus optional audio copy."""

    codec = "h264"

    def __init__(self, tmp: Path, *, width: int, height: int, rate: Fraction, crf: int, preset: str,
                 audio_from: Optional[Path], threads: int) -> None:
        import av  # deferred: an ImportError here selects the OpenCV fallback
        from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace

        self._av = av
        self._tmp = tmp
        self._rate = rate
        # Ticks of the stream's clock per nominal frame: fine enough (under 1 ms) to place the frames
        # of a variable-rate source, coarse enough that the nominal grid n/fps falls on ticks.
        self._ticks = _ticks_per_frame(rate)
        self._time_base = 1 / (rate * self._ticks)
        self._last_pts: Optional[int] = None
        self._end_s = Fraction(0)  # where the video written so far ends, in seconds
        self._audio: Optional[_AudioCopy | _AudioEncode] = None
        self._packets = 0  # video packets out of the encoder so far, and the largest of them
        self._largest = 0
        self._size_guess = width * height // 4  # a frame's size before the encoder has shown one
        # What write() converts to (OpenCV's BGR -> I420 is BT.601, limited range), tagged on the
        # stream by _start() so players convert back with the same matrix. Primaries and transfer
        # are those of the sRGB pictures the frames are.
        self._colour = dict(colorspace=Colorspace.ITU601, color_range=ColorRange.MPEG,
                            color_primaries=ColorPrimaries.BT709, color_trc=ColorTrc.BT709)
        settings = dict(width=width, height=height, rate=rate, crf=crf, preset=preset, threads=threads)
        try:
            self._start(audio_from, **settings)
        except _AudioRefused as refused:
            # The muxer refused the audio stream when writing the header (a codec it lists but
            # cannot hold after all): the video matters more, so start again without audio.
            log.warning("cannot copy the audio of %s into MP4 (%s); writing video only", audio_from, refused)
            self._start(None, **settings)

    def _start(self, audio_from: Optional[Path], *, width: int, height: int, rate: Fraction, crf: int,
               preset: str, threads: int) -> None:
        self._container = self._av.open(str(self._tmp), mode="w", format="mp4",
                                        container_options={"movflags": "+faststart"})
        try:
            stream = self._container.add_stream("libx264", rate=rate)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            stream.time_base = self._time_base  # a hint; the muxer may pick a finer one
            ctx = stream.codec_context
            ctx.time_base = self._time_base
            ctx.thread_count = threads
            ctx.options = {"crf": str(crf), "preset": preset}
            # Tag exactly what write() converts to, so players don't guess between BT.601 and BT.709.
            for name, value in self._colour.items():
                setattr(ctx, name, value)
            self._video = stream
            ctx.open()  # fails here, before any audio is involved, when libx264 is unusable
            if audio_from is not None:
                self._audio = self._open_audio(audio_from)
            try:
                self._container.start_encoding()  # writes the header now, not on frame 1
            except self._av.FFmpegError as error:
                if self._audio is None or isinstance(error, OSError):
                    raise
                raise _AudioRefused(error) from error
        except BaseException:
            self.drop()
            raise

    def _open_audio(self, audio_from: Path) -> Optional[_AudioCopy | _AudioEncode]:
        av = self._av
        try:
            source = av.open(str(audio_from), mode="r", timeout=10.0)
        except (av.FFmpegError, OSError) as error:
            log.warning("cannot read audio from %s (%s); writing video only", audio_from, error)
            return None
        try:
            if not source.streams.audio:
                log.debug("%s has no audio stream; writing video only", audio_from)
                source.close()
                return None
            in_stream = source.streams.audio[0]
            if len(source.streams.audio) > 1:  # an MP4 for browsers plays one track: said, not dropped unseen
                log.warning("%s has %d audio tracks; the video keeps the first", audio_from, len(source.streams.audio))
            codec = in_stream.codec_context.codec if in_stream.codec_context is not None else None
            # The codec's own name ("mp3"), not its decoder's ("mp3float").
            name = codec.canonical_name if codec is not None else "unknown"
            video_start_s = Fraction(0)
            video_duration_s: Optional[Fraction] = None
            if source.streams.video:
                vs = source.streams.video[0]
                if vs.start_time is not None:
                    video_start_s = vs.start_time * vs.time_base
                if vs.duration:
                    video_duration_s = vs.duration * vs.time_base
            errors = (av.FFmpegError, OSError)
            if name in BROWSER_AUDIO and name in self._container.supported_codecs:
                try:
                    out_stream = self._container.add_stream_from_template(in_stream)
                except (av.FFmpegError, ValueError) as error:
                    log.warning("cannot copy the %r audio of %s (%s); writing video only", name, audio_from, error)
                    source.close()
                    return None
                return _AudioCopy(source, in_stream, out_stream, video_start_s, video_duration_s, errors)
            if codec is None:
                log.warning("cannot re-encode the audio of %s to AAC (FFmpeg has no decoder for it); "
                            "writing video only", audio_from)
                source.close()
                return None
            try:
                audio = _AudioEncode(av, source, in_stream, self._container, video_start_s, video_duration_s, errors)
            except _AudioUnusable as error:
                log.warning("cannot re-encode the %r audio of %s to AAC (%s); writing video only",
                            name, audio_from, error)
                source.close()
                return None
            log.info("re-encoding the %s audio of %s to AAC (%d Hz, %s): browsers do not play %s in MP4",
                     name, audio_from, audio.rate, audio.layout, name)
            return audio
        except BaseException:
            source.close()
            raise

    def write(self, image: np.ndarray, timestamp_s: Optional[float]) -> None:
        yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)  # (H * 3 / 2, W): Y, then U, then V
        frame = self._av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        pts = self._pts(timestamp_s)
        # As long as the gap before it: a constant-rate video's frames all last 1/fps, and the last
        # frame of a variable-rate one lasts as long as its neighbour (the muxer needs it for the end).
        duration = self._ticks if self._last_pts is None else pts - self._last_pts
        frame.pts, frame.time_base, frame.duration = pts, self._time_base, duration
        self._last_pts = pts
        self._end_s = (pts + duration) * self._time_base
        for packet in self._video.encode(frame):
            self._packets += 1
            self._largest = max(self._largest, packet.size)
            self._container.mux(packet)
        if self._audio is not None:
            self._audio.copy_until(self._container, self._end_s)

    def _pts(self, timestamp_s: Optional[float]) -> int:
        """The next frame's pts in ticks: its timestamp, snapped to the nominal grid where it lies
        that close; 1/fps after the previous frame without one; never at or before the previous."""
        if timestamp_s is None or not math.isfinite(timestamp_s):
            return 0 if self._last_pts is None else self._last_pts + self._ticks
        slots = Fraction(timestamp_s) * self._rate
        nearest = round(slots)
        if abs(slots - nearest) / self._rate <= min(_SNAP_S, 1 / (4 * self._rate)):
            pts = nearest * self._ticks
        else:
            pts = round(slots * self._ticks)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # a repeated or backward timestamp: the next tick keeps the order
        return pts

    def reserve(self, frames_written: int) -> int:
        """Bytes the file may still grow by once the next frame is in and it is finished: the
        frames inside the encoder (lookahead, B-frames), the muxer's buffer, and the index."""
        pending = frames_written - self._packets + 1
        per_frame = self._largest or self._size_guess
        return _RESERVE_BASE + _INDEX_BYTES_PER_FRAME * (frames_written + 1) + pending * per_frame

    def finish(self, frames_written: int) -> None:
        """Flush the encoder, copy the remaining audio, and write the index (moov) to the front."""
        for packet in self._video.encode(None):
            self._container.mux(packet)
        if self._audio is not None:
            end_s: Optional[Fraction] = self._end_s
            full = self._audio.video_duration_s
            # The whole source went through: keep its whole audio, even a tail slightly past the
            # last frame. A run stopped early: cut, so there is no audio over a frozen frame.
            if full is not None and end_s >= full - 1 / (2 * self._rate):
                end_s = None
            self._audio.finish(self._container, end_s)
        self._container.close()
        self.drop()

    def drop(self) -> None:
        if self._audio is not None:
            audio, self._audio = self._audio, None
            audio.close()
        with contextlib.suppress(self._av.FFmpegError, OSError):
            self._container.close()  # closing twice is a no-op; after a failed write it may raise again


class _Mp4vOutput:
    """OpenCV's MPEG-4 Part 2 writer: plays in desktop players, not reliably in browsers."""

    codec = "mp4v"

    def __init__(self, tmp: Path, *, width: int, height: int, rate: Fraction) -> None:
        self._writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(rate), (width, height))
        self._size_guess = width * height // 2
        if not self._writer.isOpened():
            raise SinkError(f"OpenCV cannot open an 'mp4v' writer for {tmp}")

    def write(self, image: np.ndarray, timestamp_s: Optional[float]) -> None:
        self._writer.write(image)  # OpenCV's writer has no timestamps: every frame lasts 1/fps

    def reserve(self, frames_written: int) -> int:
        return _RESERVE_BASE + _INDEX_BYTES_PER_FRAME * (frames_written + 1) + 2 * self._size_guess

    def finish(self, frames_written: int) -> None:
        self._writer.release()

    def drop(self) -> None:
        self._writer.release()


class VideoWriter:
    """Writes (H, W, 3) uint8 BGR frames to an MP4 that browsers play.

    H.264 (libx264 via PyAV), yuv420p, moov atom at the front (movflags=+faststart), exact source
    timing, and the source's audio copied through. See the module docstring for the policy on odd
    sizes, audio and the 'mp4v' fallback.

    Leaving a ``with`` block always calls close(), whatever ended it: on a normal exit, on
    KeyboardInterrupt/SystemExit (Ctrl+C keeps the video so far), and on any other exception too,
    because every frame already written is finished work that a playable partial file preserves.
    Call abort() yourself to discard the output instead.

    Args:
        path: where the finished file goes; its directory must exist.
        width, height: size of the frames passed to write(); odd sizes are padded (see module doc).
        fps: frames per second of the source, e.g. 30000/1001.
        audio_from: a file whose first audio stream is copied into the output, or None.
        overwrite: replace an existing `path`; otherwise its existence is a SinkError.
        crf, preset: libx264 quality (0..51, lower is better) and speed.
        force_mp4v: skip libx264 and use OpenCV's 'mp4v' writer (also: env STREAMSEG_FORCE_MP4V=1).

    Raises:
        SinkError: `path` exists (without overwrite), is a directory, or its directory is missing or
            not writable; or a frame cannot be written (disk full).
        ValueError: a bad size, fps, crf or preset.
    """

    frames_written: int
    codec: str

    def __init__(self, path: Path, *, width: int, height: int, fps: float,
                 audio_from: Optional[Path] = None, overwrite: bool = False, crf: int = DEFAULT_CRF,
                 preset: str = "veryfast", force_mp4v: bool = False) -> None:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(crf, (int, np.integer)) and 0 <= crf <= 51):
            raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
        if preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(X264_PRESETS)}; got {preset!r}")
        self.path = Path(path)
        self.width = int(width)
        self.height = int(height)
        self.rate = exact_rate(fps)
        # H.264 4:2:0 needs even sizes; padding by one pixel beats cropping or scaling the picture.
        self.output_size = (self.width + self.width % 2, self.height + self.height % 2)
        self.frames_written = 0
        self._ending_on_error = False
        self._overwrite = overwrite
        self._closed = False
        self._failed: Optional[BaseException] = None

        self._tmp = self._create_temp()
        # Removes the temporary file if the writer is dropped without close() or abort().
        self._cleanup = weakref.finalize(self, _remove, self._tmp)
        try:
            self._out = self._open(audio_from, crf, preset, force_mp4v)
        except BaseException:
            self._cleanup()
            raise
        self.codec = self._out.codec
        self._room = _Room(self._tmp)

    def _create_temp(self) -> Path:
        path = self.path
        if path.is_dir():
            raise SinkError(f"output {path} is a directory; give a file name such as {path / 'out.mp4'}")
        if (path.exists() or path.is_symlink()) and not self._overwrite:
            raise SinkError(f"output {path} exists; pass --overwrite to replace it")
        parent = path.parent
        if not parent.is_dir():
            raise SinkError(f"output directory {parent} does not exist")
        for _ in range(100):
            # Ends in .mp4 because OpenCV's fallback writer picks its container from the extension.
            tmp = parent / f".{path.name}.{secrets.token_hex(4)}.part.mp4"
            try:
                # Created here, not by the muxer, so permission problems surface before any encoding;
                # 0o666 lets the umask decide, as for any other new file.
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return tmp
            except FileExistsError:
                continue
            except OSError as error:
                raise SinkError(f"cannot write to output directory {parent}: {error.strerror}") from error
        raise SinkError(f"cannot find a free temporary file name in {parent}")

    def _open(self, audio_from: Optional[Path], crf: int, preset: str, force_mp4v: bool) -> Any:
        width, height = self.output_size
        reason = None
        if force_mp4v or os.environ.get(FORCE_MP4V_ENV, "") not in ("", "0"):
            reason = f"forced by {FORCE_MP4V_ENV}" if not force_mp4v else "forced by force_mp4v=True"
        else:
            try:
                import av
            except ImportError as error:
                reason = f"PyAV is not installed ({error})"
            else:
                threads = max(1, min(4, (os.cpu_count() or 2) // 2))  # leave cores to the model
                try:
                    return _H264Output(self._tmp, width=width, height=height, rate=self.rate, crf=crf,
                                       preset=preset, audio_from=audio_from, threads=threads)
                except OSError as error:  # the file, not the encoder: OpenCV would fail the same way
                    raise SinkError(f"cannot write {self.path}: {_describe(error)}") from error
                except (av.FFmpegError, ValueError) as error:
                    # ValueError: PyAV's UnknownCodecError when FFmpeg was built without libx264.
                    reason = f"PyAV cannot open libx264 ({error})"
        log.warning("%s; writing %s as 'mp4v' with OpenCV instead: it may not play in browsers "
                    "and carries no audio", reason, self.path)
        return _Mp4vOutput(self._tmp, width=width, height=height, rate=self.rate)

    def write(self, image: np.ndarray, timestamp_s: Optional[float] = None) -> None:
        """Append one (height, width, 3) uint8 BGR frame, shown from `timestamp_s` (seconds from
        the video's start, the source frame's media time) or, without one, 1/fps after the last."""
        if self._closed:
            raise RuntimeError(f"write() on the closed VideoWriter for {self.path}")
        if self._failed is not None:
            raise SinkError(f"cannot write {self.path}: an earlier write failed ({self._failed})")
        expected = (self.height, self.width, 3)
        if image.shape != expected or image.dtype != np.uint8:
            raise ValueError(f"frame must be {expected} uint8 BGR, got {image.shape} {image.dtype}")
        if self.output_size != (self.width, self.height):
            image = cv2.copyMakeBorder(image, 0, self.output_size[1] - self.height,
                                       0, self.output_size[0] - self.width, cv2.BORDER_REPLICATE)
        else:
            image = np.ascontiguousarray(image)
        # Stop while the file can still be finished: a write that hits a full disk leaves the
        # muxer broken, and the frames so far with it.
        short = self._room.short(self._out.reserve(self.frames_written))
        if short is not None:
            raise SinkError(f"cannot write {self.path}: {short}; stopped after {self.frames_written} "
                            f"frame{'' if self.frames_written == 1 else 's'} to finish the video with them")
        try:
            self._out.write(image, timestamp_s)
        except (OSError, cv2.error) + _av_errors() as error:
            self._failed = error
            raise SinkError(f"cannot write {self.path}: {_describe(error)}") from error
        self.frames_written += 1

    def close(self) -> None:
        """Finish the file and move it to `path`. Idempotent.

        Without a single frame written there is nothing to play: no file is created, with a warning.
        """
        if self._closed:
            return
        self._closed = True
        if self.frames_written == 0:
            log.warning("no frames were written; not creating %s", self.path)
            self._discard()
            return
        if self._failed is not None:
            # The muxer is broken (a full disk mid-frame): there is no index to write.
            self._discard()
            raise SinkError(f"cannot finish {self.path} after a failed write ({_describe(self._failed)}); "
                            "removed the incomplete file")
        try:
            self._out.finish(self.frames_written)
        except (OSError, cv2.error) + _av_errors() as error:
            self._discard()
            raise SinkError(f"cannot finish {self.path}: {_describe(error)}") from error
        except BaseException:
            self._discard()
            raise
        try:
            self._publish()
        finally:
            self._cleanup()
        # After an error or Ctrl-C this line is the news that the video so far was kept;
        # after a normal end the caller reports the run in its own words, and --debug gets the
        # writer's side of it.
        if self._ending_on_error:
            log.info("wrote %s: %d frames at %s fps (%s)", self.path, self.frames_written, self.rate, self.codec)
        else:
            log.debug("finalised %s (%d frames, %s)", self.path, self.frames_written, self.codec)

    def abort(self) -> None:
        """Drop everything written so far and leave no file behind. Idempotent; a no-op after close()."""
        if self._closed:
            return
        self._closed = True
        self._discard()

    def _discard(self) -> None:
        try:
            self._out.drop()
        finally:
            self._cleanup()

    def _publish(self) -> None:
        try:
            if self._overwrite:
                os.replace(self._tmp, self.path)
                return
            # A hard link fails if `path` appeared meanwhile, where a rename would silently clobber it.
            try:
                os.link(self._tmp, self.path)
            except FileExistsError:
                raise SinkError(f"output {self.path} exists; pass --overwrite to replace it") from None
            except OSError:  # a file system without hard links: check, then rename
                if self.path.exists():
                    raise SinkError(f"output {self.path} exists; pass --overwrite to replace it") from None
                os.replace(self._tmp, self.path)
        except OSError as error:
            raise SinkError(f"cannot move the finished video to {self.path}: {error.strerror}") from error

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.close()
            return
        self._ending_on_error = True
        try:
            self.close()  # keep the work done so far, see the class docstring
        except SinkError as error:
            # The exception already on its way out says more about what went wrong first, and it
            # gets the one error line; this is a consequence.
            log.warning("%s", error)


#: How close to the nominal grid n/fps a frame's timestamp must be to be put on it: timestamps
#: rounded to milliseconds (Matroska, WebM) still give a constant-rate video its exact rate.
_SNAP_S = Fraction(1, 1000)


def _ticks_per_frame(rate: Fraction) -> int:
    """The smallest power of two that cuts a frame at `rate` into ticks of 1 ms or less (25 fps:
    64 ticks of 0.625 ms, so MP4 keeps the 1/12800 s clock it would pick for 1/25 s)."""
    ticks = 1
    while 1 / (rate * ticks) > Fraction(1, 1000):
        ticks *= 2
    return ticks


#: What finishing a file needs beyond its frames: the muxer's buffer (32 KiB), the header, slack.
_RESERVE_BASE = 256 * 1024
#: The MP4 index per frame: size, offset, timing and sync entries, audio's share included (generous).
_INDEX_BYTES_PER_FRAME = 64
#: Room beyond the reserve above which the writer looks at the disk only a few times a second.
_PLENTY = 64 * 2**20


class _Room:
    """Whether the temporary file may grow by `reserve` bytes: free disk space, and the process's
    file-size limit (RLIMIT_FSIZE, `ulimit -f`), which a full disk's EFBIG cousin enforces."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._limit: Optional[int] = None
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                self._limit = int(soft)
        except (ImportError, AttributeError, OSError, ValueError):  # Windows has no such limit
            pass

        self._next_check = 0.0  # monotonic time; while there is plenty of room, look a few times a second

    def short(self, reserve: int) -> Optional[str]:
        """None when there is room; else why not, in a few words."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        try:
            size = os.stat(self._tmp).st_size
            free = shutil.disk_usage(self._tmp.parent).free
        except OSError:
            return None  # cannot tell: the write itself will report any failure
        if free < reserve:
            return f"the disk is full ({_mib(free)} free)"
        if self._limit is not None and size + reserve > self._limit:
            return f"the file-size limit (ulimit -f) of {_mib(self._limit)} is reached"
        room = min(free, self._limit - size if self._limit is not None else free) - reserve
        # Far from full: the next quarter of a second cannot use it up (that would take 256 MiB/s);
        # close to full: every frame (statvfs is a round trip on a network file system).
        self._next_check = now + 0.25 if room > _PLENTY else 0.0
        return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _describe(error: BaseException) -> str:
    """An OS error without the temporary file's name, which means nothing to the user."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (" (is the disk full?)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return str(error)


def _av_errors() -> tuple[type[BaseException], ...]:
    try:
        import av
    except ImportError:
        return ()
    return (av.FFmpegError,)
