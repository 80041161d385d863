import subprocess
import sys

import tfcap


def test_version_and_help_via_module_and_script():
    out = subprocess.run([sys.executable, "-m", "tfcap", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and tfcap.__version__ in out.stdout
    out = subprocess.run(["tfcap", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build-records" in out.stdout


def test_cli_precision_choices_are_the_encoders():
    """The CLI spells the precisions out (it must not import TensorFlow); they must stay the encoder's."""
    from tfcap import cli, encoder

    assert ("auto", *cli._PRECISIONS) == encoder.PRECISIONS
