"""Image files, mask and stats export: everything written is written whole or not at all.

Each file goes to a temporary name in its target directory and is renamed over the final name
only when complete, so an interruption or a full disk never leaves a half-written output.
Video files and the preview window live in `videowriter.py` and `window.py`.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import IO, Iterator, Optional

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
        fd, probe = tempfile.mkstemp(prefix=".streamseg-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
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
        raise SinkError(f"cannot write '{path}': {exc.strerror or exc}") from exc


class JsonLines:
    """A .jsonl file written line by line; every line is complete, and the file appears under its
    name when closed (a temporary name until then). Context manager; close() is idempotent."""

    def __init__(self, path: Path, *, overwrite: bool, inputs: tuple[Path, ...] = ()):
        self.path = path
        ensure_dir(path.parent if str(path.parent) else Path("."))
        check_target(path, overwrite=overwrite, inputs=inputs)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
        self._tmp = Path(tmp)
        self._file: Optional[IO[str]] = os.fdopen(fd, "w", encoding="utf-8")
        os.chmod(self._tmp, _file_mode())

    def write(self, record: dict) -> None:
        if self._file is None:
            raise SinkError(f"'{self.path}' is closed")
        try:
            # One write call per record: a line is either all there or not there.
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            raise SinkError(f"cannot write '{self.path}': {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            f.close()
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._tmp.unlink(missing_ok=True)
            raise SinkError(f"cannot write '{self.path}': {exc.strerror or exc}") from exc

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "JsonLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MaskDir:
    """`--save-masks DIR`: each segmented frame's (H, W) uint8 label map as DIR/<index:06d>.png."""

    def __init__(self, path: Path, *, overwrite: bool):
        self.path = ensure_dir(path)
        self.overwrite = overwrite
        self.written = 0

    def write(self, index: int, labels: np.ndarray) -> None:
        target = self.path / f"{index:06d}.png"
        if target.exists() and not self.overwrite:
            raise SinkError(f"mask '{target}' exists; pass --overwrite to replace it")
        write_png(target, labels)
        self.written += 1
