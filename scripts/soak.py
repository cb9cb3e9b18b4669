#!/usr/bin/env python3
"""Soak run: a live stream at its full rate through streamseg for a long time; is anything growing?

    python scripts/soak.py [--minutes 30] [--fps 25] [--size 640x360] [--model FILE.onnx]
                           [--interval 60] [--warmup 60] [--json soak.json] [--no-record]

A loopback MJPEG server (multipart/x-mixed-replace over HTTP on 127.0.0.1, as IP cameras serve
it), in a child process of its own so that it is not measured, delivers frames of a moving scene
at --fps, paced by the clock. This process runs them through what `streamseg URL -o rec.mp4
--stats rec.jsonl --no-show` runs: VideoSource (FFmpeg, timeouts, reconnect policy) ->
VideoPipeline (live policy: capture thread, segmenting thread, output stage) -> VideoWriter
(H.264) and JsonLines, with the model of --model (default: the pretrained ONNX model in
../shared/models, else a tiny generated one). The recording and the stats go to a temporary
directory that is removed at the end.

Every --interval seconds it logs resident memory, threads, open file descriptors, and frames read,
segmented, written and dropped (replaced by newer ones before they could be shown). The summary
compares the end with the state after --warmup (default: a tenth of the run, at most 60 s), when
the model, the encoder and the thread pools have all been set up: memory growth at the end and
at its largest, thread and fd counts. It is printed and, with --json, written as JSON.

This is a measuring tool, not a test; tests/test_soak.py runs a short version and asserts on it.
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import platform
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

SHARED_MODEL = ROOT.parent / "shared" / "models" / "deeplabv3_mobilenetv2_voc_257.onnx"
VOC = ("background,aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,dog,horse,"
       "motorbike,person,pottedplant,sheep,sofa,train,tvmonitor")


# --------------------------------------------------------------------------- the camera


def _serve(port_file: Path, width: int, height: int, fps: float) -> None:
    """The child: an MJPEG server on 127.0.0.1 at `fps`, frames of a moving scene; writes its port."""
    import cv2
    import numpy as np

    parts = []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(50):  # two seconds of distinct frames at 25 fps, looped
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = (xx * 255 // width + 5 * i) % 256
        image[..., 1] = yy * 255 // height
        x0 = (i * width // 50) % width
        cv2.rectangle(image, (x0, height // 3), (x0 + width // 5, 2 * height // 3), (60, 60, 220), -1)
        data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        parts.append(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data) + data + b"\r\n")
    period = 1.0 / fps

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            due = time.monotonic()
            n = 0
            while True:
                try:
                    self.wfile.write(parts[n % len(parts)])
                except OSError:  # the client went away
                    return
                n += 1
                due += period  # paced by the clock, not by the client: the source's full rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    due = time.monotonic()  # fell behind (a busy machine): do not burst to catch up

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    def orphaned() -> None:  # the soak process died without closing us: go too
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    server = Server(("127.0.0.1", 0), Handler)
    port_file.write_text(str(server.server_address[1]))
    server.serve_forever(poll_interval=0.2)


class Camera:
    """The MJPEG server, in a child process (so its threads and memory are not counted here)."""

    def __init__(self, *, width: int, height: int, fps: float) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="soak-camera-")
        port_file = Path(self._dir.name) / "port"
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import soak; "
                f"soak._serve(__import__('pathlib').Path({str(port_file)!r}), {width}, {height}, {fps})")
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the MJPEG server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}/video.mjpg"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._dir.cleanup()


# --------------------------------------------------------------------------- measuring


def _tiny_model(path: Path) -> Path:
    """A 1x1-convolution ONNX segmenter with streamseg metadata (needs the onnx package)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).normal(size=(21, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 96, 160])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 21, 96, 160])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(21, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {"streamseg.input_size": "160x96", "streamseg.mean": "127.5,127.5,127.5",
                       "streamseg.std": "64,64,64", "streamseg.categories": VOC}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


class _Counting:
    """The segmenter, counting the frames it segments."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.categories = inner.categories
        self.segmented = 0

    def segment_batch(self, frames):
        out = self.inner.segment_batch(frames)
        self.segmented += len(frames)
        return out


def _sample(process, started: float, counts: dict) -> dict:
    return {
        "t_s": round(time.monotonic() - started, 1),
        "rss_mb": round(process.memory_info().rss / 2**20, 1),
        "threads": process.num_threads(),
        "fds": process.num_fds() if hasattr(process, "num_fds") else process.num_handles(),
        **counts,
    }


def run(args: argparse.Namespace) -> dict:
    import psutil

    from streamseg.overlay import Painter
    from streamseg.segmenter import Segmenter
    from streamseg.sinks import JsonLines
    from streamseg.sources import VideoSource
    from streamseg.video import VideoOutputs, VideoPipeline, VideoSettings
    from streamseg.videowriter import VideoWriter

    width, height = (int(v) for v in args.size.lower().split("x"))
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(60.0, duration / 10)
    work = tempfile.TemporaryDirectory(prefix="soak-")
    model = args.model
    if model is None:
        model = str(SHARED_MODEL) if SHARED_MODEL.is_file() else str(_tiny_model(Path(work.name) / "tiny.onnx"))
    segmenter = _Counting(Segmenter(model, device="cpu", classes="car,person"))
    painter = Painter(selected=segmenter.inner.selected, palette=segmenter.inner.palette, alpha=0.5)
    camera = Camera(width=width, height=height, fps=args.fps)
    process = psutil.Process()
    stop = threading.Event()
    samples: list[dict] = []
    shown = {"frames": 0, "last_index": -1}
    started = time.monotonic()

    def counts() -> dict:
        read = shown["last_index"] + 1  # live frames are numbered as they are read
        return {"read": read, "segmented": segmenter.segmented, "written": shown["frames"] if args.record else 0,
                "dropped": max(0, read - shown["frames"])}

    def on_frame(index: int) -> None:
        shown["frames"] += 1
        shown["last_index"] = index

    def monitor() -> None:
        next_log = started + args.interval
        baseline_taken = False
        while not stop.wait(0.5):
            now = time.monotonic()
            if not baseline_taken and now - started >= warmup:
                baseline_taken = True
                samples.append({**_sample(process, started, counts()), "baseline": True})
                _log(samples[-1], "warm-up done: the baseline")
                while next_log <= now + 1:
                    next_log += args.interval
                continue
            if now >= next_log:
                next_log += args.interval
                samples.append(_sample(process, started, counts()))
                _log(samples[-1])
            if now - started >= duration:
                stop.set()

    # Ctrl-C or SIGTERM end the soak early but properly: summary written, camera closed.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"soak: {camera.url} at {args.fps:g} fps, {width}x{height}, for {duration:g} s; model "
          f"{Path(model).name}; warm-up {warmup:g} s", flush=True)
    first = _sample(process, started, counts())
    _log(first, "start")
    watcher = threading.Thread(target=monitor, name="soak-monitor", daemon=True)
    try:
        with VideoSource(camera.url, stop=stop, timeout_s=10.0) as source:
            recording = (VideoWriter(Path(work.name) / "rec.mp4", width=source.info.width,
                                     height=source.info.height, fps=source.info.fps)
                         if args.record else contextlib.nullcontext())
            with recording as writer, JsonLines(Path(work.name) / "rec.jsonl", overwrite=False) as stats:
                watcher.start()
                report = VideoPipeline(source, segmenter, VideoOutputs(writer=writer, stats=stats), VideoSettings(),
                                       painter=painter, stop=stop, on_frame=on_frame).run()
        end = _sample(process, started, counts())
        _log(end, "end")
    finally:
        stop.set()
        camera.close()
        work.cleanup()
    return _summary(args, model, width, height, duration, warmup, first, samples, end, report)


def _log(s: dict, note: str = "") -> None:
    print(f"soak: {s['t_s']:7.1f} s  rss {s['rss_mb']:7.1f} MB  threads {s['threads']:3d}  fds {s['fds']:3d}  "
          f"read {s['read']:7d}  segmented {s['segmented']:6d}  written {s['written']:7d}  "
          f"dropped {s['dropped']:6d}  {note}".rstrip(), flush=True)


def _summary(args, model, width, height, duration, warmup, first, samples, end, report) -> dict:
    """Memory, threads and fds: at the start, at the baseline after warm-up, in the last sample
    while frames still flowed, their largest value after warm-up, and after the run (threads
    joined, files closed)."""
    base = next((s for s in samples if s.get("baseline")), first)
    after = [s for s in samples if s["t_s"] >= base["t_s"]]
    last = after[-1]
    elapsed = end["t_s"]
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "source": {"fps": args.fps, "size": f"{width}x{height}", "kind": "MJPEG over HTTP on 127.0.0.1"},
        "model": Path(model).name,
        "recording": bool(args.record),
        "duration_s": elapsed,
        "warmup_s": base["t_s"],
        "frames": {"read": end["read"], "segmented": end["segmented"], "written": end["written"],
                   "dropped": end["dropped"], "read_fps": round(end["read"] / max(elapsed, 1e-9), 2),
                   "segmented_fps": round(end["segmented"] / max(elapsed, 1e-9), 2), "ended": report.ended},
        "rss_mb": {"start": first["rss_mb"], "after_warmup": base["rss_mb"], "last_in_run": last["rss_mb"],
                   "max": max(s["rss_mb"] for s in after), "after_run": end["rss_mb"],
                   "growth_after_warmup": round(last["rss_mb"] - base["rss_mb"], 1),
                   "max_growth_after_warmup": round(max(s["rss_mb"] for s in after) - base["rss_mb"], 1)},
        "threads": {"start": first["threads"], "after_warmup": base["threads"], "last_in_run": last["threads"],
                    "max": max(s["threads"] for s in after), "after_run": end["threads"]},
        "fds": {"start": first["fds"], "after_warmup": base["fds"], "last_in_run": last["fds"],
                "max": max(s["fds"] for s in after), "after_run": end["fds"]},
        "samples": samples,
    }
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--seconds", type=float, help="how long, in seconds (overrides --minutes)")
    parser.add_argument("--fps", type=float, default=25.0, help="the camera's frame rate (default 25)")
    parser.add_argument("--size", default="640x360", help="the camera's WxH (default 640x360)")
    parser.add_argument("--model", help="an ONNX file (default: ../shared's pretrained model, else a tiny one)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between log lines (default 60)")
    parser.add_argument("--warmup", type=float, help="seconds before the baseline (default: a tenth, at most 60)")
    parser.add_argument("--no-record", dest="record", action="store_false", help="do not write an MP4")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    summary = run(args)
    brief = {k: v for k, v in summary.items() if k != "samples"}
    print(json.dumps(brief, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
