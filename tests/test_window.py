"""Window against a real X server (Xvfb): what it draws is read back from a screenshot, keys are typed.

The window lives in a child process: Qt binds a process to one X server for good and exits the process
when that server goes away, which must not happen to pytest. Needs the Debian packages xvfb, xdotool
and x11-apps (xwd); tests skip with the reason when one is missing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import secrets
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PINK = (147, 20, 255)  # B, G, R
TITLE = "streamseg-test"

# The child: shows grey with a pink square until a key or a close arrives, then waits on wait_key()
# while "paused"; reports every action on its own line, and exits after "quit".
CHILD = textwrap.dedent(f"""
    import sys, time
    import numpy as np
    from streamseg.window import Window
    image = np.full((240, 320, 3), 128, np.uint8)
    image[60:160, 80:180] = {PINK}
    with Window({TITLE!r}) as window:
        start = time.monotonic()
        while time.monotonic() - start < 0.5:  # let the window map and paint before saying so
            assert window.show(image, fps=12.3) is None
        print("ready", flush=True)
        paused = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            action = window.wait_key(20) if paused else window.show(image, fps=12.3)
            if action is not None:
                print(action, flush=True)
                paused = paused or action == "pause"
                if action == "quit":
                    break
        window.close()
        window.close()
""")


def read_xwd(data: bytes) -> np.ndarray:
    """An X window dump (xwd's ZPixmap, TrueColor) as an (H, W, 3) uint8 BGR array."""
    header = struct.unpack(">25I", data[:100])
    header_size, width, height, byte_order = header[0], header[4], header[5], header[7]
    bits_per_pixel, bytes_per_line, ncolors = header[11], header[12], header[19]
    masks = header[14:17]
    rows = np.frombuffer(data, np.uint8, count=height * bytes_per_line,
                         offset=header_size + ncolors * 12).reshape(height, bytes_per_line)
    nbytes = bits_per_pixel // 8
    raw = rows[:, :width * nbytes].reshape(height, width, nbytes).astype(np.uint32)
    if byte_order:  # MSBFirst
        raw = raw[..., ::-1]
    pixels = sum(raw[..., i] << (8 * i) for i in range(nbytes))
    red, green, blue = (((pixels & m) >> ((m & -m).bit_length() - 1)).astype(np.uint8) for m in masks)
    return np.dstack([blue, green, red])


@contextlib.contextmanager
def xvfb() -> Iterator[str]:
    """A fresh Xvfb server; yields its DISPLAY value."""
    missing = [tool for tool in ("Xvfb", "xdotool", "xwd") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages xvfb, xdotool, x11-apps)")
    read, write = os.pipe()
    # -displayfd: Xvfb picks a free display number itself and writes it here once it accepts clients.
    # -noreset: by default the server resets whenever its last client leaves (each xdotool call),
    # refusing connections meanwhile.
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "800x600x24", "-nolisten", "tcp",
                               "-noreset"],
                              pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            number = pipe.readline().strip()
        if not number:
            pytest.skip(f"Xvfb did not start (exit status {server.poll()})")
        yield f":{number.decode()}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with xvfb() as value:
        yield value


def x_env(display: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    env["DISPLAY"] = display
    return env


class Child:
    """The child process running CHILD, with its output lines readable under a timeout."""

    def __init__(self, display: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=x_env(display),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float = 15) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"child said nothing for {timeout} s; stderr: {self.proc.stderr.read()}")

    def finish(self) -> None:
        assert self.proc.wait(timeout=15) == 0, self.proc.stderr.read()


def window_id(display: str, name: str) -> int:
    found = subprocess.run(["xdotool", "search", "--name", name], env=x_env(display),
                           capture_output=True, text=True, timeout=10).stdout.split()
    assert found, f"no window named {name!r}"
    return int(found[-1])


def screenshot(display: str) -> np.ndarray:
    """The whole X screen as (H, W, 3) uint8 BGR."""
    return read_xwd(subprocess.run(["xwd", "-root", "-silent"], env=x_env(display), capture_output=True,
                                   check=True, timeout=10).stdout)


