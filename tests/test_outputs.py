"""Output locks: one tfcap process per output, refused in one line, never a stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tfcap import caption
from tfcap.cli import main
from tfcap.errors import TfcapError
from tfcap.outputs import OutputLock

HOLD = "import sys; from tfcap.outputs import OutputLock; lock = OutputLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"


@pytest.fixture
def held_by_another_process():
    """Start a second process holding the lock on a path; yield it (its pid names the owner)."""
    holders = []

    def hold(target: Path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


def test_second_lock_on_an_output_is_refused_naming_the_owner_until_it_is_released(tmp_path):
    with OutputLock(tmp_path / "out.csv"):
        with pytest.raises(TfcapError, match=rf"out.csv is in use by another tfcap process \(pid {os.getpid()}\)"):
            OutputLock(tmp_path / "sub" / ".." / "out.csv")  # another spelling of the same output
    OutputLock(tmp_path / "out.csv").release()  # free again


def test_lock_of_a_killed_process_is_never_stale(tmp_path, held_by_another_process):
    holder = held_by_another_process(tmp_path / "run")
    with pytest.raises(TfcapError, match=rf"in use by another tfcap process \(pid {holder.pid}\)"):
        OutputLock(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    OutputLock(tmp_path / "run").release()


def test_train_into_a_run_directory_in_use_is_one_line_exit_2(tmp_path, held_by_another_process):
    holder = held_by_another_process(tmp_path / "run")
    for extra in ([], ["--resume"]):
        result = CliRunner().invoke(main, ["train", str(tmp_path / "records"), "-o", str(tmp_path / "run"), *extra])
        assert result.exit_code == 2, result.output
        assert result.output == f"Error: {tmp_path / 'run'} is in use by another tfcap process (pid {holder.pid})\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_caption_dir_output_in_use_is_refused_and_left_alone(tmp_path, held_by_another_process, resume):
    (tmp_path / "images").mkdir()
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "a.png", "caption": "a cat", "score": -1.0, "error": ""}\n')
    before = out.read_bytes()
    holder = held_by_another_process(out)
    with pytest.raises(TfcapError, match=rf"out.jsonl is in use by another tfcap process \(pid {holder.pid}\)"):
        caption.caption_directory(None, tmp_path / "images", out, fmt="jsonl", resume=resume, overwrite=not resume)
    assert out.read_bytes() == before


def test_lock_file_is_removed_by_its_owner_and_a_lock_taken_meanwhile_is_not_lost(tmp_path):
    out = tmp_path / "out.csv"
    first = OutputLock(out)
    assert first.path.is_file()
    first.release()
    assert not first.path.exists()  # nothing left beside the output
    # A process that opened the old lock file before its owner removed it must not think it holds
    # the lock while a third takes the new file: the flock-then-check-inode loop retries.
    holder = OutputLock(out)
    stale = os.open(holder.path, os.O_RDWR)
    holder.release()
    again = OutputLock(out)
    assert again.path.is_file() and os.fstat(stale).st_ino != os.stat(again.path).st_ino
    with pytest.raises(TfcapError, match="in use"):
        OutputLock(out)
    os.close(stale)
    again.release()
