"""The CLI answers at once: help, usage errors and `tfcap models` never import TensorFlow, and the
decoding options' help says the defaults the bundled model really uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tfcap import pretrained

COMMANDS = ("build-records", "train", "caption-dir", "caption", "export", "gallery", "evaluate", "models", "demo")

# Each call in a fresh interpreter (sys.modules starts clean), through the `tfcap` entry point.
PROBE = """
import json, sys
from tfcap.cli import main

found = []
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="tfcap")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    found.append([args, code, "tensorflow" in sys.modules])
print("PROBE " + json.dumps(found))
"""


def without_log_level() -> dict:
    """The environment without TF_CPP_MIN_LOG_LEVEL (the tests' conftest sets it), as a user's shell has it."""
    return {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def probe(calls: list[list[str]]) -> list[tuple[list[str], int, bool]]:
    """(args, exit code, whether TensorFlow was imported by then) of each call, one after the other."""
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(calls)], capture_output=True, text=True,
                         env=without_log_level())
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("PROBE "))
    return [tuple(item) for item in json.loads(line[len("PROBE "):])]


def test_help_usage_errors_and_models_do_not_import_tensorflow(tmp_path):
    calls = [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS),
             ["caption-dir", "x", "--ouput", "y.csv"],  # unknown option
             ["caption-dir", "x"],  # missing required option
             ["caption"],  # missing argument
             ["captoin", "x.jpg"],  # a typo'd command
             ["train", "records", "-o", "run", "--encoder", "resnet"],  # a bad choice
             ["caption-dir", "x", "-o", "y.csv", "--beam-size", "0"],  # out of range
             ["models"]]
    results = probe(calls)
    assert [args for args, _, imported in results if imported] == []
    expected = [0 if "--help" in c or c in (["--version"], ["models"]) else 2 for c in calls]
    assert [code for _, code, _ in results] == expected


def test_a_typo_is_reported_by_the_installed_script(tmp_path):
    out = subprocess.run(["tfcap", "caption-dir", "x", "--ouput", "y.csv"], capture_output=True, text=True,
                         cwd=tmp_path, env=without_log_level())
    assert out.returncode == 2
    assert "No such option '--ouput'" in out.stderr and "Did you mean '--out'?" in out.stderr


def test_a_command_that_runs_imports_tensorflow_quietly(tmp_path):
    """TensorFlow is imported once the command runs, still without its start-up chatter: one line, the error."""
    out = subprocess.run(["tfcap", "caption-dir", "missing", "-o", "out.csv"], capture_output=True, text=True,
                         cwd=tmp_path, env=without_log_level())
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["Error: missing is not a directory"]


def test_decoding_option_help_shows_the_bundled_models_defaults():
    from click.testing import CliRunner

    from tfcap.cli import main

    chosen = pretrained.decoding()
    assert chosen == {"beam_size": 2, "length_penalty": 1.0, "no_repeat_ngram": 2}  # the bundled model's decoding
    for command in ("caption-dir", "caption", "export", "evaluate"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"], terminal_width=400).output.split())
        assert "1 is greedy (default: the model's decoding.json, else 3; the bundled model's: 2)" in text, command
        assert "ranking beams (default: the model's decoding.json, else 0; the bundled model's: 1)" in text, command
        assert "(default 0)" not in text and "(default 3)" not in text