def screenshot_with(display: str, wid: int, colour: tuple[int, int, int], *, min_pixels: int) -> np.ndarray:
    """A screenshot once `colour` covers `min_pixels`, or the last one tried.

    Without a window manager, Qt under Xvfb sometimes (1 start in 5 on a busy 2-core machine) maps its
    window and never paints it: it missed the first Expose. A window manager maps windows itself, and
    unmapping and mapping the window again, as one would, brings the image. So: wait 2 s, then re-map.
    """
    shot = screenshot(display)
    for remap in (False, True):
        if remap:
            for command in ("windowunmap", "windowmap"):
                subprocess.run(["xdotool", command, "--sync", str(wid)], env=x_env(display), check=True, timeout=10)
        deadline = time.monotonic() + (3 if remap else 2)
        while time.monotonic() < deadline:
            shot = screenshot(display)
            if np.all(np.abs(shot.astype(int) - colour) <= 3, axis=2).sum() >= min_pixels:
                return shot
            time.sleep(0.2)
    return shot


def press(display: str, wid: int, key: str) -> None:
    # Real (XTEST) key events go to the focused window; without a window manager, focus it directly.
    env = x_env(display)
    subprocess.run(["xdotool", "windowfocus", "--sync", str(wid)], env=env, check=True, timeout=10)
    subprocess.run(["xdotool", "key", key], env=env, check=True, timeout=10)


def test_window_shows_the_image_and_maps_keys(display):
    child = Child(display)
    assert child.next_line() == "ready"

    wid = window_id(display, "12.3 fps")  # the live fps reached the title
    assert window_id(display, TITLE) == wid
    shot = screenshot_with(display, wid, PINK, min_pixels=int(100 * 100 * 0.9))
    pink = np.all(np.abs(shot.astype(int) - PINK) <= 3, axis=2)
    assert pink.sum() >= 100 * 100 * 0.9, "the pink square is not on screen"
    ys, xs = np.nonzero(pink)
    # A square stays square, at its own size: the window opens at the image's size (Qt's default
    # was 400x300, whatever the image).
    assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 2
    assert abs((xs.max() - xs.min() + 1) - 100) <= 2, f"the 100 px square is {xs.max() - xs.min() + 1} px wide"
    grey = np.all(shot == 128, axis=2)
    assert grey.sum() > pink.sum(), "the grey background is not on screen"

    press(display, wid, "Left")  # 0xFF51: its low byte is "Q", which must not quit
    press(display, wid, "space")
    assert child.next_line() == "pause"
    press(display, wid, "s")  # now answered by wait_key()
    assert child.next_line() == "snapshot"
    press(display, wid, "q")
    assert child.next_line() == "quit"
    child.finish()


def test_escape_quits(display):
    child = Child(display)
    assert child.next_line() == "ready"
    press(display, window_id(display, TITLE), "Escape")
    assert child.next_line() == "quit"
    child.finish()


def send_wm_delete(display: str, wid: int) -> None:
    """Ask the window to close the way a window manager's close button does (WM_DELETE_WINDOW)."""
    lib = ctypes.util.find_library("X11")
    if lib is None:
        pytest.skip("libX11 is not installed")
    x11 = ctypes.CDLL(lib)

    class ClientMessage(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                    ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                    ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]

    class XEvent(ctypes.Union):
        _fields_ = [("xclient", ClientMessage), ("pad", ctypes.c_long * 24)]

    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                               ctypes.POINTER(XEvent)]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    dpy = x11.XOpenDisplay(display.encode())
    assert dpy, f"cannot open {display}"
    try:
        event = XEvent()
        event.xclient.type = 33  # ClientMessage
        event.xclient.window = wid
        event.xclient.message_type = x11.XInternAtom(dpy, b"WM_PROTOCOLS", False)
        event.xclient.format = 32
        event.xclient.data[0] = x11.XInternAtom(dpy, b"WM_DELETE_WINDOW", False)
        x11.XSendEvent(dpy, wid, False, 0, ctypes.byref(event))
        x11.XFlush(dpy)
    finally:
        x11.XCloseDisplay(dpy)


def test_closing_the_window_quits(display):
    child = Child(display)
    assert child.next_line() == "ready"
    send_wm_delete(display, window_id(display, TITLE))
    assert child.next_line() == "quit"
    child.finish()


