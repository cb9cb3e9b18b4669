"""The video pipeline: capture thread -> segmenting thread -> output stage, joined by bounded queues.

Part of the pipeline layer (with `pipeline.py` for still images): it alone knows the order of the
stages and owns their threads. With a window, the output stage runs in the caller's thread,
because OpenCV's window functions must stay on one thread (Qt wants the main one); a file run
without a window whose model runs on the CPU gives it a thread of its own, one that can step back
behind the model (see `_give_way`).

Two policies:

- files: every frame, in order. The capture thread never gets more than a few frames ahead
  (bounded queue), so memory does not grow with the video's length.
- live sources (cameras, streams): latest frame wins. The capture thread keeps reading at the
  source's rate and overwrites a one-frame slot; the model takes the newest frame when it is
  free; the output shows the newest frame with the most recent mask. Nothing queues up, so
  the preview never lags further and further behind.

Failure in any stage sets the shared stop event; every blocking put/get wakes on it, so no
stage waits forever on a dead neighbour. The first error is re-raised in the caller's thread
after all threads have been joined.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import cv2
import numpy as np

from .overlay import Painter, draw_legend
from .pipeline import class_record
from .sinks import JsonLines, MaskDir, write_png
from .sources import VideoSource
from .types import Frame, Segmentation

log = logging.getLogger(__name__)

_END = object()  # sentinel: no more items
_POLL_S = 0.1  # how often a blocked put/get looks at the stop event
_JOIN_S = 30  # the longest wait for the stages to end after a stop
_QUEUE_BYTES = 64 * 2**20  # the most frame data one queue between stages holds (file runs)
_IDLE_S = 0.1  # how often a preview with nothing new to show still looks at its keys
_CAPTURE_GRACE_S = 0.5  # how long a stop waits for a capture stage inside a source read
#: how far a file run's capture and output threads step back behind the model's thread (nice
#: levels: at +10, a thread sharing a core with the model gets about 1/10 of it while the model
#: needs the core, and all of it while the model waits)
_GIVE_WAY_NICE = 10


def _give_way() -> None:
    """Lower the calling thread's scheduling priority (Linux, where priority is per thread).

    With the model on the CPU, a file run is the model plus decode, preprocess, label maps, blend
    and encode, all on the same cores. The model is the one stage that cannot be split, so every
    moment it waits for a core is lost for good, while the other stages have slack: they run
    ahead or catch up through the queues between them. At equal priority the kernel shares a core
    fairly between the model and whichever stage is busy; measured on a 2-core machine with the
    ONNX model, that slowed the model's forward from 17.5 to 21 ms and the run from about 57 to
    49 frames/s. Elsewhere (macOS, Windows) priority is the whole process's, so this does nothing.
    Only worker threads call this: a thread cannot raise its priority back without privileges.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + _GIVE_WAY_NICE))
    except OSError as error:  # pragma: no cover - a sandbox that forbids it: run at equal priority
        log.debug("cannot lower this thread's priority: %s", error)


class _Labeller(Protocol):
    def segment_batch(self, frames: list[Frame]) -> list[Segmentation]: ...


class _Display(Protocol):
    def show(self, image: np.ndarray, *, fps: Optional[float] = None) -> Optional[str]: ...
    def wait_key(self, delay_ms: int) -> Optional[str]: ...


class _Writer(Protocol):
    width: int
    height: int
    frames_written: int

    def write(self, image: np.ndarray, timestamp_s: Optional[float] = None) -> None: ...


