"""`tfcap train --strategy`: mirrored over two logical CPUs trains as one device does, multi-worker
over two local processes writes one run directory and survives a killed worker, and the edges
are one-line errors.

A process's logical CPU devices are fixed before TensorFlow starts, and MultiWorkerMirroredStrategy
sets up collectives at start-up, so both run in child processes. The two long tests are first and
third in this file: pytest-xdist hands out the first tests two by two, so they run side by side.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import epochs_logged, greedy_captions
from tfcap import cli, distribute, records
from tfcap.cli import main
from tfcap.errors import TfcapError

# Options of every run here: a tiny decoder, a constant learning rate, no BLEU, no early stop.
TINY_OPTIONS = ["--encoder", "convnet", "--image-size", "32", "--encoder-weights", "none",
                "--units", "16", "--embed-dim", "16", "--learning-rate", "0.01", "--lr-schedule", "constant",
                "--eval-every", "0", "--patience", "0", "--seed", "1", "--quiet"]


def captions_of(run_dir: Path, records_dir: Path, images: int = 8) -> list[str]:
    """Greedy captions of the first training images by the run's saved model."""
    return greedy_captions(run_dir, list(records.iterate_examples(records_dir, "train"))[:images])


def test_mirrored_over_two_cpus_trains_like_one_device_and_resume_may_change_the_strategy(tiny_records, tiny_features,
                                                                                         tmp_path):
    """Dropout 0: its masks are drawn per tensor shape, so a replica's slice of the batch draws other
    masks than the whole batch does on one device (as valid, not the same numbers). 64 captions of
    one length in batches of 7: the last batch has one row, so one replica trains on an empty slice.
    A small --clip-norm clips every step, so that clipping each replica's gradient before the sum
    (what Keras' global_clipnorm does under a strategy) would show: Adam hides a gradient's scale.
    Then the one-device run is resumed under mirrored: a run may move to other devices."""
    cache = tiny_features  # the tiny encoder's features: nothing to encode here
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from click.testing import CliRunner
        from tfcap.cli import main
        from test_distribute import captions_of

        def train(name, *options):
            result = CliRunner().invoke(main, ["train", {str(tiny_records)!r}, "-o", {str(tmp_path)!r} + "/" + name,
                                               "--cache-dir", {str(cache)!r}, "--batch-size", "7", "--dropout", "0",
                                               "--clip-norm", "0.05",
                                               *{TINY_OPTIONS!r}, *options])
            assert result.exit_code == 0, result.output

        mirrored = ["--strategy", "mirrored", "--devices", "CPU:0,CPU:1"]
        train("one", "--epochs", "1", "--strategy", "one-device")
        train("two", "--epochs", "1", *mirrored)
        print(json.dumps([captions_of({str(tmp_path)!r} + "/" + name, {str(tiny_records)!r}) for name in ("one", "two")]))
        train("one", "--epochs", "2", "--resume", *mirrored)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(  # this folder: the child imports captions_of
                              filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = epochs_logged(tmp_path / "one"), epochs_logged(tmp_path / "two")
    assert one[0]["steps"] == two[0]["steps"] == 10
    for name in ("first_batch_loss", "loss", "val_loss"):
        assert two[0][name] == pytest.approx(one[0][name], rel=1e-5, abs=0), name
    captions_one, captions_two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert captions_two == captions_one
    assert [e["epoch"] for e in one] == [1, 2] and one[1]["loss"] < one[0]["loss"]
    saved = json.loads((tmp_path / "one" / "config.json").read_text())["train"]
    assert (saved["strategy"], saved["devices"], saved["epochs"]) == ("mirrored", "CPU:0,CPU:1", 2)


def test_tf_config_names_the_chief_as_tensorflow_does():
    workers = {"worker": ["a:1", "b:2"]}
    config = lambda cluster, kind, index: json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})
    assert distribute.parse_tf_config(config(workers, "worker", 0)).is_chief
    assert not distribute.parse_tf_config(config(workers, "worker", 1)).is_chief
    with_chief = {"chief": ["c:3"], **workers}
    assert distribute.parse_tf_config(config(with_chief, "chief", 0)).is_chief
    assert not distribute.parse_tf_config(config(with_chief, "worker", 0)).is_chief
    assert distribute.parse_tf_config(config(with_chief, "worker", 1)).workers == 3
    with pytest.raises(TfcapError, match="task type 'evaluator'"):
        distribute.parse_tf_config(config(workers, "evaluator", 0))


