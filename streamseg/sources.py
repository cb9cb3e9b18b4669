"""Where frames come from: video files, cameras, network streams and still images.

This module owns every ``cv2.VideoCapture`` and every image read, the fps and frame-count
fallbacks, and the reconnect policy for live sources. It hands out ``Frame`` objects whose
``image`` is always a real decoded picture, (H, W, 3) uint8 BGR: a failed read ends the
input or triggers a reconnect, it never produces a placeholder frame.

Example::

    with VideoSource("clip.mp4") as source:
        while (frame := source.read()) is not None:
            ...
"""
from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from .types import Frame, SourceError, UsageError, VideoInfo

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
SUPPORTED_SCHEMES = ("rtsp", "rtsps", "http", "https")

# RFC 3986 scheme. A single letter is a Windows drive ("C:\\clips\\a.mp4"), not a scheme.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CAMERA_RE = re.compile(r"[0-9]+", re.ASCII)
_GLOB_CHARS = frozenset("*?[")

_DEFAULT_FPS = 30.0
_MIN_FPS, _MAX_FPS = 1.0, 1000.0
# How often a back-off sleep looks at close(): the stop event itself wakes it at once.
_WAKE_SLICE_S = 0.1
_CLOSE_WAIT_S = 0.5  # how long close() waits for a read under way in another thread
# Damaged files. A read that fails before the promised end has usually consumed one damaged packet
# (FFmpeg refuses it, the next one decodes), so up to this many failures in a row are read past.
_MAX_BAD_READS = 8
# After a failed read, this many frames are checked for a jump in media time: the decoder silently
# drops frames that depend on the damaged one, and with B-frames it reports the failure a few
# frames before the hole shows. Outside this window a jump is trusted as the file's own timing
# (variable frame rate): CAP_PROP_FPS is then the average rate and the frame count already fits it.
_GAP_WINDOW = 16
# A jump in media time larger than this, in a file of unknown length, is taken for a broken
# timestamp rather than lost frames (so a bad timestamp cannot make the output hours long).
_MAX_GAP_S = 60.0


# --------------------------------------------------------------------------- classification


def source_kind(spec: str) -> str:
    """Classify a SOURCE argument: 'camera', 'stream', 'images' or 'video'.

    >>> source_kind("0"), source_kind("rtsp://cam/live"), source_kind("shots/*.jpg"), source_kind("a.mp4")
    ('camera', 'stream', 'images', 'video')

    Raises UsageError for an empty spec or a URL scheme other than SUPPORTED_SCHEMES.
    """
    if not spec:
        raise UsageError("empty SOURCE: give a video file, image, directory, glob, camera index or stream URL")
    match = _SCHEME_RE.match(spec)
    # An existing file whose name happens to contain a colon ("take:2.mp4") is a file, not a URL.
    if match and len(match.group(1)) > 1 and not os.path.exists(spec):
        scheme = match.group(1).lower()
        if scheme in SUPPORTED_SCHEMES:
            try:
                host = urlsplit(spec).hostname
            except ValueError:  # a malformed port or IPv6 address
                host = None
            if not host:
                raise UsageError(f"stream URL '{_redact(spec)}' names no host; for example "
                                 f"{scheme}://camera.local/stream or {scheme}://192.168.1.20:8080/video")
            return "stream"
        accepted = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        raise UsageError(
            f"unsupported URL scheme '{scheme}:' in SOURCE '{_redact(spec)}'; accepted: {accepted}, "
            "a camera index, or a local path"
        )
    if _CAMERA_RE.fullmatch(spec):
        return "camera"
    path = Path(spec)
    if path.is_dir():
        return "images"
    # An existing file is judged by its suffix even if its name contains glob characters ("clip [hd].mp4").
    if path.is_file():
        return "images" if _is_image_name(path) else "video"
    if any(ch in _GLOB_CHARS for ch in spec) or _is_image_name(path):
        return "images"
    return "video"


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