class _Balance:
    """How a file run with the model on the CPU shares the cores, settled early in the run.

    The model is the one stage that cannot be split or run ahead, so once this is settled the
    capture and output threads give way to it (`_give_way`). What is settled first, at equal
    priority, is how many threads the model gets. For most models the forward pass is the bulk
    of the work and every core makes it faster. With a light model, or a stride that skips the
    model on most frames, the rest of a frame's work (decode, preprocess, label map, blend,
    encode) is as large as the forward, and the model's last thread may cost more than it gives:
    in the pipeline each of the forward's parts waits for the others whenever a stage holds a
    core.

    So after a warm-up the run times, over the same frames, the forward (wall time, per frame of
    the video) and the CPU the rest takes per frame, with the model on every core. Where the rest
    is under `SHARE` of the forward, that settles it. Otherwise a second window times the forward
    on one core fewer, and the run keeps whichever setting gives the shorter time per frame:

    - every core: the forward, then the rest shared out over the cores (the model's threads hold
      every core while they run): ``forward_all + rest / cores``;
    - one core fewer: the model on its cores, the rest alongside, whichever is longer:
      ``max(forward_fewer, (forward_fewer + rest) / cores)``.

    Measured on a 2-core AMD EPYC (720p video): the ONNX model (forward 12-15 ms on both cores in
    the pipeline, about 15 on one, rest 15-17 ms) gets one core; LR-ASPP keeps both, at stride 4
    too (forward 91 ms every 4 frames on both cores, about 140 on one, rest 13 ms per frame:
    240 frames took 6.6 s on both cores and 9.9 s on one). The forward is compared on its own
    rather than two windows' frame rates: decoding and encoding cost changes with the picture,
    so two windows' rates differ by more than the two settings do, while a forward's cost does
    not depend on the picture.

    Only a segmenter whose thread count the caller left to streamseg is changed. One given fewer
    threads than there are cores has the other stages give way from the start; one given every
    core explicitly is left to the kernel's fair share.
    """

    WARM = 4  # forwards before timing (buffers, encoder set-up)
    REWARM = 2  # forwards before timing again on fewer threads (a new onnxruntime session's first run)
    FRAMES = 8  # forwards in a timed window, and at least
    WINDOW_S = 0.5  # seconds in a timed window
    SHARE = 0.5  # rest-of-the-work / forward ratio from which one core fewer is tried

    def __init__(self, segmenter, stride: int, *, own_output: bool, cores: Optional[int] = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.segmenter = segmenter
        self.stride = stride
        self.cores = cores or os.cpu_count() or 1
        self._now = clock
        # Threads that may lower their priority: the pipeline's own, never the caller's.
        self._may_give_way = {"capture"} | ({"output"} if own_output else set())
        self._give_way = threading.Event()
        self._settled: set[str] = set()  # threads with nothing left to do in step()
        self._clock: dict[str, float] = {}
        self._cpu: dict[str, list] = {"capture": [0.0, 0], "output": [0.0, 0]}  # CPU seconds, frames in the timed window
        self._timing = False
        self._count = 0  # forwards so far in this setting
        self._warm = self.WARM
        self._since = 0.0
        self._forwards: list[float] = []  # seconds per segmented frame, in the timed window
        self._all: Optional[tuple[float, float]] = None  # (forward, rest) ms per frame on every core
        self.outcome = "all cores"
        threads = getattr(segmenter, "threads", None)
        if threads is not None and threads < self.cores:
            self._give_way.set()
        # Nothing to settle where the caller chose the threads, or where there is one core.
        self.decided = threads is None or threads < self.cores or not getattr(segmenter, "auto_threads", False) or self.cores < 2
        if self.decided:
            self.outcome = "the threads it was given"
            if not self._give_way.is_set():
                self._settled = {"capture", "output"}  # nothing to time, nothing to give

    def step(self, name: str) -> None:
        """Called by the capture and output threads once per frame. Once the run has settled
        (and this thread has given way, where it should), it returns at once."""
        if name in self._settled:
            return
        if self._give_way.is_set():
            if name in self._may_give_way:
                _give_way()
            self._settled.add(name)
            return
        now = time.thread_time()
        last = self._clock.get(name)
        self._clock[name] = now
        if last is not None and self._timing and now >= last:  # (a stage's new thread starts its clock at 0)
            seen = self._cpu[name]
            seen[0] += now - last
            seen[1] += 1

    def forward(self, seconds: float, frames: int) -> None:
        """Called by the model's thread after each forward pass."""
        if self.decided:
            return
        now = self._now()
        self._count += 1
        if not self._timing:
            if self._count >= self._warm:
                self._timing, self._since = True, now
                self._forwards, self._cpu = [], {"capture": [0.0, 0], "output": [0.0, 0]}
            return
        self._forwards.append(seconds / max(1, frames))
        counts = [n for _, n in self._cpu.values()]
        if len(self._forwards) < self.FRAMES or min(counts) < self.FRAMES or now - self._since < self.WINDOW_S:
            return
        self._timing = False
        model_ms = 1000 * float(np.median(self._forwards)) / self.stride  # per frame of the video
        rest_ms = 1000 * sum(cpu / n for cpu, n in self._cpu.values())
        fewer = self.cores - 1
        if self._all is None:  # the window on every core
            if rest_ms < self.SHARE * model_ms:
                self._settle(f"the model runs on all cores: its forward takes {model_ms:.1f} ms per frame of the "
                             f"video, the rest {rest_ms:.1f} ms of CPU")
                return
            self._all = (model_ms, rest_ms)
            self.segmenter.set_threads(fewer)
            self._count, self._warm = 0, self.REWARM
            return
        all_ms = self._all[0] + self._all[1] / self.cores
        fewer_ms = max(model_ms, (model_ms + rest_ms) / self.cores)
        if fewer_ms < all_ms:
            self.outcome = f"{fewer} of {self.cores} cores"
        else:
            self.segmenter.set_threads(self.cores)
        self._settle(f"the model runs on {self.outcome}: its forward takes {self._all[0]:.1f} ms per frame of the "
                     f"video on all cores, {model_ms:.1f} on {fewer}, the rest {self._all[1]:.1f} / {rest_ms:.1f} ms "
                     f"of CPU: about {all_ms:.1f} against {fewer_ms:.1f} ms per frame")

    def _settle(self, how: str) -> None:
        self.decided = True
        self._give_way.set()
        log.debug("%s", how)


@dataclass(frozen=True, slots=True)
class VideoOutputs:
    """Where results go; any of them may be absent."""

    writer: Optional[_Writer] = None
    window: Optional[_Display] = None
    masks: Optional[MaskDir] = None
    stats: Optional[JsonLines] = None
    snapshot_dir: Path = Path(".")

    @property
    def needs_pixels(self) -> bool:
        """Whether frames that are not segmented must still be decoded (to be written or shown)."""
        return self.writer is not None or self.window is not None


@dataclass(frozen=True, slots=True)
class VideoSettings:
    stride: int = 1
    batch: int = 1
    alpha: float = 0.5
    legend: bool = False
    #: paint segmented frames on the model's device; None: where the model runs on CUDA
    paint_on_device: Optional[bool] = None
    #: a file run decides early how the model and the other stages share the CPU cores (see
    #: `_Balance`); None: where the model runs on the CPU
    share_cores: Optional[bool] = None


@dataclass(frozen=True, slots=True)
class VideoReport:
    """What a run did. `ended` is 'end' (input finished), 'quit' (key) or 'stopped' (stop event).

    `frames_skipped`: frames of a file the source could not decode (corrupt or missing); the output
    video repeats the previous overlay in their place, stats and masks have no entry for them.
    """

    frames_read: int
    frames_segmented: int
    frames_written: int
    frames_dropped: int
    ended: str
    elapsed_s: float
    frames_skipped: int = 0
    #: Live recordings: seconds from the first frame recorded to the last (their capture times).
    recorded_s: Optional[float] = None


@dataclass(slots=True)
class _Item:
    frame: Optional[Frame]  # None for a frame skipped without decoding
    index: int
    labels: Optional[np.ndarray] = None  # set on segmented frames
    seg: Optional[Segmentation] = None
    overlay: Optional[np.ndarray] = None  # painted on the device (CUDA fast path)
    prepared: Optional[Any] = None  # the model's input (torch.Tensor), made by the capture thread
    pending: Optional[Any] = None  # the model's answer, label maps still to make (PendingSegmentation)
    position: int = 0  # this frame's place in `pending`


class _Slot:
    """A one-item mailbox: put() replaces what is there (latest-frame policy)."""

    def __init__(self, cond: Optional[threading.Condition] = None) -> None:
        # Slots may share one condition, so that a reader can wait on several (`_wait_either`).
        self._cond = cond or threading.Condition()
        self._item = None
        self._version = 0
        self._closed = False

    def put(self, item) -> None:
        with self._cond:
            self._item = item
            self._version += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get_newer(self, version: int, stop: threading.Event):
        """(version, item) newer than `version`; None once closed (and drained) or stopped."""
        with self._cond:
            while self._version <= version:
                if self._closed or stop.is_set():
                    return None
                self._cond.wait(_POLL_S)
            return self._version, self._item


def _wait_either(frames: _Slot, version: int, masks: _Slot, mask_version: Optional[int], stop: threading.Event,
                 idle_s: Optional[float] = None):
    """Wait for a frame newer than `version` or, unless mask_version is None, a mask newer than
    `mask_version` (the slots share one condition). Returns (frame or None, mask or None) as
    (version, item) pairs, (None, None) after `idle_s` with neither (when given); None once
    `frames` is closed and drained, or on stop."""
    give_up = None if idle_s is None else time.monotonic() + idle_s
    with frames._cond:
        while True:
            frame = (frames._version, frames._item) if frames._version > version else None
            mask = None
            if mask_version is not None and masks._version > mask_version:
                mask = (masks._version, masks._item)
            if frame is not None or mask is not None:
                return frame, mask
            if frames._closed or stop.is_set():
                return None
            if give_up is not None and time.monotonic() >= give_up:
                return None, None
            frames._cond.wait(_POLL_S)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if stop.is_set():
                return _END


class VideoPipeline:
    """Runs one source through the segmenter into the outputs.

    >>> with VideoSource("clip.mp4") as src:                                   # doctest: +SKIP
    ...     report = VideoPipeline(src, segmenter, VideoOutputs(writer=w)).run()
    """

    def __init__(
        self,
        source: VideoSource,
        segmenter: _Labeller,
        outputs: VideoOutputs,
        settings: VideoSettings = VideoSettings(),
        *,
        painter: Painter,
        stop: Optional[threading.Event] = None,
        on_frame: Optional[Callable[[int], None]] = None,
        on_show: Optional[Callable[[int], None]] = None,
    ):
        self.source = source
        self.segmenter = segmenter
        self.outputs = outputs
        self.settings = settings
        self.painter = painter
        self.stop = stop or threading.Event()
        self.on_frame = on_frame  # each source frame, once it is written and shown
        self.on_show = on_show  # each image handed to the window, with the index of its frame
        self.live = source.info.live
        # Painting next to the model pays off where the frames already sit on a GPU; on the CPU
        # the output thread paints in parallel with the model instead.
        device = getattr(getattr(segmenter, "device", None), "type", None)
        on_device = settings.paint_on_device if settings.paint_on_device is not None else device == "cuda"
        self._paint_on_device = bool(on_device and hasattr(segmenter, "render"))
        # Elsewhere the capture thread also preprocesses the frames the model will see, and the
        # output stage makes the label maps: the model's thread runs the model and nothing else.
        self._infer_apart = not self._paint_on_device and hasattr(segmenter, "infer")
        self._prepare_early = self._infer_apart and hasattr(segmenter, "prepare")
        share = settings.share_cores if settings.share_cores is not None else device == "cpu"
        share = share and not self.live
        # A file run whose output stage may have to give way to the model gives that stage a
        # thread of its own (see _give_way); with a window it stays in the caller's thread.
        self._own_output = share and outputs.window is None
        self._balance = _Balance(segmenter, settings.stride, own_output=self._own_output) if share else None
        self._errors: list[BaseException] = []
        self._read = 0
        self._segmented = 0
        self._dropped = 0
        self._ended = "end"
        # The last image handed to the writer, repeated in place of frames lost to damage.
        self._last_written: Optional[np.ndarray] = None
        # Live: capture times (monotonic clock) of the stream's first frame and of the first
        # frame recorded.
        self._live_start: Optional[float] = None
        self._recording_start: Optional[float] = None
        self._recorded_s: Optional[float] = None
        # The legend's classes of the last label map: with --stride N, N frames share one map.
        self._legend_of: tuple[Optional[np.ndarray], tuple[int, ...]] = (None, ())

    # -- threads ---------------------------------------------------------------------------

    def _thread(self, name: str, fn: Callable[[], None]) -> "_Stage":
        """A stage's thread (not started). Its errors go to the caller's thread, never swallowed."""
        ended = threading.Event()

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self._errors.append(exc)
                self.stop.set()
            finally:
                ended.set()

        return _Stage(threading.Thread(target=run, name=name, daemon=True), ended)

    def _capture_file(self, out: queue.Queue) -> None:
        balance = self._balance
        stride = self.settings.stride
        decode_all = self.outputs.needs_pixels
        index = 0  # the index the next frame should have: a damaged source may jump past it
        try:
            while not self.stop.is_set():
                if balance is not None:
                    balance.step("capture")
                if decode_all or index % stride == 0:
                    frame = self.source.read()
                    if frame is None:
                        break
                    item = _Item(frame=frame, index=frame.index)
                    if self._prepare_early and frame.index % stride == 0:
                        item.prepared = self.segmenter.prepare([frame.image])
                else:
                    # grab() skips the colour conversion of a frame nobody will look at.
                    skipped = self.source.grab()
                    if skipped is None:
                        break
                    item = _Item(frame=None, index=skipped)
                index = item.index + 1
                self._read += 1
                if not _put(out, item, self.stop):
                    return
        finally:
            _put(out, _END, self.stop)

    def _segment_file(self, inq: queue.Queue, out: queue.Queue) -> None:
        stride, batch = self.settings.stride, self.settings.batch
        pending: list[_Item] = []
        todo: list[_Item] = []

        def flush() -> bool:
            if todo and self._paint_on_device:
                # CUDA: segmented and painted on the device, one download per frame.
                for it, (seg, overlay) in zip(todo, self.segmenter.render([it.frame for it in todo], self.painter, on_device=True)):
                    it.labels, it.seg, it.overlay = seg.labels, seg, overlay
            elif todo and self._infer_apart:
                # Only the model runs here; the output stage makes the label maps, so the two
                # stages share the work rather than this one doing both.
                inputs = [it.prepared for it in todo]
                prepared = None if any(x is None for x in inputs) else inputs
                started = time.perf_counter()
                answer = self.segmenter.infer([it.frame for it in todo], prepared=prepared)
                if self._balance is not None:
                    self._balance.forward(time.perf_counter() - started, len(todo))
                for k, it in enumerate(todo):
                    it.pending, it.position, it.prepared = answer, k, None
            elif todo:
                segs = self.segmenter.segment_batch([it.frame for it in todo])
                for it, seg in zip(todo, segs):
                    it.labels, it.seg = seg.labels, seg
            todo.clear()
            for it in pending:
                if not _put(out, it, self.stop):
                    return False
            pending.clear()
            return True

        try:
            while True:
                item = _get(inq, self.stop)
                if item is _END:
                    flush()
                    return
                pending.append(item)
                if item.frame is not None and item.index % stride == 0:
                    todo.append(item)
                    if len(todo) >= batch and not flush():
                        return
                elif not todo and not flush():
                    # Nothing waits for the model: pass the frame on at once.
                    return
        finally:
            _put(out, _END, self.stop)

    def _capture_live(self, for_model: _Slot, for_output: _Slot) -> None:
        try:
            while not self.stop.is_set():
                frame = self.source.read()
                if frame is None:
                    break
                self._read += 1
                if self._live_start is None:
                    self._live_start = frame.timestamp_s
                for_model.put(frame)
                for_output.put(frame)
        finally:
            for_model.close()
            for_output.close()

    def _segment_live(self, frames: _Slot, masks: _Slot) -> None:
        stride = self.settings.stride
        version, last_index = 0, -stride
        try:
            while True:
                got = frames.get_newer(version, self.stop)
                if got is None:
                    return
                version, frame = got
                if frame.index - last_index < stride:
                    continue
                last_index = frame.index
                seg = self.segmenter.segment_batch([frame])[0]
                self._segmented += 1
                # Recorded here, not by the output stage: it only sees the newest mask, and
                # --stats/--save-masks promise a line and a file for every segmented frame.
                self._record(seg)
                masks.put(seg)
        finally:
            masks.close()

    # -- output stage (caller's thread, or its own) ------------------------------------------

    def run(self) -> VideoReport:
        start = time.monotonic()
        threads: list[_Stage] = []
        try:
            if self.live:
                shared = threading.Condition()  # the output stage waits on a new frame or a new mask
                frames, for_output, masks = _Slot(), _Slot(shared), _Slot(shared)
                threads = [
                    self._thread("streamseg-capture", lambda: self._capture_live(frames, for_output)),
                    self._thread("streamseg-segment", lambda: self._segment_live(frames, masks)),
                ]
                for t in threads:
                    t.thread.start()
                self._output_live(for_output, masks)
            else:
                # Room for a few batches, each with the frames that ride along at --stride N, but
                # never more than _QUEUE_BYTES of frames per queue: a large stride (or batch) on
                # 4K video would otherwise queue thousands of frames, gigabytes.
                depth = max(4, 2 * self.settings.batch)
                info = self.source.info
                per_frame = max(1, info.width * info.height * 3)
                size = min(depth * self.settings.stride, max(self.settings.batch, 4, _QUEUE_BYTES // per_frame))
                raw: queue.Queue = queue.Queue(maxsize=size)
                done: queue.Queue = queue.Queue(maxsize=size)
                threads = [
                    self._thread("streamseg-capture", lambda: self._capture_file(raw)),
                    self._thread("streamseg-segment", lambda: self._segment_file(raw, done)),
                ]
                output = None
                if self._own_output:
                    output = self._thread("streamseg-output", lambda: self._output_file(done))
                    threads.append(output)
                for t in threads:
                    t.thread.start()
                if output is None:
                    self._output_file(done)
                else:
                    output.ended.wait()  # wakes for Ctrl+C, as the output stage did here
        except BaseException as exc:
            self._errors.insert(0, exc)
        finally:
            late = self._wind_down(threads)
        if self._errors:
            raise self._errors[0]
        if late is not None:
            raise late
        writer = self.outputs.writer
        return VideoReport(
            frames_read=self._read,
            frames_segmented=self._segmented,
            frames_written=writer.frames_written if writer is not None else 0,
            frames_dropped=self._dropped,
            ended=self._ended,
            elapsed_s=time.monotonic() - start,
            # Sources without damage accounting (live ones, test doubles) have skipped nothing.
            frames_skipped=getattr(self.source, "frames_skipped", 0),
            recorded_s=self._recorded_s,
        )

    def _wind_down(self, threads: list[_Stage]) -> Optional[BaseException]:
        """Stop every stage and wait until each has ended; returns an interruption that came
        meanwhile, for the caller to raise afterwards.

        The caller closes the writer and the source once run() returns. Closing the writer while
        the output stage is still inside it ends in a crash inside FFmpeg (a segfault, or an abort
        with the video lost), so a second Ctrl-C here must not cut the wait short: the stages are
        already stopping, and each ends within a frame or a source read. The wait is on each
        stage's own event, not Thread.join(): a join that a signal interrupts marks the thread as
        ended while it still runs (CPython 3.11), and is_alive() then says False.
        """
        late: Optional[BaseException] = None
        stopped = False
        # The capture stage last, and not for long: it touches only the source, and a stalled
        # stream keeps it inside a read until the read timeout (10 s). It ends when that read
        # returns; the source releases its capture then.
        others = [t for t in threads if t.thread.name != "streamseg-capture"]
        capture = [t for t in threads if t.thread.name == "streamseg-capture"]
        deadline = time.monotonic() + _JOIN_S
        capture_deadline: Optional[float] = None
        while True:
            try:
                if not stopped:
                    self.stop.set()
                    # Closing the source ends a reconnect wait at once; a read already inside
                    # OpenCV returns within the source's read timeout.
                    self.source.close()
                    stopped = True
                _wait_ended(others, deadline)
                if capture_deadline is None:
                    capture_deadline = min(deadline, time.monotonic() + _CAPTURE_GRACE_S)
                _wait_ended(capture, capture_deadline)
                break
            except BaseException as exc:  # a further signal while the stages stop
                late = late or exc
        for t in others:  # pragma: no cover - a stage stuck past every timeout
            log.warning("thread %s did not stop within %d s", t.thread.name, _JOIN_S)
        if capture:
            log.debug("the capture thread is still inside a source read; it ends when the read returns")
        return late

    def _output_file(self, done: queue.Queue) -> None:
        last: Optional[np.ndarray] = None
        shown = _Rate()
        expected = 0  # the next index in the source; a higher one means frames were lost to damage
        balance = self._balance
        while True:
            if balance is not None:
                balance.step("output")
            item = _get(done, self.stop)
            if item is _END:
                if self.stop.is_set() and not self._errors:
                    self._ended = "stopped" if self._ended == "end" else self._ended
                return
            if item.index > expected:
                self._fill(expected, item.index)
            expected = item.index + 1
            if item.pending is not None:
                item.seg = item.pending.result()[item.position]
                item.labels, item.pending = item.seg.labels, None
            if item.seg is not None:
                last = item.labels
                # Counted here, not where the model ran: a frame segmented as a stop came in
                # never reaches the video, and the report speaks of the video written.
                self._segmented += 1
                self._record(item.seg)
            if item.frame is not None and self.outputs.needs_pixels:
                if self._present(item.frame, last, shown, painted=item.overlay) == "quit":
                    self._ended = "quit"
                    self.stop.set()
                    return
            if self.on_frame is not None:
                self.on_frame(item.index)

    def _fill(self, start: int, stop: int) -> None:
        """Stand in for source frames start..stop-1, lost to damage: the video repeats the previous
        overlay so it keeps the source's frame count and duration. Stats and masks get no entry."""
        writer = self.outputs.writer
        for index in range(start, stop):
            # Written before the next _present(), so the image still holds the previous overlay.
            if writer is not None and self._last_written is not None:
                writer.write(self._last_written)
            if self.on_frame is not None:
                self.on_frame(index)

    def _output_live(self, frames: _Slot, masks: _Slot) -> None:
        version, mask_version = 0, 0
        last_index = -1
        last: Optional[np.ndarray] = None
        frame: Optional[Frame] = None
        shown = _Rate()
        # With a window, a new mask is shown at once on the frame on screen, rather than with the
        # next frame (up to one frame interval later); recordings get source frames only.
        redraw = self.outputs.window is not None
        window = self.outputs.window
        while True:
            got = _wait_either(frames, version, masks, mask_version if redraw and frame is not None else None, self.stop,
                               idle_s=_IDLE_S if window is not None else None)
            if got is None:
                if self.stop.is_set() and not self._errors and self._ended == "end":
                    self._ended = "stopped"
                return
            new_frame, new_mask = got
            if window is not None and new_frame is None and new_mask is None:
                # Nothing new (a stream that stalled or is reconnecting): the window still answers
                # q, Esc, its close button, space and s.
                action = self._present(frame, last, shown, write=False) if frame is not None else window.wait_key(1)
                if action == "quit":
                    self._ended = "quit"
                    self.stop.set()
                    return
                continue
            if new_mask is None:
                new_mask = masks.get_newer(mask_version, _SET)
            if new_mask is not None:
                mask_version, seg = new_mask
                last = seg.labels
            if new_frame is None:
                if frame is not None and self._present(frame, last, shown, write=False) == "quit":
                    self._ended = "quit"
                    self.stop.set()
                    return
                continue
            version, frame = new_frame
            if last_index >= 0 and frame.index > last_index + 1:
                self._dropped += frame.index - last_index - 1
            last_index = frame.index
            if self.outputs.needs_pixels and self._present(frame, last, shown) == "quit":
                self._ended = "quit"
                self.stop.set()
                return
            if self.on_frame is not None:
                self.on_frame(frame.index)

    def _record(self, seg: Segmentation) -> None:
        if self.outputs.masks is not None:
            self.outputs.masks.write(seg.frame.index, seg.labels)
        if self.outputs.stats is not None:
            # Files: the frame's media time. Live: seconds since the stream's first frame (capture
            # times are on the monotonic clock, which means nothing outside this process).
            when = seg.frame.timestamp_s - (self._live_start or 0.0) if self.live else seg.frame.timestamp_s
            self.outputs.stats.write({"index": seg.frame.index, "timestamp_s": round(when, 6), "classes": class_record(seg)})

    def _present(
        self, frame: Frame, labels: Optional[np.ndarray], rate: "_Rate", *, painted: Optional[np.ndarray] = None,
        write: bool = True,
    ) -> Optional[str]:
        image = frame.image
        if labels is not None and labels.shape == image.shape[:2]:
            overlay = painted if painted is not None else self.painter.blend(image, labels)
            if self.settings.legend:
                if self._legend_of[0] is not labels:
                    self._legend_of = (labels, tuple(c for c in self.painter.selected if np.any(labels == c)))
                present = self._legend_of[1]
                # Laid out for every selected class: text size and columns stay put while classes come and go.
                overlay = draw_legend(overlay, present, self.segmenter.categories, self.painter.palette,
                                      layout_for=self.painter.selected)
        else:
            # Before the first mask (live) or after a resolution change: the frame as it is.
            overlay = image
        writer = self.outputs.writer if write else None
        if writer is not None:
            if overlay.shape[1] != writer.width or overlay.shape[0] != writer.height:
                overlay = cv2.resize(overlay, (writer.width, writer.height), interpolation=cv2.INTER_AREA)
            # A file's frames keep their media time (a variable frame rate stays in sync with the
            # audio). A live recording places each frame at its capture time, from the first frame
            # recorded: it plays in real time whatever rate the camera claims (OpenCV says 25 fps
            # for any MJPEG stream) and whatever frames the preview had to skip.
            if self.live:
                if self._recording_start is None:
                    self._recording_start = frame.timestamp_s
                self._recorded_s = frame.timestamp_s - self._recording_start
                writer.write(overlay, self._recorded_s)
            else:
                writer.write(overlay, frame.timestamp_s)
            self._last_written = overlay
        window = self.outputs.window
        if window is None:
            return None
        # The title's rate counts source frames shown, not redraws for a new mask.
        action = window.show(overlay, fps=rate.tick() if write else None)
        if self.on_show is not None:
            self.on_show(frame.index)
        while action in ("pause", "snapshot"):
            if action == "snapshot":
                path = self.outputs.snapshot_dir / f"streamseg_snapshot_{frame.index:06d}.png"
                write_png(path, overlay)
                log.info("saved %s", path)
                action = None
                break
            # Paused: keep the window responsive until space again, q or Esc.
            action = window.wait_key(50)
            while action is None and not self.stop.is_set():
                action = window.wait_key(50)
            if action == "pause":
                action = None
                break
        return action


def _wait_ended(stages: list["_Stage"], deadline: float) -> None:
    """Wait until every stage in `stages` has ended, or `deadline` (monotonic) has passed; the
    stages that ended are taken out of the list."""
    while stages and time.monotonic() < deadline:
        if stages[0].ended.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
            stages.pop(0)


@dataclass(frozen=True)
class _Stage:
    """A pipeline stage's thread, and the event it sets when it has ended, whatever ended it."""

    thread: threading.Thread
    ended: threading.Event


class _AlwaysSet:
    def is_set(self) -> bool:
        return True


_SET = _AlwaysSet()  # makes _Slot.get_newer a non-blocking poll


class _Rate:
    """Frames per second over the last second or so, for the window title."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._n = 0
        self.fps: Optional[float] = None

    def tick(self) -> Optional[float]:
        self._n += 1
        now = time.monotonic()
        if now - self._t0 >= 1.0:
            self.fps = self._n / (now - self._t0)
            self._t0, self._n = now, 0
        return self.fps
