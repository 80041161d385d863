"""Fault injection (issue 23): every command that writes, on a full disk, with a second writer, and interrupted.

For each of build-records, train, export, caption-dir (local and Beam engines), evaluate and gallery:

(a) a full disk, two ways: `SmallDisk` (os.write, which every byte tfcap writes itself goes through,
    `outputs.write_all`, behaves for files under a folder as on a disk of N bytes: what fits is written,
    then ENOSPC; TensorFlow's own writers get an injected error at their seam instead), and a real small
    tmpfs where this machine lets the test mount one (as root), skipped with the reason elsewhere;
(b) a second writer on the same output, refused in one line while the first holds it;
(c) Ctrl-C at a random batch: exit 130 with one line and nothing half-written; the commands that resume
    (caption-dir, train) then --resume to exactly the uninterrupted output.

Each case asserts the exit code, one `Error:` line and no traceback, in click's output and on file
descriptor 2 (what a library logs or a worker process prints goes there). Commands run in process
(click's CliRunner) on the session's tiny world of tests/test_edges.py, except where the process itself
is the subject (SIGTERM while a cluster forms).

Left out for time: a real full tmpfs under `train` in a process of its own (h5py's crash at exit, 139,
is gone because weights are made in memory: `test_train_on_a_full_disk_is_one_line`), a multi-process
Beam pipeline interrupted (its context managers are tested in process), and train interrupted at a
random step (tests/test_train.py resumes interrupted runs to the same state).
"""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import built_once, invoke, ok
from test_edges import one_error
from tfcap import caption, cli, distribute, export, records, train
from tfcap.errors import TfcapError
from tfcap.outputs import OutputLock

TINY_TRAIN = ["--encoder", "convnet", "--encoder-weights", "none", "--image-size", "32", "--units", "16",
              "--embed-dim", "8", "--eval-every", "0", "--batch-size", "4", "--quiet"]
# Subprocesses: this checkout's tfcap, and the CLI's quiet TensorFlow start-up (conftest sets TF_CPP_MIN_LOG_LEVEL).
ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
       "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                   os.environ.get("PYTHONPATH")]))}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_line(result, capfd, *names, code=2) -> str:
    """`one_error`, and nothing printed behind click's back on file descriptor 2 (a library's log, a
    worker's traceback, an `Exception ignored` of a collected object)."""
    line = one_error(result, *names, code=code)
    behind = capfd.readouterr().err
    assert "Traceback" not in behind and "Exception ignored" not in behind, behind[-3000:]
    return line


# ---------------------------------------------------------------------------------------------
# Shared: a SavedModel of the world's run, a bigger folder, the disks

@pytest.fixture(scope="session")
def savedmodel(world, tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "faults-savedmodel", lambda root: ok("export", world.run, "-o", root / "sm")) / "sm"


@pytest.fixture(scope="module")
def many(world, tmp_path_factory) -> Path:
    """120 images (the world's six, again and again): a caption-dir CSV of more than one 4 KiB page."""
    folder = tmp_path_factory.mktemp("many") / "photos"
    folder.mkdir()
    for k in range(120):
        shutil.copy(world.images / f"{k % 6}.png", folder / f"{k:03d}.png")
    return folder


class SmallDisk:
    """os.write of the files under `root` as on a disk of `size` bytes (the files' sizes count, so a
    truncation frees room): a write that does not fit writes what fits, the next one fails with ENOSPC."""

    real = staticmethod(os.write)

    def __init__(self, root: Path, size: int, monkeypatch):
        self.root, self.size = Path(root), size
        self.root.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(os, "write", self.write)

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def write(self, fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(str(self.root) + os.sep):
            return self.real(fd, data)
        room = self.size - self.used()
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, bytes(memoryview(data)[:room]))


@pytest.fixture
def tmpfs(tmp_path):
    """mount(free_bytes) -> a folder on a fresh tmpfs with about that much room left (whole 4 KiB pages)."""
    mounted = []

    def mount(free: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={free + (1 << 20)}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the injected "
                        "full disk (SmallDisk) covers this case")
        mounted.append(where)
        filler = where / ".filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(where).free - free))
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def assert_whole_rows(path: Path, reference: Path) -> list[dict]:
    """The rows of a caption-dir CSV are a prefix of the reference's, each whole, the file ending with its newline."""
    data = path.read_bytes()
    assert data.endswith(b"\n") and caption.complete_length(data, "csv") == len(data)
    rows = list(csv.DictReader(open(path, newline="")))
    assert rows == list(csv.DictReader(open(reference, newline="")))[:len(rows)]
    return rows