#: What a run writes per image: <stem><kind>.png (pipeline.image_outputs names them from this).
IMAGE_OUTPUT_KINDS = ("_overlay", "_mask", "_labels")


def _without_own_outputs(found: list[Path]) -> list[Path]:
    """`found` less streamseg's own <stem>_overlay/_mask/_labels.png lying beside <stem>'s image:
    a run with the default `-o .` puts them there, and the next run on the folder segmented them."""
    stems = {(p.parent, p.stem) for p in found}
    return [p for p in found if not (p.suffix == ".png" and any(
        p.stem.endswith(kind) and (p.parent, p.stem[: -len(kind)]) in stems for kind in IMAGE_OUTPUT_KINDS))]


class _Refused(SourceError):
    """The server answered, and the answer will not change by asking again (HTTP 404, a web page
    instead of a video): no reconnecting."""


#: HTTP answers that asking again will not change; 408 (timeout) and 429 (busy) are worth a retry.
_PERMANENT_HTTP = set(range(400, 500)) - {408, 429}


def _http_refusal(url: str, *, timeout_s: float) -> Optional[str]:
    """Why an http(s) stream that OpenCV could not open will not open later either, from one GET
    of its headers: a 4xx status, or a web page where a video stream should be. None for anything
    else (no answer, a 5xx, a video type): those are worth reconnecting for. Only the URL given is
    asked; the body is never read."""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        return None
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "streamseg"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:  # noqa: S310 - the user's own URL
            kind = answer.headers.get_content_type()
    except urllib.error.HTTPError as error:
        error.close()
        if error.code in _PERMANENT_HTTP:
            return f"the server answered HTTP {error.code} {error.reason}"
        return None
    except (OSError, ValueError):  # unreachable, refused, timed out, TLS, malformed
        return None
    if kind in ("text/html", "text/plain", "application/json", "application/xml", "text/xml"):
        return f"the server sends {kind}, not a video stream"
    return None


def _redact(url: str) -> str:
    """The URL with any password replaced by '***', so logs and errors never leak credentials."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        # Split the netloc by hand rather than rebuild it from .hostname, which drops IPv6 brackets.
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
    except ValueError:  # a malformed port or netloc: keep the scheme only rather than guess
        return url.split(":", 1)[0] + "://***"


# --------------------------------------------------------------------------- still images


def read_image(path: Path) -> np.ndarray:
    """Read one image file as (H, W, 3) uint8 BGR.

    Grayscale is expanded to three channels, alpha is dropped (not composited), 16-bit and float
    (0..1) images are scaled to 8 bits, and the EXIF orientation is applied so the picture stands
    the way viewers show it. Raises SourceError naming the path and the reason.
    """
    path = Path(path)
    # np.fromfile + imdecode rather than cv2.imread: imread cannot open non-ASCII paths on Windows
    # and returns a bare None for every kind of failure; reading the bytes ourselves tells them apart.
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise SourceError(f"image '{path}' does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"image '{path}' is a directory, not an image file") from None
    except OSError as exc:
        raise SourceError(f"cannot read image '{path}': {exc.strerror or exc}") from None
    if data.size == 0:
        raise SourceError(f"image '{path}' is empty (0 bytes)")
    # IMREAD_COLOR | IMREAD_ANYDEPTH instead of IMREAD_UNCHANGED: the decoder already turns gray and
    # BGRA into BGR, keeps 16-bit depth for proper rounding below, and, unlike UNCHANGED, applies
    # the EXIF orientation (phone photos would otherwise come out sideways).
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error:
        image = None
    if image is None:
        raise SourceError(f"image '{path}' could not be decoded: not a supported image, or truncated/corrupt")
    return _to_bgr8(image, path)


def _to_bgr8(image: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3) any-depth BGR -> (H, W, 3) uint8 BGR."""
    if image.ndim == 2:  # defensive: IMREAD_COLOR should already give three channels
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.uint16:
        # round(v / 257) maps 0..65535 onto 0..255 exactly (65535 / 257 == 255).
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):
        # Float TIFF/EXR by convention hold 0..1; NaN becomes black rather than undefined bytes.
        scaled = np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
        return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise SourceError(f"image '{path}' has unsupported pixel type {image.dtype}")


