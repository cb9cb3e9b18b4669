"""A loopback MJPEG camera for the tests: multipart/x-mixed-replace JPEG over HTTP on 127.0.0.1,
the way IP cameras serve MJPEG. Used through the `mjpeg_server` fixture in conftest.py."""
from __future__ import annotations

import http.server
import socketserver
import threading
import time
from typing import Optional, Sequence

import cv2
import numpy as np


def _part(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    data = buf.tobytes()
    return b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data) + data + b"\r\n"


class MjpegServer:
    """One MJPEG stream; stop() closes every connection and start() again reuses the same port.

    Frames: with `levels`, each start() begins a new "generation" whose frames are a flat grey of
    levels[generation] (so a recording shows which frames came before and after a restart);
    without, frame i of a connection is a flat grey of (3 i) mod 256.
    fps=None sends as fast as the client reads.
    stall_first: the first connection sends that many frames, then goes silent with its socket
    open, until stop() (or `release`).
    Counters: `connections` accepted, `sent[generation]` frames sent per generation.
    """

    def __init__(self, port: int = 0, *, size: tuple[int, int] = (160, 120), fps: Optional[float] = 25.0,
                 levels: Optional[Sequence[int]] = None, stall_first: Optional[int] = None) -> None:
        self.width, self.height = size
        # Encoded once when fixed: the server should cost the client process as little as possible.
        self._parts = [_part(self._grey(level)) for level in levels] if levels else None
        self.fps = fps
        self.stall_first = stall_first
        self.generation = -1
        self.sent: list[int] = []
        self.connections = 0
        self.stopping = threading.Event()
        self.release = threading.Event()  # ends a stall
        self._server: Optional[socketserver.TCPServer] = None
        self.port = port
        self.start()

    def _grey(self, level: int) -> np.ndarray:
        return np.full((self.height, self.width, 3), level, np.uint8)

    def _frame(self, generation: int, i: int) -> bytes:
        if self._parts is not None:
            return self._parts[generation % len(self._parts)]
        return _part(self._grey((i * 3) % 256))

    def start(self) -> None:
        owner = self
        self.generation += 1
        self.sent.append(0)
        generation = self.generation

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                owner.connections += 1
                stall_after = owner.stall_first if owner.connections == 1 else None
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while not owner.stopping.is_set():
                    if stall_after is not None and i >= stall_after:
                        owner.release.wait(10)
                        return
                    try:
                        self.wfile.write(owner._frame(generation, i))
                        self.wfile.flush()
                    except OSError:  # the client went away
                        return
                    owner.sent[generation] += 1
                    i += 1
                    if owner.fps:
                        time.sleep(1.0 / owner.fps)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True  # restart on the same port while old sockets sit in TIME_WAIT

        self.stopping.clear()
        self.release.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="test-mjpeg-server", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self.stopping.set()  # handlers leave their loops; their connections close
            self.release.set()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"