# ---------------------------------------------------------------------------------------------
# (a) A full disk

def test_caption_dir_on_a_full_disk_stops_in_one_line_with_whole_rows_and_resumes(world, tmp_path, monkeypatch,
                                                                                  capfd):
    """A disk that fills in the middle of the last batch: exit 2 (not 0 with a cut row, as when
    os.write's short count was ignored), whole rows only, and --resume completes it once there is room."""
    # Room for its lock's pid, the settings recorded beside it (the world's, of the same model), the
    # header, the first batch of two rows and half the third row.
    lines = world.csv.read_bytes().splitlines(keepends=True)
    room = (len(f"{os.getpid()}\n") + caption.settings_path(world.csv).stat().st_size + len(b"".join(lines[:3]))
            + len(lines[3]) // 2)
    disk = SmallDisk(tmp_path / "disk", room, monkeypatch)
    out = disk.root / "out.csv"
    one_line(invoke("caption-dir", world.photos, "-o", out, "--model", world.run, "--quiet", "--batch-size", "2"),
             capfd, f"cannot write {out}: No space left on device after 2 of 7 images", "--resume")
    assert len(assert_whole_rows(out, world.csv)) == 2
    disk.size = 10**6  # room made
    ok("caption-dir", world.photos, "-o", out, "--model", world.run, "--quiet", "--resume")
    assert out.read_bytes() == world.csv.read_bytes()


def test_caption_dir_on_a_real_full_tmpfs(world, many, tmpfs, tmp_path, capfd):
    """Three free 4 KiB pages, one each for the lock file, the recorded settings and the CSV: the CSV
    stops at a page boundary inside a row, as the issue saw (4,096 bytes); no cut row stays."""
    reference = tmp_path / "reference.csv"
    ok("caption-dir", many, "-o", reference, "--model", world.run, "--quiet")
    assert reference.stat().st_size > 4096
    out = tmpfs(3 * 4096) / "out.csv"
    one_line(invoke("caption-dir", many, "-o", out, "--model", world.run, "--quiet", "--batch-size", "8"), capfd,
             "No space left on device")
    assert 10 < len(assert_whole_rows(out, reference)) < 120
    os.remove(out.parent / ".filler")
    ok("caption-dir", many, "-o", out, "--model", world.run, "--quiet", "--resume")
    assert out.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("fills_at", ["encoder.weights.h5", "best.weights.h5"])
def test_train_on_a_full_disk_is_one_line(world, tmp_path, monkeypatch, capfd, fills_at):
    """The weights are made in memory and written with checked writes: the disk fills under tfcap's own write."""
    encoder_bytes = (world.run / "encoder.weights.h5").stat().st_size
    SmallDisk(tmp_path / "disk", 200 if fills_at == "encoder.weights.h5" else encoder_bytes + 4000, monkeypatch)
    run = tmp_path / "disk" / "run"
    one_line(invoke("train", world.records, "-o", run, "--cache-dir", tmp_path / "cache", "--epochs", "1",
                    *TINY_TRAIN), capfd, f"Error: {run / fills_at}: No space left on device")
    assert not [p for p in listing(run) if ".tfcap-" in p]  # no scratch file left


@pytest.mark.parametrize("command", ["build-records", "export", "evaluate", "gallery", "score"])
def test_whole_outputs_on_a_full_disk_are_one_line_and_leave_nothing(world, tmp_path, monkeypatch, capfd, command):
    """Outputs written whole (a folder or a file) are written under a scratch name: a full disk leaves
    neither OUT nor the scratch, and the error names OUT (the real tmpfs: caption-dir's test above)."""
    disk = tmp_path / "disk"
    SmallDisk(disk, 0, monkeypatch)
    if command in ("build-records", "export"):  # TensorFlow writes these: its error, at its seam
        def full(*args, **kwargs):
            raise tf.errors.ResourceExhaustedError(None, None, "scratch/x; No space left on device")
        monkeypatch.setattr(records, "_write_record", full)
        monkeypatch.setattr(tf.saved_model, "save", full)
    out = disk / "out"
    args = {"build-records": ["build-records", "--captions", world.captions, "--images", world.images, "-o", out,
                              "--min-count", "1", "--quiet"],
            "export": ["export", world.run, "-o", out],
            "evaluate": ["evaluate", "--predictions", world.csv, "--references", world.records, "--no-meteor",
                         "-o", out],
            "gallery": ["gallery", world.csv, "--images", world.photos, "-o", out, "--quiet"],
            "score": ["score", world.csv, "--images", world.photos, "--model", world.run, "-o", out, "--quiet"]}[command]
    one_line(invoke(*args), capfd, f"{out}: No space left on device")
    assert listing(disk) == []


def test_beam_on_a_full_disk_is_one_line(world, savedmodel, tmp_path, monkeypatch, capfd, request):
    """Beam's file sink fails at the end; its 16-line traceback on stderr is gone. Injected at the sink's
    local file system where no tmpfs can be mounted."""
    pytest.importorskip("apache_beam")
    try:
        out = request.getfixturevalue("tmpfs")(0) / "out"
    except pytest.skip.Exception:
        from apache_beam.io.localfilesystem import LocalFileSystem

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(LocalFileSystem, "create", full)
        out = tmp_path / "out"
    one_line(invoke("caption-dir", world.photos, "-o", out, "--model", savedmodel, "--engine", "beam"), capfd,
             "No space left on device")
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name != ".filler"]