def window_in_child(env_changes: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    script = textwrap.dedent("""
        from streamseg.types import UsageError
        from streamseg.window import Window, ensure_display
        for check in (ensure_display, Window):  # the CLI's early check, then the window itself
            try:
                check()
            except UsageError as error:
                print("UsageError:", error)
            else:
                print("opened")
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only X11/Wayland systems lack a display")
def test_no_display_is_a_usage_error():
    done = window_in_child({"DISPLAY": None, "WAYLAND_DISPLAY": None})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert all(line.startswith("UsageError: --show needs a display: DISPLAY is not set") for line in lines)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only X11/Wayland systems lack a display")
def test_unreachable_display_is_a_usage_error_not_an_abort():
    number = next(n for n in range(700, 800) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    done = window_in_child({"DISPLAY": f":{number}", "WAYLAND_DISPLAY": None})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"UsageError: --show cannot reach the X display DISPLAY=':{number}'")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only X11/Wayland systems lack a display")
def test_x_server_that_refuses_the_client_is_a_usage_error_not_an_abort(tmp_path: Path):
    """An X server that wants a cookie the client lacks (XAUTHORITY lost to sudo, su, or ssh):
    Qt would print its reasons and abort the process. streamseg asks the server first and gives
    one UsageError; with the cookie, the same bare server (which resets whenever its last client
    leaves) opens the window after that check."""
    missing = [tool for tool in ("Xvfb", "xauth") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages xvfb, xauth)")
    import cv2

    if "QT" not in cv2.getBuildInformation().split("GUI:")[1].splitlines()[0]:
        pytest.skip("this OpenCV does not draw with Qt")
    number = next(n for n in range(800, 900) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    cookies = tmp_path / "Xauthority"
    subprocess.run(["xauth", "-f", str(cookies), "add", f":{number}", ".", secrets.token_hex(16)],
                   check=True, capture_output=True)
    server = subprocess.Popen(["Xvfb", f":{number}", "-auth", str(cookies), "-nolisten", "tcp", "-screen", "0", "320x240x24"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not Path(f"/tmp/.X11-unix/X{number}").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Xvfb did not start (exit status {server.poll()})")
            time.sleep(0.05)
        refused = window_in_child({"DISPLAY": f":{number}", "XAUTHORITY": str(tmp_path / "missing"), "WAYLAND_DISPLAY": None})
        assert refused.returncode == 0, refused.stderr  # not Qt's abort (134)
        assert refused.stderr == ""
        lines = refused.stdout.splitlines()
        assert len(lines) == 2, refused.stdout
        assert all(line.startswith(f"UsageError: --show cannot open a window on DISPLAY=':{number}': "
                                   "the X server refused the connection") for line in lines)
        allowed = window_in_child({"DISPLAY": f":{number}", "XAUTHORITY": str(cookies), "WAYLAND_DISPLAY": None})
        assert allowed.stdout.split() == ["opened", "opened"], allowed.stdout + allowed.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only X11/Wayland systems lack a display")
def test_wayland_only_with_qt_opencv_is_a_usage_error():
    import cv2

    if "QT" not in cv2.getBuildInformation().split("GUI:")[1].splitlines()[0]:
        pytest.skip("this OpenCV does not draw with Qt")
    done = window_in_child({"DISPLAY": None, "WAYLAND_DISPLAY": "wayland-0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("UsageError: --show needs an X11 display")


def test_q_quits_the_preview_while_the_stream_is_stalled(display, tmp_path: Path):
    """A stream that stops sending (its socket open, so no drop is noticed for 10 s, then
    reconnects for minutes): the window still answers q at once, and the recording so far plays."""
    from conftest import random_onnx
    from mjpeg import MjpegServer

    model = random_onnx(tmp_path / "tiny.onnx")
    server = MjpegServer(fps=25, stall_first=15)
    env = x_env(display)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen([sys.executable, "-m", "streamseg", server.url, "--model", str(model), "--show",
                              "-o", "rec.mp4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while server.sent[0] < 15 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        assert server.sent[0] == 15, child.stderr.read() if child.poll() is not None else "the stream did not start"
        time.sleep(1.0)  # stalled: nothing new has reached the window for a second
        press(display, window_id(display, "streamseg"), "q")
        pressed = time.monotonic()
        code = child.wait(timeout=20)
        took = time.monotonic() - pressed
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
        server.stop()
    assert code == 0, stderr
    assert took < 3, f"q took {took:.1f} s to quit"
    with av.open(str(tmp_path / "rec.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) >= 10
