"""tfcap: train CNN-LSTM image captioners and caption whole image collections, in TensorFlow graphs.

The command line (`tfcap ...`) is a thin layer over this library. Heavy modules import
TensorFlow, so they are loaded on first use: `import tfcap` stays fast.
"""

__version__ = "0.1.0"

from tfcap.errors import TfcapError  # noqa: E402  (light: no TensorFlow)

__all__ = ["__version__", "TfcapError"]