def test_cli_offers_the_strategies_of_the_library():
    assert cli._STRATEGIES == distribute.STRATEGIES


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def processes():
    """Popen objects started by a test, killed (and reaped) when it ends however it ends."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_workers(processes, tiny_records, tmp_path, *extra) -> list[subprocess.Popen]:
    """Two `tfcap train --strategy multi-worker` processes on 127.0.0.1, worker 0 the chief."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI's quiet start-up
        env.update(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
                   TMPDIR=str(tmp_path / "tmp"))
        command = [sys.executable, "-m", "tfcap", "train", str(tiny_records), "-o", str(tmp_path / "run"),
                   "--cache-dir", str(tmp_path / "cache"), "--epochs", "3", "--batch-size", "8", "--dropout", "0",
                   *TINY_OPTIONS, "--strategy", "multi-worker", *extra]
        log = open(tmp_path / f"worker{index}-{len(processes)}.log", "w+")
        workers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        workers[-1].log = log
        processes.append(workers[-1])
    return workers


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def test_multi_worker_writes_one_run_and_a_killed_worker_ends_the_other_then_both_resume(
        tiny_records, tmp_path, processes):
    (tmp_path / "tmp").mkdir()
    chief, other = start_workers(processes, tiny_records, tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and chief.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the kill must land before the workers are through epochs 2 and 3
    assert checkpoint.exists(), output(chief)[-3000:]  # epoch 1 is saved
    other.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        chief.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the chief still runs 60 s after the other worker was killed")
    print(f"the chief ended {time.monotonic() - killed:.1f} s after the kill")
    said = output(chief)
    assert chief.returncode == 2 and "Traceback" not in said, said[-3000:]
    assert said.strip().splitlines()[-1].startswith("Error: multi-worker training stopped, a worker is gone")
    assert 1 <= len(epochs_logged(tmp_path / "run")) < 3

    leftovers = set((tmp_path / "tmp").iterdir())  # what the kill may have left of the worker's scratch
    resumed = start_workers(processes, tiny_records, tmp_path, "--resume")
    for proc in resumed:
        proc.wait(timeout=240)
        assert proc.returncode == 0, output(proc)[-3000:]
    assert "resuming" in output(resumed[0])
    assert [e["epoch"] for e in epochs_logged(tmp_path / "run")] == [1, 2, 3]  # one line each, by the chief
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["cache", "run", "tmp"]
    assert set((tmp_path / "tmp").iterdir()) == leftovers, "a non-chief's checkpoints are deleted"
    assert all(captions_of(tmp_path / "run", tiny_records, images=1))


@pytest.mark.parametrize("tf_config, options, message", [
    (None, ["--strategy", "multi-worker"], "--strategy multi-worker needs TF_CONFIG"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]', ["--strategy", "multi-worker"], "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     ["--strategy", "multi-worker"], "TF_CONFIG task index 1 is not in 0..0"),
    ('{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}',
     ["--strategy", "multi-worker"], 'TF_CONFIG has a job "ps"'),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     ["--strategy", "multi-worker"], '"host:port" addresses'),
    (None, ["--strategy", "mirrored", "--devices", "GPU:0,GPU:1"], "--devices: no device GPU:0 here"),
    (None, ["--strategy", "mirrored", "--devices", "CPU:0"], "mirrored needs at least two devices, found 1"),
    (None, ["--strategy", "mirrored"], "mirrored needs at least two devices, found 0"),
    (None, ["--strategy", "mirrored", "--devices", "CPU:0,CPU:0"], "--devices names a device twice"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}',
     ["--strategy", "multi-worker", "--devices", "CPU:0"], "--devices goes with --strategy mirrored"),
    (None, ["--strategy", "mirrored", "--train-encoder"], "--train-encoder runs with --strategy one-device"),
    (None, ["--strategy", "multi-worker", "--objective", "scst", "--init", "."],
     "--objective scst runs with --strategy one-device"),
])
def test_strategy_edges_are_one_line_errors(tmp_path, monkeypatch, tf_config, options, message):
    """Each is found before TensorFlow runs an op or a file is read: RECORDS need not even exist."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    result = CliRunner().invoke(main, ["train", str(tmp_path / "records"), "-o", str(tmp_path / "run"), *options])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1 and message in result.output
    assert not (tmp_path / "run").exists()