# ---------------------------------------------------------------------------------------------
# (b) A second writer

SECOND_WRITERS = {  # command -> (arguments with OUT, what OUT holds when it exists)
    "build-records": lambda w, sm, out: ["build-records", "--captions", w.captions, "--images", w.images, "-o", out,
                                         "--min-count", "1", "--overwrite"],
    "train": lambda w, sm, out: ["train", w.records, "-o", out, "--overwrite", *TINY_TRAIN],
    "train --resume": lambda w, sm, out: ["train", w.records, "-o", out, "--resume"],
    "export": lambda w, sm, out: ["export", w.run, "-o", out, "--overwrite"],
    "caption-dir": lambda w, sm, out: ["caption-dir", w.photos, "-o", out, "--model", w.run, "--overwrite"],
    "caption-dir --resume": lambda w, sm, out: ["caption-dir", w.photos, "-o", out, "--model", w.run, "--resume"],
    "caption-dir beam": lambda w, sm, out: ["caption-dir", w.photos, "-o", out, "--model", sm, "--engine", "beam",
                                            "--overwrite"],
    "evaluate": lambda w, sm, out: ["evaluate", "--predictions", w.csv, "--references", w.records, "--no-meteor",
                                    "-o", out, "--overwrite"],
    "gallery": lambda w, sm, out: ["gallery", w.csv, "--images", w.photos, "-o", out, "--overwrite"],
    "score": lambda w, sm, out: ["score", w.csv, "--images", w.photos, "--model", w.run, "-o", out, "--overwrite"],
}


@pytest.mark.parametrize("command", list(SECOND_WRITERS))
def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(world, savedmodel, tmp_path, capfd, command):
    """The first writer holds OUT's lock for its whole run (here: this process holds it); a second one,
    even with --overwrite, stops before any work with the owner's pid, and OUT stays as it was."""
    if command == "caption-dir beam":
        pytest.importorskip("apache_beam")
    out = tmp_path / "out"
    out.mkdir()
    (out / "first").write_text("the first writer's")
    with OutputLock(out):
        one_line(invoke(*SECOND_WRITERS[command](world, savedmodel, out)), capfd,
                 f"{out} is in use by another tfcap process (pid {os.getpid()})")
    assert listing(tmp_path) == ["out", "out/first"]


