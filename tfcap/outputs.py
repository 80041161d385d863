"""Safe outputs: nothing half-written under the final name, nothing overwritten by accident."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tfcap.errors import TfcapError


def refuse_existing(path: Path, overwrite: bool, hint: str = "--overwrite") -> None:
    """Raise TfcapError if `path` exists and the user did not ask to replace it."""
    if path.exists() and not overwrite:
        raise TfcapError(f"{path} already exists; pass {hint} to replace it")


def check_writable(path: Path, replace: bool = True) -> None:
    """Raise TfcapError `cannot write PATH: reason` unless `path` (a file or folder) can be written.

    Called before any long work, so a bad output fails in a second, not after the model loads. It
    tries for real: a probe file is created and removed where the output will go (the nearest
    existing folder, or inside an existing output folder), because permission bits say nothing
    for root, a read-only mount or an immutable (`chattr +i`) folder. An existing file must open
    for appending; with `replace`, the folder holding an existing output must take the temporary
    name and rename it.
    """
    path = Path(path)

    def fail(reason: str) -> None:
        raise TfcapError(f"cannot write {path}: {reason}")

    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        fail(f"{existing} is not a directory")
    if existing != path:
        folders = [existing]
    elif path.is_dir():
        folders = [path, path.parent] if replace else [path]
    else:
        try:
            open(path, "ab").close()  # existing file: neither created nor changed
        except OSError as e:
            fail(e.strerror or str(e))
        folders = [path.parent] if replace else []
    for folder in folders:
        try:
            handle, probe = tempfile.mkstemp(prefix=".tfcap-probe-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as e:
            fail(f"cannot create files in {folder} ({e.strerror or e})")


def refuse_inputs(out: Path, inputs: dict[str, Path | None]) -> None:
    """Raise TfcapError if writing `out` would replace one of `inputs` ({what: path}): `out` is an
    input, or a folder holding one (replacing it with --overwrite would delete the input)."""
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is not None and (Path(path).resolve() == target or target in Path(path).resolve().parents):
            raise TfcapError(f"{out} would replace the {what} {path}: choose another output")


def check_output(out: Path, overwrite: bool, inputs: dict[str, Path | None] | None = None, *,
                 hint: str = "--overwrite", replace: bool = True) -> None:
    """Everything known about an output before the work starts: it replaces no input, it does not
    exist unless `overwrite`, and it can be written (`check_writable`)."""
    refuse_inputs(out, inputs or {})
    refuse_existing(Path(out), overwrite, hint)
    check_writable(out, replace)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` only if the block finishes.

    The scratch directory is a hidden sibling of `out` (same file system, so the final
    rename is atomic). An exception or Ctrl-C removes it; a SIGKILL leaves it behind, and
    the next run for the same `out` clears it first. An existing `out` is replaced only
    with `overwrite`, and only after the new one is complete.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    partial = out.with_name(f".{out.name}.partial")
    _remove(partial)  # leftovers of an interrupted earlier run
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        _remove(old)
        os.replace(out, old)
        os.replace(partial, out)
        _remove(old)
    else:
        os.replace(partial, out)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes never share one
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputLock:
    """An exclusive lock on one output (a run directory, a CSV), held from creation to `release`.

    It is an flock on the hidden sibling `.{name}.lock`, which holds the owner's pid. The OS
    releases it when the process ends, however it ends (SIGKILL too), so a lock is never stale;
    the owner removes the file when it releases the lock (after a SIGKILL the small file stays). flock belongs to the open file description: a second OutputLock on the
    same output fails in the same process as in another one. Also a context manager.

    Raises TfcapError `... is in use by another tfcap process (pid N)` when the output is locked,
    unless `on_busy` is given: then it is called with the owner's pid and the lock is waited for.
    """

    def __init__(self, target: Path, on_busy=None):
        self._fd, self._owner = None, False
        resolved = Path(target).resolve()  # ./out.csv, /abs/out.csv and a symlink to it: one lock
        self.path = resolved.parent / f".{resolved.name}.lock"
        while True:
            try:
                resolved.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise TfcapError(f"cannot write {target}: {e.strerror}") from None
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(self._fd, 32).decode("ascii", "replace").strip() or "unknown"
                if on_busy is None:
                    self.release()
                    raise TfcapError(f"{target} is in use by another tfcap process (pid {owner})") from None
                on_busy(owner)
                on_busy = lambda owner: None  # noqa: E731 (said once)
                fcntl.flock(self._fd, fcntl.LOCK_EX)  # Ctrl-C interrupts the wait (PEP 475)
            # The owner before us unlinks the file when it is done: if it did so between our open and
            # our flock, we hold a lock on a file nobody else will see; take the new one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            self.release()
        self._owner = True
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Drop the lock; the owner also removes the lock file (still holding the lock, so a process that
        opened it meanwhile sees it gone and retries), leaving nothing behind."""
        if self._fd is not None:
            if self._owner:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
                self._owner = False
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # an owner that dropped it without releasing

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