#: Names that look like videos, for a hint only: any file that is not an image is tried as a video.
_VIDEO_NAMES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".mpg", ".mpeg",
                          ".wmv", ".flv", ".3gp"})


def _videos(files: list[Path]) -> list[Path]:
    return [f for f in files if f.suffix.lower() in _VIDEO_NAMES]


def _video_hint(videos: list[Path]) -> str:
    """For a folder or glob of videos: where a video goes instead (SOURCE only takes them singly)."""
    return f"; a video is one SOURCE of its own, one at a time, e.g. '{videos[0]}'" if videos else ""


def expand_image_sources(specs: Sequence[str]) -> list[Path]:
    """Turn image SOURCE arguments into a list of image files.

    A file is kept as given; a directory gives its image files (by suffix, sorted by name,
    not recursive, hidden files skipped); a glob gives its sorted matches that are image files
    ("**" recurses). From a directory or a glob, a run's own outputs beside their image
    (a_overlay.png, a_mask.png, a_labels.png next to a.jpg) are left out. Duplicates (the same file reached twice) are dropped, first occurrence wins.
    Raises SourceError naming a missing path, an image-less directory or a glob that matched nothing.

    >>> expand_image_sources(["shots/", "extra.png"])  # doctest: +SKIP
    [PosixPath('shots/a.jpg'), PosixPath('shots/b.jpg'), PosixPath('extra.png')]
    """
    result: list[Path] = []
    seen: set[str] = set()
    for spec in specs:
        if not spec:
            raise SourceError("empty image source")
        path = Path(spec)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            # Hidden files are skipped: macOS "._photo.jpg" resource forks carry image suffixes but are not images.
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            found = _without_own_outputs([p for p in files if _is_image_name(p)])
            videos = _videos(files)
            if not found:
                listed = " ".join(sorted(IMAGE_SUFFIXES))
                raise SourceError(f"directory '{spec}' contains no image files ({listed}){_video_hint(videos)}")
            if videos:  # said, not skipped without a word
                log.warning("directory '%s': %d video%s left out (%s); a video is one SOURCE of its own, e.g. '%s'",
                            spec, len(videos), "" if len(videos) == 1 else "s",
                            ", ".join(v.name for v in videos[:3]) + (", ..." if len(videos) > 3 else ""), videos[0])
        elif any(ch in _GLOB_CHARS for ch in spec):
            files = [Path(m) for m in sorted(glob.glob(spec, recursive=True)) if os.path.isfile(m)]
            found = _without_own_outputs([p for p in files if _is_image_name(p)])
            if not found:
                raise SourceError(f"pattern '{spec}' matched no image files{_video_hint(_videos(files))}")
        else:
            raise SourceError(f"image source '{spec}' does not exist")
        for file in found:
            key = os.path.realpath(file)
            if key not in seen:
                seen.add(key)
                result.append(file)
    return result


# --------------------------------------------------------------------------- video, cameras, streams


@dataclass(frozen=True, slots=True)
class VideoProbe:
    """What a video file's container says about its first video stream.

    frame_count: the container's own count (MP4, MOV, AVI index); None where it keeps none
    (Matroska, WebM, MPEG-TS), so only an estimate from duration x fps is to be had.
    duration_s: the video stream's length; None where the container does not say.
    """

    frame_count: Optional[int]
    duration_s: Optional[float]