def test_fit_confidence_into_a_run_in_use_is_refused(world, tmp_path, capfd):
    """fit-confidence writes into RUN_DIR: not while a train (or another fit) holds it."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    with OutputLock(run):
        one_line(invoke("fit-confidence", run, world.records, "--quiet"), capfd,
                 f"{run} is in use by another tfcap process (pid {os.getpid()})")
    assert not (run / "confidence.json").exists()


def test_a_second_build_records_while_the_first_writes_leaves_the_first_whole(world, tmp_path, monkeypatch):
    """Started while the first writes its shards (here: from inside its writer), the second is refused
    instead of deleting the first's scratch folder; the first's shards match its manifest."""
    out, seconds = tmp_path / "rec", []
    real = records._write_record

    def write_and_start_a_second(writer, record):
        if not seconds:
            seconds.append(invoke("build-records", "--captions", world.captions, "--images", world.images, "-o", out,
                                  "--min-count", "1", "--overwrite"))
        real(writer, record)

    monkeypatch.setattr(records, "_write_record", write_and_start_a_second)
    ok("build-records", "--captions", world.captions, "--images", world.images, "-o", out, "--min-count", "1", "--quiet")
    one_error(seconds[0], f"{out} is in use by another tfcap process (pid {os.getpid()})")
    for split in ("train", "val", "test"):
        records.verify_shards(out, split)
    assert listing(tmp_path) == sorted(["rec", *(f"rec/{p}" for p in listing(out))])


# ---------------------------------------------------------------------------------------------
# (c) Ctrl-C at a random batch, and --resume where the command resumes

@pytest.fixture(scope="module")
def predictor(world):
    return export.load_predictor(world.run)


@pytest.mark.parametrize("seed", [1, 2])
def test_caption_dir_interrupted_at_a_random_batch_resumes_to_the_same_file(world, many, predictor, tmp_path, seed):
    config = caption.CaptionConfig(batch_size=8)
    reference = tmp_path / "reference.csv"
    caption.caption_directory(predictor, many, reference, config, show_progress=False)
    stop_at, calls, decode = random.Random(seed).randrange(1, 15), [], predictor.decode

    def decode_until_interrupted(features):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return decode(features)

    out = tmp_path / "out.csv"
    predictor.decode = decode_until_interrupted
    try:
        with pytest.raises(KeyboardInterrupt, match=f"{(stop_at - 1) * 8} of 120 images written"):
            caption.caption_directory(predictor, many, out, config, show_progress=False)
    finally:
        del predictor.decode
    assert len(assert_whole_rows(out, reference)) == (stop_at - 1) * 8
    caption.caption_directory(predictor, many, out, config, resume=True, show_progress=False)
    assert out.read_bytes() == reference.read_bytes()


def interrupt_at(monkeypatch, target: str, after: int = 0):
    """Ctrl-C (a real SIGINT to this process) in the `after`+1-th call of `target` ("module.attr")."""
    path, name = target.rsplit(".", 1)
    module, attributes = path, []
    while True:
        try:
            owner = importlib.import_module(module)
            break
        except ImportError:
            module, attribute = module.rsplit(".", 1)
            attributes.insert(0, attribute)
    for attribute in attributes:  # a class in the module
        owner = getattr(owner, attribute)
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal's handler raises here
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return lambda: monkeypatch.setattr(owner, name, real)


@pytest.fixture
def python_ctrl_c():
    """SIGINT raises KeyboardInterrupt, as in a fresh `tfcap` process: a test that ran an in-process
    multi-worker strategy earlier in this pytest worker may have left TensorFlow's C++ handler on it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


INTERRUPTED = {  # command -> (arguments with OUT, where Ctrl-C lands)
    "build-records": (lambda w, sm, out: ["build-records", "--captions", w.captions, "--images", w.images, "-o", out,
                                          "--min-count", "1", "--quiet"], "tfcap.records._write_record"),
    "export": (lambda w, sm, out: ["export", w.run, "-o", out], "tensorflow.saved_model.save"),
    "evaluate": (lambda w, sm, out: ["evaluate", "--predictions", w.csv, "--references", w.records, "--no-meteor",
                                     "-o", out], "tfcap.evaluate.write_text_atomic"),
    "gallery": (lambda w, sm, out: ["gallery", w.csv, "--images", w.photos, "-o", out, "--quiet"],
                "tfcap.gallery.render_html"),
    "caption-dir beam": (lambda w, sm, out: ["caption-dir", w.photos, "-o", out, "--model", sm, "--engine", "beam"],
                         "tfcap.engines.beam.ImageCaptionHandler.run_inference"),
}


