import subprocess
import sys

import tfcap


def test_version_and_help_via_module_and_script():
    out = subprocess.run([sys.executable, "-m", "tfcap", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and tfcap.__version__ in out.stdout
    out = subprocess.run(["tfcap", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build-records" in out.stdout


def test_cli_precision_and_architecture_choices_are_the_encoders():
    """The CLI spells them out (it must not import TensorFlow); they must stay the encoder's."""
    from tfcap import cli, encoder

    assert ("auto", *cli._PRECISIONS) == encoder.PRECISIONS
    assert cli._ARCHITECTURES == encoder.ARCHITECTURES


def test_train_takes_mobilenet_alpha_from_a_keras_weights_file_name(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tfcap import cli, encoder, train

    assert encoder.mobilenet_alpha_of("/x/mobilenet_2_5_224_tf_no_top.h5") == 0.25
    assert encoder.mobilenet_alpha_of("mobilenet_7_5_128_tf.h5") == 0.75
    for name in ("imagenet", "none", "weights.h5", "mobilenet_2_5_225_tf_no_top.h5", "mobilenet_3_0_224_tf.h5"):
        assert encoder.mobilenet_alpha_of(name) is None
    seen = []
    monkeypatch.setattr(train, "train", lambda records, run, *, encoder_config, **kwargs: seen.append(encoder_config))
    weights = str(tmp_path / "mobilenet_5_0_160_tf_no_top.h5")
    for args, alpha in ((["--encoder", "mobilenet", "--encoder-weights", weights], 0.5),
                        (["--encoder", "mobilenet", "--encoder-weights", weights, "--alpha", "0.75"], 0.75),
                        (["--encoder", "mobilenet", "--encoder-weights", "none"], 1.0),
                        (["--encoder", "xception", "--encoder-weights", "none"], 1.0)):
        result = CliRunner().invoke(cli.main, ["train", str(tmp_path), "-o", str(tmp_path / "run"), *args])
        assert result.exit_code == 0, result.output
        assert seen[-1].alpha == alpha
