"""Safe outputs: nothing half-written under the final name, nothing overwritten by accident.

`Output` is the one way a command writes what it makes (build-records, train, fit-confidence, export,
caption-dir with either engine, evaluate, gallery, score, demo; a new command should use it too). Claiming one checks, in
this order, before any work and before anything is deleted:

1. no input lies at or under it (`refuse_inputs`: --overwrite would delete the input);
2. it can be written (`check_writable`);
3. it is locked for the whole run (`OutputLock`: a second writer gets `OUT is in use by another
   tfcap process (pid N)`), so what follows is not raced by another tfcap process;
4. it does not exist, unless overwrite (or an append, which continues it), and the scratch names
   of killed earlier writers are removed.

It is then written either whole, through a scratch name private to this process beside it
(`Output.directory`, `Output.write_bytes`; `write_files_atomic` for files inside one), renamed into
place only when complete, or appended in whole rows (`append_whole`). Every write is checked: a short or failed write raises
OSError (a full disk is one `Error:` line in the CLI) and never leaves a cut row or half a file
under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the file descriptor `fd`: a short write is continued, and a write that
    makes no progress is OSError ENOSPC (os.write itself raises on a full disk or a failed device)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def append_whole(fd: int, data: bytes, path: Path) -> None:
    """Append `data` (whole rows) to the file open as `fd` (O_APPEND, one writer: its lock held): all
    of it, or, when the write fails part way (a full disk), none of it: the file is cut back to its
    length before, and OSError names `path`. So the file always ends with a whole row."""
    before = os.fstat(fd).st_size
    try:
        write_all(fd, data)
    except OSError as e:
        with contextlib.suppress(OSError):  # shrinking a file needs no space
            os.ftruncate(fd, before)
        raise OSError(e.errno, e.strerror, str(path)) from None


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `error` says the disk is full: an OSError, or a library's own exception
    whose message says it (TensorFlow's writers raise ResourceExhaustedError "...; No space left on device")."""
    if isinstance(error, OSError):
        return error.errno if error.errno in _DISK_FULL else None
    if isinstance(error, Exception):
        return next((code for code in _DISK_FULL if os.strerror(code) in str(error)), None)
    return None


