"""tfcap: train CNN-LSTM image captioners and caption whole image collections, in TensorFlow graphs.

    import tfcap
    print(tfcap.Captioner()("dog.jpg"))     # the bundled model (tfcap.api)

The command line (`tfcap ...`) is a thin layer over this library. Heavy modules import
TensorFlow, so they are loaded on first use: `import tfcap` stays fast, and so does
`tfcap.Captioner` until one is built.
"""

__version__ = "0.1.0"

from tfcap.errors import TfcapError  # noqa: E402  (light: no TensorFlow)

__all__ = ["__version__", "TfcapError", "Captioner", "Caption"]


def __getattr__(name: str):
    """tfcap.Captioner and tfcap.Caption, from tfcap.api on first use."""
    if name in ("Captioner", "Caption"):
        from tfcap import api

        return getattr(api, name)
    raise AttributeError(f"module 'tfcap' has no attribute {name!r}")
