"""The live preview window (OpenCV HighGUI) and its keys.

    with Window("streamseg") as window:
        for image in images:                      # (H, W, 3) uint8 BGR
            action = window.show(image, fps=12.5)
            if action == "quit":
                break

Keys: q, Q or Esc -> "quit" (so does closing the window), space -> "pause", s or S -> "snapshot".

Call every method from the thread that created the window: HighGUI (Qt or GTK) is not thread-safe.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from types import TracebackType
from typing import Optional

import cv2
import numpy as np

from .types import UsageError

log = logging.getLogger(__name__)

#: The most a preview window opens at (width, height); the user can resize it.
_START_SIZE = (1280, 720)

_KEYS = {ord("q"): "quit", ord("Q"): "quit", 27: "quit", ord(" "): "pause", ord("s"): "snapshot",
         ord("S"): "snapshot"}


@functools.lru_cache(maxsize=1)
def gui_backend() -> str:
    """The HighGUI backend of the installed OpenCV: "QT", "GTK", "WIN32", "COCOA", or "NONE"."""
    for line in cv2.getBuildInformation().splitlines():
        key, _, value = line.strip().partition(":")
        if key == "GUI":
            return value.strip().upper() or "NONE"
    return "NONE"


def _x_server_listens(display: str) -> bool:
    """Whether an X server seems to listen where DISPLAY points. Qt aborts the whole process when it
    cannot connect, so this is checked first; unknown DISPLAY syntaxes are left to the toolkit.

    A local display is looked up without connecting: a connection that closes without an X handshake
    can make a server with no other clients (a bare Xvfb) reset, and refuse the toolkit meanwhile.
    """
    host, _, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not number.isdigit() or host.startswith("/"):  # e.g. a macOS launchd path
        return True
    if host not in ("", "unix"):  # X over TCP, e.g. ssh -X's localhost:10
        try:
            socket.create_connection((host, 6000 + int(number)), timeout=2.0).close()
            return True
        except OSError:
            return False
    path = f"/tmp/.X11-unix/X{number}"
    if os.path.exists(path):
        return True
    # Linux X servers also listen on an abstract socket of the same name, which has no file
    # (containers often share only that); listening sockets are listed with the flag __SO_ACCEPTCON.
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as table:
            rows = [line.split() for line in table]
    except OSError:  # no /proc: the missing socket file is all there is to go on
        return False
    return any(len(row) == 8 and row[7] == "@" + path and int(row[3], 16) & 0x10000 for row in rows[1:])


#: libxcb's connection errors (xcb.h) and what they mean for a user setting DISPLAY.
_XCB_ERRORS = {
    1: "the X server refused the connection (not authorised? XAUTHORITY may be missing or "
       "wrong, as after sudo or su; or the server went away)",
    2: "the X server needs an extension that is missing",
    3: "out of memory while connecting",
    4: "the X server's answer was too long",
    5: "it is not a display name (examples: ':0', 'localhost:10.0')",
    6: "the X server has no such screen",
    7: "the file-descriptor passing failed",
}


def _x_connection_error(display: str) -> Optional[str]:
    """Connect to the X server the way Qt's xcb platform does (libxcb, authorisation included)
    and stay connected: None if it accepted a client, else why not. Qt aborts the whole process when
    this fails, so a window must not be attempted then. Unknown when libxcb cannot be loaded
    (then None: the toolkit decides)."""
    import ctypes
    import ctypes.util

    try:
        xcb = ctypes.CDLL(ctypes.util.find_library("xcb") or "libxcb.so.1")
    except OSError:
        return None
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    # A refused connection makes the client library print the server's reason on stderr; the
    # user gets streamseg's one line instead.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        connection = xcb.xcb_connect(display.encode(), ctypes.byref(ctypes.c_int()))
        code = xcb.xcb_connection_has_error(connection)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if code == 0:
        # Kept open while this process runs: an X server whose last client leaves resets itself
        # (a bare Xvfb, as xvfb-run starts it) and refuses the toolkit's connection meanwhile.
        _held_connections.append(connection)
        return None
    xcb.xcb_disconnect(connection)
    return _XCB_ERRORS.get(code, f"libxcb error {code}")


_held_connections: list = []


def _display_problem() -> Optional[str]:
    """Why a window cannot open here, or None. Only X11/Wayland systems can lack a display."""
    if os.name != "posix" or sys.platform == "darwin":
        return None
    display = os.environ.get("DISPLAY", "")
    wayland = os.environ.get("WAYLAND_DISPLAY", "")
    # The preview opens by default for cameras and streams, so the way out names --no-show.
    if not display and not wayland:
        return ("--show needs a display: DISPLAY is not set (no X11 or Wayland session); "
                "pass --no-show (with -o FILE to record), or run under xvfb-run")
    if not display and gui_backend().startswith("QT"):
        # The opencv-python wheels ship Qt with the X11 (xcb) platform plugin only.
        return (f"--show needs an X11 display: only WAYLAND_DISPLAY={wayland!r} is set and this OpenCV "
                "draws windows with Qt over X11; set DISPLAY (XWayland) or pass --no-show")
    if display and not _x_server_listens(display):
        return f"--show cannot reach the X display DISPLAY={display!r}; check it or pass --no-show"
    if display and gui_backend().startswith("QT"):
        refused = _x_connection_error(display)
        if refused is not None:
            return f"--show cannot open a window on DISPLAY={display!r}: {refused}; or pass --no-show"
    return None


def ensure_display() -> None:
    """Raise UsageError now if no window could open here: lets the CLI fail before loading a model."""
    problem = _display_problem()
    if problem is not None:
        raise UsageError(problem)


class Window:
    """An OpenCV display window for the live preview. Context manager, idempotent close().

    Raises:
        UsageError: there is no display to open it on, or OpenCV was built without a GUI
            (opencv-python-headless). Checked before any HighGUI call, because Qt aborts the whole
            process when it cannot reach a display.
    """

    def __init__(self, title: str = "streamseg") -> None:
        ensure_display()
        self.title = title
        self._name = title  # HighGUI's handle; the visible title changes, the handle does not
        self._shown_title = title
        self._closed = False
        self._gone = False  # closed by the user: another imshow() would quietly open a new window
        self._sized = False
        try:
            cv2.namedWindow(self._name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO | cv2.WINDOW_GUI_NORMAL)
        except cv2.error as error:
            raise UsageError(f"--show needs an OpenCV with a GUI (GUI: {gui_backend()}); "
                             f"install opencv-python instead of opencv-python-headless ({error.err})") from error

    def show(self, image: np.ndarray, *, fps: Optional[float] = None) -> Optional[str]:
        """Show a (H, W, 3) uint8 BGR image, put `fps` in the title, and poll the keyboard for 1 ms.

        Returns "quit" (q, Q, Esc, or the window closed by the user), "pause" (space),
        "snapshot" (s), or None.
        """
        self._check_open()
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 BGR, got {image.shape} {image.dtype}")
        if self._gone:
            return "quit"
        cv2.imshow(self._name, image)
        if not self._sized:
            # Qt opens a WINDOW_NORMAL window at 400x300 whatever the image: a 720p stream showed
            # at 400x225. It opens at the frame's size instead, scaled down to fit _START_SIZE.
            self._sized = True
            height, width = image.shape[:2]
            scale = min(1.0, _START_SIZE[0] / width, _START_SIZE[1] / height)
            cv2.resizeWindow(self._name, max(1, round(width * scale)), max(1, round(height * scale)))
        if fps is not None:
            title = f"{self.title} - {fps:.1f} fps"
            if title != self._shown_title:  # a title change costs a round trip to the GUI thread
                cv2.setWindowTitle(self._name, title)
                self._shown_title = title
        return self._poll(1)

    def wait_key(self, delay_ms: int) -> Optional[str]:
        """Wait up to `delay_ms` (>= 1) for a key, with show()'s mapping; for the paused state.

        0 ("wait forever") is refused: it would never notice the window being closed.
        """
        self._check_open()
        if delay_ms < 1:
            raise ValueError(f"delay_ms must be at least 1, got {delay_ms!r}")
        if self._gone:
            return "quit"
        return self._poll(int(delay_ms))

    def _poll(self, delay_ms: int) -> Optional[str]:
        # waitKeyEx, not waitKey: waitKey keeps only the low byte, so the Left arrow (0xFF51 in Qt
        # and GTK) would read as "Q" and quit.
        action = _KEYS.get(cv2.waitKeyEx(delay_ms))
        if action is None and not self._visible():
            self._gone = True
            return "quit"
        return action

    def _visible(self) -> bool:
        try:
            return cv2.getWindowProperty(self._name, cv2.WND_PROP_VISIBLE) >= 1
        except cv2.error:  # GTK raises for a window the user destroyed; Qt returns -1
            return False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"window {self.title!r} is closed")

    def close(self) -> None:
        """Destroy the window. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            cv2.destroyWindow(self._name)
            cv2.waitKey(1)  # the toolkit removes the window only while processing events
        except cv2.error as error:  # already destroyed by the user
            log.debug("destroying window %r: %s", self.title, error.err)

    def __enter__(self) -> "Window":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()