def append_to(path: Path, data: bytes) -> None:
    """`append_whole` to the file `path` (created if missing), opened for this append only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append_whole(fd, data, path)
    finally:
        os.close(fd)


def _scratch_name(path: Path) -> Path:
    """A name beside `path` private to this process (pid and a random token): two processes never
    share one, and the suffix stays (Keras wants .weights.h5). `_leftovers` finds them."""
    return path.with_name(f".tfcap-{os.getpid()}-{secrets.token_hex(4)}.{path.name}")


def _leftovers(path: Path) -> list[Path]:
    """Scratch names of `path` (`_scratch_name`), and the shared `.NAME.partial` of tfcap before them."""
    pattern = re.compile(r"\.tfcap-\d+-[0-9a-f]{8}\." + re.escape(path.name) + "$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    return [p for p in siblings if pattern.match(p.name) or p.name in (f".{path.name}.partial", f".{path.name}.old")]


def write_files_atomic(files: dict[Path, bytes]) -> None:
    """Write each file (path -> its bytes) under a scratch name private to this process beside it,
    every byte checked and synced, then rename them all into place: readers see the old files or the
    whole new ones, and files that go together (a model's encoder and decoder weights) are renamed
    only once all are written. A failure removes the scratch files and raises OSError naming the file."""
    scratches = {Path(path): _scratch_name(Path(path)) for path in files}
    try:
        for path, data in files.items():
            fd = os.open(scratches[Path(path)], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(path)) from None
            finally:
                os.close(fd)
    except BaseException:
        for scratch in scratches.values():
            with contextlib.suppress(OSError):
                _remove(scratch)
        raise
    for path, scratch in scratches.items():
        os.replace(scratch, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a private scratch name (`write_files_atomic`)."""
    write_files_atomic({Path(path): data})


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a private scratch name, so readers never see half a file."""
    write_bytes_atomic(path, text.encode("utf-8"))


class _WeightsBuffer(io.BytesIO):
    """A .weights.h5 in memory: Keras writes one to an io.BytesIO, and checks the name's suffix."""

    def __str__(self) -> str:
        return "memory.weights.h5"


def weights_bytes(model) -> bytes:
    """The bytes of `model.save_weights` (a Keras .weights.h5), made in memory.

    Written to disk by the caller with checked writes (`write_bytes_atomic`), so that a full disk is
    one OSError: h5py writing a file itself leaves it open in HDF5 when a write fails, prints
    tracebacks whenever its objects are collected, and crashes the interpreter at exit (exit 139).
    """
    buffer = _WeightsBuffer()
    model.save_weights(buffer)
    return buffer.getvalue()


class Output(os.PathLike):
    """One output of a command (a file or a folder), claimed for the whole run; see the module docstring.

    Args:
      path: the output.
      overwrite: replace an existing output (only once the new one is complete).
      inputs: {what: path} that must not lie at or under `path` (None values are ignored).
      hint: how to say what to pass to replace it ("--overwrite (or --resume to complete it)").
      append: the output is continued in place (caption-dir --resume, train --resume): it may exist,
        and only its own folder must take new files.

    Raises TfcapError for each refusal. Release with `release()` or use it as a context manager.
    """

    def __init__(self, path: Path, *, overwrite: bool = False, inputs: dict | None = None,
                 hint: str = "--overwrite", append: bool = False):
        self.path, self.overwrite = Path(path), overwrite
        refuse_inputs(self.path, inputs or {})
        check_writable(self.path, replace=not append)  # first: it names a parent that is a file
        self._lock = OutputLock(self.path)
        try:
            if not append:
                refuse_existing(self.path, overwrite, hint)
            for leftover in _leftovers(self.path):  # of a killed writer: none is running, we hold the lock
                _remove(leftover)
        except BaseException:
            self._lock.release()
            raise

    @contextlib.contextmanager
    def directory(self) -> Iterator[Path]:
        """Yield a scratch folder, private to this process, that becomes the output if the block finishes.

        An exception or Ctrl-C removes it; a SIGKILL leaves it behind, and the next writer of the
        same output removes it. An existing output is replaced (with overwrite) only after the new
        one is complete: the old one is moved to a private name, the new one renamed in, the old removed.
        """
        scratch = _scratch_name(self.path)
        scratch.mkdir(parents=True)
        try:
            yield scratch
            self._commit(scratch)
        except BaseException as e:
            _remove(scratch)
            full = _disk_full(e)
            if full is not None:  # named as the output, not as a scratch file that is gone
                raise OSError(full, os.strerror(full), str(self.path)) from None
            raise

    def write_bytes(self, data: bytes) -> None:
        """The output, a file, written whole with `data` (`write_bytes_atomic`)."""
        self._refuse_replacing()
        write_bytes_atomic(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def _refuse_replacing(self) -> None:
        # Checked again at the end: something other than tfcap may have made it meanwhile.
        if os.path.lexists(self.path) and not self.overwrite:
            raise TfcapError(f"{self.path} appeared while it was written; pass --overwrite to replace it")

    def _commit(self, scratch: Path) -> None:
        self._refuse_replacing()
        if os.path.lexists(self.path):
            old = _scratch_name(self.path)
            os.replace(self.path, old)
            os.replace(scratch, self.path)
            _remove(old)
        else:
            os.replace(scratch, self.path)

    def release(self) -> None:
        self._lock.release()

    def __fspath__(self) -> str:  # Path(output), open(output): the output's path
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def claimed(out: "Path | Output", **claim) -> Iterator[Output]:
    """`out` itself when the caller already claimed it (the CLI does, before the long work), else
    `Output(out, **claim)` for the block: how a library function that writes an output takes it."""
    if isinstance(out, Output):
        yield out
        return
    with Output(out, **claim) as output:
        yield output


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A scratch directory that becomes `out` only if the block finishes: `Output(out).directory()`
    with the output claimed for the block."""
    with Output(out, overwrite=overwrite) as output, output.directory() as scratch:
        yield scratch


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
        with contextlib.suppress(OSError):  # the pid only informs a second writer: a full disk may refuse it
            os.ftruncate(self._fd, 0)
            write_all(self._fd, f"{os.getpid()}\n".encode())

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
