"""Image files, mask and stats export: everything written is written whole or not at all.

Each file goes to a temporary name in its target directory and is renamed over the final name
only when complete, so an interruption or a full disk never leaves a half-written output.
Video files and the preview window live in `videowriter.py` and `window.py`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from .types import SinkError

log = logging.getLogger(__name__)


def check_dir(path: Path) -> None:
    """Fail early, creating nothing, when `path` could not become a writable output directory:
    it is a file, or it (or, if missing, its nearest existing parent) cannot be written."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SinkError(f"output directory '{path}' is a file" if probe == path else f"cannot create output directory '{path}': '{probe}' is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SinkError(f"cannot write to output directory '{path}': permission denied")
    if probe == path:
        ensure_dir(path)  # exists already: the probe file catches read-only mounts and root


def ensure_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; a file there, or no write permission, is a SinkError."""
    if path.exists() and not path.is_dir():
        raise SinkError(f"output directory '{path}' is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot create output directory '{path}': {exc.strerror or exc}") from exc
    # os.access lies for root and on read-only mounts; creating a file is the real test.
    try:
        # An unnamed temporary file (O_TMPFILE on Linux): a signal mid-probe leaves nothing behind.
        with tempfile.TemporaryFile(prefix=".streamseg-probe-", dir=path):
            pass
    except OSError as exc:
        raise SinkError(f"cannot write to output directory '{path}': {exc.strerror or exc}") from exc
    return path


def check_target(path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to replace an input, a directory, or an existing file without --overwrite."""
    resolved = path.resolve()
    for src in inputs:
        if src.exists() and resolved == src.resolve():
            raise SinkError(f"output '{path}' is the input file; choose another output")
    if path.is_dir():
        raise SinkError(f"output '{path}' is a directory")
    if path.exists() and not overwrite:
        raise SinkError(f"output '{path}' exists; pass --overwrite to replace it")


@lru_cache(maxsize=1)
def _file_mode() -> int:
    """The mode a plain open() gives a new file (0o666 less the umask). mkstemp's temporary files
    are 0o600, which would leave outputs unreadable to everyone but their owner once renamed."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds, remove
    it when the block fails (KeyboardInterrupt included)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.part", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _why(exc: OSError) -> str:
    """An OS error in a few words, with a hint where the disk is full or a file-size limit was hit."""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        text += " (is the disk full?)"
    return text


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a (H, W, 3) uint8 BGR or (H, W) uint8 image as PNG, whole or not at all."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise SinkError(f"cannot encode '{path}' as PNG")
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(buf.tobytes())
    except OSError as exc:
        raise SinkError(f"cannot write '{path}': {_why(exc)}") from exc


class JsonLines:
    """A .jsonl file written line by line; every line is complete, and the file appears under its
    name when closed (a temporary name until then). Context manager; close() is idempotent.

    Only a file that holds at least one line is published: a run that fails or is interrupted
    before its first line leaves an earlier file of that name as it was (even with --overwrite)
    and no empty file. A write that fails (a full disk) is cut back to the last complete line and
    raises SinkError; close() still publishes the lines written before it.
    """

    def __init__(self, path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()):
        self.path = path
        ensure_dir(path.parent if str(path.parent) else Path("."))
        check_target(path, overwrite=overwrite, inputs=inputs)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
        self._tmp = Path(tmp)
        self._fd: Optional[int] = fd
        self._size = 0  # bytes of complete lines in the file
        self._failed: Optional[str] = None
        try:
            os.chmod(self._tmp, _file_mode())
        except BaseException:
            self.abort()
            raise

    def write(self, record: dict) -> None:
        if self._fd is None:
            raise SinkError(f"'{self.path}' is closed")
        if self._failed is not None:
            raise SinkError(f"cannot write '{self.path}': an earlier write failed ({self._failed})")
        # Unbuffered writes of whole lines: nothing waits in a buffer to be half-written later.
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._failed = _why(exc)
            # Cut off the part of the line that reached the disk: the file keeps complete lines only.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise SinkError(f"cannot write '{self.path}': {self._failed}") from exc
        self._size += len(data)

    def close(self) -> None:
        """Publish the file if it holds a line; otherwise discard it, as abort() does."""
        if self._fd is None:
            return
        if self._size == 0:
            self.abort()
            return
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise SinkError(f"cannot write '{self.path}': {_why(exc)}") from exc

    def abort(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "JsonLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The stem of a name MaskDir writes, f"{index:06d}": six digits, or from frame 1,000,000 on more
#: digits without a leading zero. ASCII digits only: str.isdigit would take '٣' too.
_MASK_STEM = re.compile(r"[0-9]{6}|[1-9][0-9]{6,}")


def _masks_in(path: Path) -> list[Path]:
    """The files in `path` named as streamseg names masks (`<index:06d>.png`), in frame order.
    Other files a user keeps there (12345.png, 0000001.png, 000001.png.bak) are never counted,
    replaced or removed."""
    found = (p for p in path.glob("[0-9][0-9][0-9][0-9][0-9][0-9]*.png") if _MASK_STEM.fullmatch(p.stem) and p.is_file())
    return sorted(found, key=lambda p: (len(p.stem), p.stem))


def check_mask_dir(path: Path, *, overwrite: bool) -> None:
    """Fail early, creating nothing, when `path` cannot take masks, or holds masks of an earlier
    run and `overwrite` is off (every run writes 000000.png first, so they would collide)."""
    check_dir(path)
    if not overwrite and path.is_dir():
        old = next(iter(_masks_in(path)), None)
        if old is not None:
            raise SinkError(f"masks directory '{path}' already holds masks ('{old.name}' ...); "
                            "pass --overwrite to replace them, or choose another directory")


class MaskDir:
    """`--save-masks DIR`: each segmented frame's (H, W) uint8 label map as DIR/<index:06d>.png.

    Context manager; close() is idempotent. With `overwrite`, an earlier run's masks are replaced
    as a whole when the run ends: close() removes those this run did not write over, so that DIR
    then holds exactly this run's masks (a stride-3 run after a stride-1 one leaves no 000001.png
    that would pass for a segmented frame). Nothing is removed up front, and a run that ends
    before its first mask leaves the earlier masks as they were.
    """

    def __init__(self, path: Path, *, overwrite: bool):
        check_mask_dir(path, overwrite=overwrite)
        self.path = ensure_dir(path)
        self.overwrite = overwrite
        self.written = 0
        self._earlier: set[str] = {p.name for p in _masks_in(path)} if overwrite else set()
        self._names: set[str] = set()
        self._closed = False

    def write(self, index: int, labels: np.ndarray) -> None:
        target = self.path / f"{index:06d}.png"
        if target.exists() and not self.overwrite:
            raise SinkError(f"mask '{target}' exists; pass --overwrite to replace it")
        write_png(target, labels)
        self._names.add(target.name)
        self.written += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.written:
            return
        stale = sorted(self._earlier - self._names)
        for name in stale:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove '%s', a mask of an earlier run: %s", self.path / name, exc.strerror or exc)
        if stale:
            log.debug("removed %d masks of an earlier run from '%s'", len(stale), self.path)

    def __enter__(self) -> "MaskDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