@pytest.mark.parametrize("command", list(INTERRUPTED))
def test_ctrl_c_of_a_whole_output_is_one_line_leaves_nothing_and_a_rerun_works(world, savedmodel, tmp_path,
                                                                              monkeypatch, capfd, command,
                                                                              python_ctrl_c):
    """Beam on DirectRunner: exit 130 and one line, not Beam's 40-line traceback and exit 2."""
    args, where = INTERRUPTED[command]
    if command == "caption-dir beam":
        pytest.importorskip("apache_beam")
        import tfcap.engines.beam  # noqa: F401  (patched below)
    out = tmp_path / "out"
    restore = interrupt_at(monkeypatch, where, after=random.Random(command).randrange(0, 2) if
                           command == "build-records" else 0)
    result = invoke(*args(world, savedmodel, out))
    assert result.exit_code == 130, (result.output, result.exception)
    assert [line for line in result.stderr.splitlines() if line.strip()] == [result.stderr.strip()]
    assert result.stderr.strip().startswith("interrupted") and "Traceback" not in capfd.readouterr().err
    assert listing(tmp_path) == []  # no OUT, no scratch, no lock file
    restore()
    ok(*args(world, savedmodel, out))


# ---------------------------------------------------------------------------------------------
# Beam's worker processes: quiet, and Ctrl-C ends them (on the engine's own context managers: a
# multi-process pipeline takes half a minute here)

def test_beam_workers_are_quiet_and_ended_with_the_pipeline(capfd):
    """What the pipeline's block starts is ended when it fails or is interrupted (DirectRunner waited
    for its worker processes, which printed their tracebacks); what they print goes nowhere."""
    pytest.importorskip("apache_beam")
    from tfcap.engines import beam as engine

    interrupted = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        with engine._quiet(False), engine._ended_with_the_pipeline(interrupted):
            worker = subprocess.Popen([sys.executable, "-c", "import sys, time; print('chatter', file=sys.stderr, "
                                       "flush=True); time.sleep(60)"])
            time.sleep(1)
            raise KeyboardInterrupt
    assert worker.wait(timeout=5) == -signal.SIGKILL
    assert "chatter" not in capfd.readouterr().err
    with engine._quiet(True):
        os.write(2, b"shown with --verbose\n")
    assert capfd.readouterr().err == "shown with --verbose\n"


# ---------------------------------------------------------------------------------------------
# Waits: a multi-worker cluster whose peer never comes

def cluster_env(monkeypatch) -> str:
    """TF_CONFIG of a 2-worker cluster on 127.0.0.1 where this is worker 0 and worker 1 never starts;
    returns worker 1's address."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    return cluster["worker"][1]


def test_a_missing_peer_is_one_line_after_the_cluster_timeout(world, tmp_path, monkeypatch, capfd):
    """It waited forever in TensorFlow's C++ before."""
    assert cli.train_command.params[[p.name for p in cli.train_command.params].index("cluster_timeout")].default \
        == distribute.CLUSTER_TIMEOUT
    missing = cluster_env(monkeypatch)
    started = time.monotonic()
    one_line(invoke("train", world.records, "-o", tmp_path / "run", "--strategy", "multi-worker", "--cluster-timeout",
                    "2", *TINY_TRAIN), capfd, "1 of the 1 other tasks did not start within 2 s", missing,
             "--cluster-timeout")
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()


def test_ctrl_c_while_waiting_for_the_cluster_is_one_line(world, tmp_path, monkeypatch, python_ctrl_c):
    cluster_env(monkeypatch)
    own = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"][0].rpartition(":")

    def interrupt_once_listening():
        for _ in range(600):
            try:
                socket.create_connection((own[0], int(own[2])), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_listening, daemon=True).start()
    result = invoke("train", world.records, "-o", tmp_path / "run", "--strategy", "multi-worker", *TINY_TRAIN,
                    "--cluster-timeout", "60")  # a missed Ctrl-C fails in a minute, not five
    assert result.exit_code == 130, (result.output, result.exception)
    assert result.output.strip() == "interrupted while waiting for the other tasks of the cluster " \
                                    f"({json.loads(os.environ['TF_CONFIG'])['cluster']['worker'][1]})"