def probe_video(spec: str) -> VideoProbe:
    """Check that the file `spec` holds a video stream with a picture that decodes, without a word
    from FFmpeg on the terminal; fast (one frame is decoded), so the CLI calls it before the model
    loads. Raises SourceError saying what is wrong: missing, empty (0 bytes), not a video (or too
    damaged to open), no video stream (an audio file), or no frame that decodes.
    """
    label = f"video '{spec}'"
    try:
        size = os.stat(spec).st_size
    except FileNotFoundError:
        raise SourceError(f"{label} does not exist") from None
    except OSError as exc:
        raise SourceError(f"cannot read {label}: {exc.strerror or exc}") from None
    if size == 0:
        raise SourceError(f"{label} is empty (0 bytes)")
    try:
        import av  # PyAV's FFmpeg keeps its log to itself unless asked
    except ImportError:  # pragma: no cover - a dependency; without it OpenCV alone judges the file
        return VideoProbe(frame_count=None, duration_s=None)
    try:
        container = av.open(spec, timeout=10.0)
    except (av.FFmpegError, OSError) as error:
        log.debug("FFmpeg cannot open %s: %s", spec, error)
        if isinstance(error, PermissionError):
            raise SourceError(f"cannot read {label}: permission denied") from None
        raise SourceError(f"cannot open {label}: not a video file, or too damaged to read") from None
    with container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams})
            raise SourceError(f"{label} has no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
        stream = container.streams.video[0]
        if not _decodes(av, container, stream):
            raise SourceError(f"{label} has no readable frames")
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        return VideoProbe(frame_count=stream.frames or None, duration_s=duration)


def _decodes(av: Any, container: Any, stream: Any) -> bool:
    """Whether a frame of `stream` decodes within its first packets (damaged ones are read past,
    as VideoSource reads past them)."""
    failures = 0
    try:
        for packet in container.demux(stream):
            try:
                if packet.decode():
                    return True
            except (av.FFmpegError, OSError) as error:
                failures += 1
                log.debug("%s: undecodable packet: %s", container.name, error)
                if failures > _MAX_BAD_READS:
                    return False
    except (av.FFmpegError, OSError) as error:  # the file ends in the middle of a packet
        log.debug("%s: cannot read on: %s", container.name, error)
    return False


#: Set for OpenCV's own FFmpeg (read once, when OpenCV first uses it); -8 is FFmpeg's AV_LOG_QUIET.
_FFMPEG_LOG_ENV = "OPENCV_FFMPEG_LOGLEVEL"


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Keep OpenCV's and its FFmpeg's own log lines ("moov atom not found", "[ WARN:0@1.2] global
    cap.cpp ...") off the terminal while a capture opens, unless streamseg logs at debug level
    (--debug): whatever is wrong reaches the user as streamseg's one line.

    OpenCV reads FFmpeg's level once for the process, at its first capture, so FFmpeg's messages
    (about damaged packets too) stay off for the run; streamseg reports lost frames itself. A
    level the user set in OPENCV_FFMPEG_LOGLEVEL is left alone.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    os.environ.setdefault(_FFMPEG_LOG_ENV, "-8")
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def decode_threads_for(model_device: str) -> Optional[int]:
    """FFmpeg decoder threads for a run whose model runs on `model_device` ('cpu', 'cuda').

    With the model on the CPU every core is already busy with the model and the other stages,
    so FFmpeg's extra decoding threads add only their own overhead (0.5 ms of CPU per 720p frame
    here) and compete with the model unseen by the pipeline: one thread decodes, inside the
    capture thread, where the pipeline can put it behind the model (see `video._Balance`).
    With the model on a GPU the cores are free, and FFmpeg's frame threads keep decoding fast.
    """
    return 1 if model_device == "cpu" else None


class VideoSource:
    """Frames from one video file, camera index or network stream URL.

    Files are read in order to their end. A frame the decoder cannot decode (a damaged packet) is
    skipped with one warning per run of lost frames and counted in ``frames_skipped``; the frames
    after it keep their true ``index`` (position in the file), so a hole of k frames makes the index
    jump by k + 1. Lost frames are found from failed reads and from jumps in the decoder's media time
    (CAP_PROP_POS_MSEC) right after one. No placeholder is ever produced. Live sources (cameras, streams) reconnect after a drop
    with back-off 1, 2, 4, ... s capped at ``backoff_cap_s``, up to ``reconnect`` attempts in a
    row (a successful reconnect resets the count), logging one warning per attempt; after that
    ``read()`` raises SourceError. Setting ``stop`` ends any back-off wait at once and makes
    ``read()``/``grab()`` return None. Files and streams are opened through the FFmpeg backend
    with open/read timeouts of ``timeout_s``, so a dead stream cannot hang a read forever.
    ``decode_threads`` sets FFmpeg's decoder threads (None: FFmpeg's choice, one per core); see
    `decode_threads_for`.

    A stream that cannot be reached at start-up is retried under the same policy (a camera that
    is rebooting, a server started after us); a file or camera that cannot be opened fails at once.

    ``read()``, ``grab()`` and ``close()`` may be called from different threads: they serialise
    on an internal lock, and ``close()`` never releases the capture under a running read.

    >>> with VideoSource("clip.mp4") as src:  # doctest: +SKIP
    ...     src.grab()            # skip frame 0 without converting it
    ...     frame = src.read()    # frame.index == 1
    """

    info: VideoInfo

    def __init__(
        self,
        spec: str,
        *,
        reconnect: int = 10,
        backoff_cap_s: float = 30.0,
        stop: Optional[threading.Event] = None,
        timeout_s: float = 10.0,
        decode_threads: Optional[int] = None,
    ) -> None:
        if reconnect < 0:
            raise ValueError(f"reconnect must be 0 or more, got {reconnect}")
        if not backoff_cap_s > 0:
            raise ValueError(f"backoff_cap_s must be positive, got {backoff_cap_s}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if decode_threads is not None and decode_threads < 1:
            raise ValueError(f"decode_threads must be 1 or more, got {decode_threads}")
        kind = source_kind(spec)
        if kind == "images":
            raise UsageError(f"'{spec}' is an image source, not a video, camera or stream")

        self._spec = spec
        self._kind = kind
        self._max_attempts = int(reconnect)
        self._backoff_cap_s = float(backoff_cap_s)
        self._stop = stop if stop is not None else threading.Event()
        self._timeout_ms = max(1, int(round(timeout_s * 1000)))
        self._decode_threads = decode_threads
        self._lock = threading.RLock()
        self._cap: Optional[cv2.VideoCapture] = None
        # The first frame is read while opening (to prove the source really delivers) and kept
        # here until read()/grab() hands it out: (image (H, W, 3) uint8 BGR, monotonic capture time).
        self._pending: Optional[tuple[np.ndarray, float]] = None
        self._next_index = 0
        # Damaged files (see _place): frames skipped so far, failed reads in a row, failed reads since
        # the last frame handed out, frames left to check for a hole, media time (ms) of the last frame.
        self._skipped = 0
        self._bad_reads = 0
        self._unplaced = 0
        self._watch = 0
        self._last_ms: Optional[float] = None
        # The last frame handed out with a media time of its own: (index, seconds).
        self._timed: tuple[int, float] = (0, 0.0)
        self._ended = False
        self._closing = False
        self._closed = False
        self._probe = VideoProbe(frame_count=None, duration_s=None)  # files: what their container says
        if kind == "camera":
            self._label = f"camera {int(spec)}"
            name = self._label
        elif kind == "stream":
            name = _redact(spec)
            self._label = f"stream '{name}'"
        else:
            name = spec
            self._label = f"video '{spec}'"

        try:
            if kind == "stream":
                self._open_stream_with_retries()
            else:
                self._open_once()
            assert self._cap is not None and self._pending is not None  # _open_once guarantees both
            height, width = self._pending[0].shape[:2]
            live = kind != "video"
            self.info = VideoInfo(
                width=int(width),
                height=int(height),
                fps=self._probe_fps(),
                frame_count=None if live else self._probe_frame_count(),
                live=live,
                name=name,
            )
        except BaseException:
            self.close()
            raise

    # -- public ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """'video', 'camera' or 'stream' (see source_kind)."""
        return self._kind

    @property
    def frames_skipped(self) -> int:
        """Frames of a file lost to damage (undecodable, or dropped by the decoder) so far; 0 for live sources."""
        return self._skipped

    def read(self) -> Optional[Frame]:
        """The next frame, (H, W, 3) uint8 BGR, or None at end of file, after close() or once stop is set.

        Raises SourceError when a live source cannot be reconnected.
        """
        with self._lock:
            while True:
                if self._finished():
                    return None
                if self._pending is not None:
                    image, captured = self._pending
                    self._pending = None
                    return self._make_frame(image, captured)
                ok, image = self._cap.read()
                if ok and image is not None and image.size:
                    if self.info.live or self._place():
                        return self._make_frame(image, time.monotonic())
                    continue
                if not self._recover("read failed or timed out"):
                    return None

    def grab(self) -> Optional[int]:
        """Skip one frame without converting it to BGR; return the index skipped, or None as read() would.

        ``cv2.VideoCapture.grab()`` still demuxes and decodes the packet (later frames depend on it)
        but skips the colour conversion and the copy into a numpy array.
        """
        with self._lock:
            while True:
                if self._finished():
                    return None
                if self._pending is not None:
                    self._pending = None
                    return self._take_index()
                if self._cap.grab():
                    if self.info.live or self._place():
                        return self._take_index()
                    continue
                if not self._recover("grab failed or timed out"):
                    return None

    def close(self) -> None:
        """Release the capture. Safe to call twice and from another thread.

        A read under way in another thread is waited for briefly, not to its end: on a stream that
        stopped sending, a read returns only at the read timeout (10 s), and a user who pressed q
        or Ctrl-C should not wait that long. That thread then releases the capture itself when
        its read returns (see _finished); releasing it under a read would crash OpenCV.
        """
        # Flag first, without the lock: a reader sleeping in a reconnect back-off sees it and lets go.
        again, self._closing = self._closing, True
        if not self._lock.acquire(timeout=0 if again else _CLOSE_WAIT_S):
            log.debug("%s: a read is under way; it releases the capture when it returns", self._label)
            return
        try:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            self._release()
        finally:
            self._lock.release()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next index {self._next_index}"
        return f"<VideoSource {self._label} ({state})>"

    # -- opening --------------------------------------------------------------------------

    def _open_once(self) -> None:
        """Open the capture and read its first frame into self._pending, or raise SourceError."""
        if self._kind == "video":
            self._probe = probe_video(self._spec)
        with _quiet_opencv():
            started = time.monotonic()
            cap = self._new_capture()
            try:
                if not cap.isOpened():
                    raise self._open_failure(time.monotonic() - started)
                ok, image = cap.read()
                if not ok or image is None or not image.size:
                    raise SourceError(self._first_read_failure())
            except BaseException:
                cap.release()
                raise
        self._cap = cap
        self._pending = (image, time.monotonic())
        if self._kind == "video":
            self._last_ms = self._media_ms(first=True)

    def _new_capture(self) -> cv2.VideoCapture:
        if self._kind == "camera":
            # Default backend choice (V4L2, MSMF, AVFoundation...). The timeout properties are
            # FFmpeg-only; handing them to a camera backend could make it refuse to open.
            return cv2.VideoCapture(int(self._spec))
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self._timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, self._timeout_ms,
        ]
        if self._decode_threads is not None:
            params += [cv2.CAP_PROP_N_THREADS, self._decode_threads]
        return cv2.VideoCapture(self._spec, cv2.CAP_FFMPEG, params)

    def _open_failure(self, took_s: float) -> SourceError:
        """The error for a capture that did not open after `took_s`; _Refused where retrying is pointless."""
        if self._kind == "camera":
            return SourceError(f"{self._label} could not be opened (no such device, or it is in use)")
        if self._kind == "stream":
            seconds = self._timeout_ms / 1000
            # A server that answered at once may have said why (a 404); one that let the open
            # time out is not asked again here, which would only add to the wait.
            if took_s < 0.8 * seconds:
                refusal = _http_refusal(self._spec, timeout_s=min(5.0, seconds))
                if refusal is not None:
                    return _Refused(f"cannot open {self._label}: {refusal}")
            return SourceError(f"cannot open {self._label}: unreachable, refused, or no answer within {seconds:g} s")
        return SourceError(f"cannot open {self._label}: not a video OpenCV can read")

    def _first_read_failure(self) -> str:
        if self._kind == "video":
            return f"{self._label} has no readable frames"
        return f"{self._label} opened but delivered no frame"

    def _open_stream_with_retries(self) -> None:
        try:
            self._open_once()
            return
        except _Refused:
            raise
        except SourceError as exc:
            if self._max_attempts == 0:
                raise
            failure = str(exc)
        if not self._retry(failure):
            raise SourceError(f"stopped while waiting for {self._label} to come up")

    def _probe_fps(self) -> float:
        fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        # Containers without a rate report 0, some streams NaN or silly values (90000 = the RTP
        # clock): one warning and a common default beats a writer that refuses to open.
        if not math.isfinite(fps) or not _MIN_FPS <= fps <= _MAX_FPS:
            log.warning("%s reports fps %r; assuming %.1f", self._label, fps, _DEFAULT_FPS)
            return _DEFAULT_FPS
        return fps

    def _probe_frame_count(self) -> Optional[int]:
        if self._probe.frame_count is not None:
            return self._probe.frame_count  # the container's own count
        # Otherwise OpenCV's estimate, duration x fps, where the duration may be the audio's.
        count = float(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        # Unknown lengths come back as 0, -1 or -2**63 depending on the container.
        if not math.isfinite(count) or count <= 0:
            return None
        return int(round(count))

    # -- reading --------------------------------------------------------------------------

    def _finished(self) -> bool:
        if self._closing and not self._closed:  # close() came while this thread was inside a read
            self._closed = True
            self._pending = None
            self._release()
        # No capture and nothing pending: a reconnect was cut short by stop/close; nothing to read from.
        no_input = self._cap is None and self._pending is None
        return self._closed or self._ended or no_input or self._stop.is_set()

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _make_frame(self, image: np.ndarray, captured: float) -> Frame:
        index = self._take_index()
        # Files carry media time so results line up with the video; live sources carry wall-clock time.
        timestamp = captured if self.info.live else self._media_time(index)
        return Frame(image=image, index=index, timestamp_s=timestamp)

    def _media_time(self, index: int) -> float:
        """Seconds from the video's start to frame `index`, decoded just now: the decoder's media
        time, which a variable-frame-rate file needs (index / fps is only its average); where the
        decoder gives none, frame intervals at the nominal rate on from the last frame that had one."""
        if self._last_ms is not None:
            self._timed = (index, self._last_ms / 1000.0)
            return self._timed[1]
        last_index, last_s = self._timed
        return last_s + (index - last_index) / self.info.fps

    def _place(self) -> bool:
        """Account for frames of a file lost just before the one decoded now; False to drop this one.

        Called after every successful read/grab of a file. Lost frames advance the index and are
        counted and reported. A frame whose media time lies behind the last one handed out, right
        after damage, is the decoder's reordering gone wrong: it is dropped (indices must rise).
        """
        self._bad_reads = 0
        failures, self._unplaced = self._unplaced, 0
        last, now = self._last_ms, self._media_ms()
        if self._watch == 0:
            # No damage seen lately: whatever the timestamps do is the file's own timing.
            self._last_ms = now
            return True
        self._watch -= 1
        # Without usable timestamps each failed read stands for one lost frame.
        missing = failures
        if now is not None and last is not None:
            steps = (now - last) * self.info.fps / 1000.0
            if steps < 0.5:
                log.debug("%s: dropped an out-of-order frame at %.1f ms after damage", self._label, now)
                self._unplaced = failures
                return False
            if self._plausible(round(steps) - 1):
                missing = round(steps) - 1
        self._last_ms = now
        if missing > 0:
            self._skip(missing)
        return True

    def _plausible(self, missing: int) -> bool:
        expected = self.info.frame_count
        if expected is not None:
            return self._next_index + missing < expected
        return missing <= _MAX_GAP_S * self.info.fps

    def _skip(self, missing: int) -> None:
        first = self._next_index
        self._next_index += missing
        self._skipped += missing
        if missing == 1:
            log.warning("frame %d of %s is corrupt or missing; skipped", first, self.info.name)
        else:
            log.warning("frames %d-%d of %s are corrupt or missing; skipped",
                        first, first + missing - 1, self.info.name)

    def _media_ms(self, *, first: bool = False) -> Optional[float]:
        """Media time of the frame just decoded, in ms from the stream's start; None when unknown."""
        ms = float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
        # OpenCV reports 0 for a frame without a timestamp; only the first frame may really sit at 0.
        if not math.isfinite(ms) or ms < 0 or (ms == 0 and not first):
            return None
        return ms

    def _recover(self, reason: str) -> bool:
        """After a failed read: True to read on (a new first frame pending, or a file read past
        damage), False when reading should stop."""
        if not self.info.live:
            # Files never reconnect. A failure before the promised end is read past a few times (each
            # failed read consumes the damaged packet); after that, or at the end, the file is over.
            expected = self.info.frame_count
            if (expected is None or self._next_index < expected) and self._bad_reads < _MAX_BAD_READS:
                self._bad_reads += 1
                self._unplaced += 1
                self._watch = _GAP_WINDOW
                return True
            self._ended = True
            if expected is not None and self._next_index < expected and not self._reached_end(expected):
                log.warning(
                    "%s ended after %d of %d frames (truncated or corrupt file?)",
                    self._label, self._next_index, expected,
                )
            return False
        if self._closing or self._stop.is_set():
            return False
        self._release()
        try:
            if self._max_attempts == 0:
                raise SourceError(f"{self._label} dropped ({reason}) and reconnecting is disabled")
            if not self._retry(f"{self._label} dropped ({reason})"):
                return False
        except SourceError:
            self._ended = True  # the capture is gone: later calls return None instead of failing again
            raise
        height, width = self._pending[0].shape[:2]
        if (width, height) != (self.info.width, self.info.height):
            log.warning(
                "%s came back at %dx%d instead of %dx%d",
                self._label, width, height, self.info.width, self.info.height,
            )
        return True

    def _reached_end(self, expected: int) -> bool:
        """Whether a file that gave fewer frames than `expected` was read to its end all the same."""
        if self._probe.frame_count is None and expected - self._next_index <= 1:
            return True  # only OpenCV's estimate, duration x fps rounded, which is one frame out either way
        # An AVI index counts an empty entry for a frame the encoder dropped: the frames still
        # reach the end of the stream, which a file cut short does not.
        end, last_ms = self._probe.duration_s, self._last_ms
        return end is not None and last_ms is not None and last_ms / 1000 + 1.5 / self.info.fps >= end

    def _retry(self, failure: str) -> bool:
        """Reopen with back-off after `failure` (a one-line description).

        True once open (its first frame pending), False if stopped or closed meanwhile;
        SourceError once the attempts are used up.
        """
        for attempt in range(1, self._max_attempts + 1):
            delay = min(self._backoff_cap_s, 2.0 ** (attempt - 1))
            log.warning("%s; reconnecting in %g s (attempt %d/%d)", failure, delay, attempt, self._max_attempts)
            if not self._sleep(delay):
                return False
            try:
                self._open_once()
            except _Refused:
                raise
            except SourceError as exc:
                failure = str(exc)
                continue
            log.info("%s reconnected after %d attempt(s)", self._label, attempt)
            return True
        raise SourceError(f"gave up on {self._label} after {self._max_attempts} reconnect attempts; last error: {failure}")

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False as soon as stop is set or close() is called."""
        deadline = time.monotonic() + seconds
        while True:
            if self._closing:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            # The stop event wakes this at once; the slice only bounds how late close() is noticed.
            if self._stop.wait(min(remaining, _WAKE_SLICE_S)):
                return False

    def _release(self) -> None:
        if self._cap is not None:
            cap, self._cap = self._cap, None
            cap.release()