def test_sigterm_while_waiting_for_the_cluster_ends_the_process_at_once(world, tmp_path, monkeypatch):
    """In a process of its own: it ignored SIGTERM for minutes (TensorFlow's C++ wait, and its handler)."""
    cluster_env(monkeypatch)
    own = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"][0].rpartition(":")
    proc = subprocess.Popen([sys.executable, "-m", "tfcap", "train", str(world.records), "-o", str(tmp_path / "run"),
                             "--strategy", "multi-worker", *TINY_TRAIN], env={**ENV, "TF_CONFIG": os.environ["TF_CONFIG"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((own[0], int(own[2])), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 5 and proc.returncode == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Inputs at or under the output; decoding changed on --resume; nothing to caption; an empty batch

@pytest.mark.parametrize("out, init", [("xe", "xe"), ("nest", "nest/xe")])
def test_train_refuses_an_output_that_would_delete_its_init_run(world, tmp_path, out, init):
    """`-o xe --init xe --overwrite` deleted the cross-entropy run before reading it."""
    shutil.copytree(world.run, tmp_path / init)
    before = listing(tmp_path)
    one_error(invoke("train", world.records, "-o", tmp_path / out, "--objective", "scst", "--init", tmp_path / init,
                     "--overwrite", "--epochs", "1", "--quiet"), f"would replace the --init run {tmp_path / init}")
    assert listing(tmp_path) == before
    with pytest.raises(TfcapError, match="would replace the --init run"):  # the library refuses it too
        train.train(world.records, tmp_path / out, overwrite=True, show_progress=False,
                    train_config=train.TrainConfig(objective="scst", init=str(tmp_path / init), epochs=1))
    assert listing(tmp_path) == before


def test_caption_dir_resume_refuses_another_decoding_and_keeps_the_one_it_began_with(world, tmp_path):
    """`--resume --beam-size 1` on an output begun with beam 3 mixed two decodings in one file."""
    out = tmp_path / "out.csv"
    shutil.copy(world.csv, out)
    shutil.copy(caption.settings_path(world.csv), caption.settings_path(out))  # begun with the defaults
    recorded = json.loads(caption.settings_path(out).read_text())
    assert (recorded["model"], recorded["beam_size"]) == (str(world.run.resolve()), 3)
    begun = "".join(out.read_text().splitlines(keepends=True)[:3])
    out.write_text(begun)  # interrupted after two rows
    for option, value in [("--beam-size", "1"), ("--length-penalty", "0.5"), ("--max-pixels", "100"),
                          ("--model", world.records)]:
        one_error(invoke("caption-dir", world.photos, "-o", out, "--resume", option, value,
                         *([] if option == "--model" else ["--model", world.run])),
                  f"{option} {value} differs from the", f"that {out} was begun with")
        assert out.read_text() == begun
    ok("caption-dir", world.photos, "-o", out, "--model", world.run, "--resume", "--quiet", "--beam-size", "3")
    assert out.read_bytes() == world.csv.read_bytes()
    out.write_text(begun)
    ok("caption-dir", world.photos, "-o", out, "--resume", "--quiet")  # no option: the recorded ones, its model too
    assert out.read_bytes() == world.csv.read_bytes()


def test_caption_dir_of_a_folder_without_images_says_so_and_writes_nothing(world, tmp_path):
    (tmp_path / "empty").mkdir()
    result = ok("caption-dir", tmp_path / "empty", "-o", tmp_path / "out.csv", "--model", world.run)
    assert result.stderr.strip() == (f"caption-dir: 0 images to caption: no image file (.jpg .jpeg .png .gif .bmp "
                                     f".webp) in {tmp_path / 'empty'}; {tmp_path / 'out.csv'} left as it was")
    assert listing(tmp_path) == ["empty"]


def test_savedmodel_captions_an_empty_batch(world, savedmodel):
    serve = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    empty = serve(images=tf.constant([], tf.string))
    assert empty["captions"].shape == (0,) and empty["scores"].shape == (0,) and empty["scores"].dtype == tf.float32
    one = serve(images=tf.constant([(world.images / "0.png").read_bytes()]))
    assert one["captions"].shape == (1,) and one["captions"].numpy()[0]
