"""Importing TensorFlow without its start-up chatter, for the command line and `tfcap.Captioner` alike.

A plain `import tensorflow` prints C++ log lines to stderr (oneDNN notes, CUDA probing, CPU
features), and the first operations print more ("failed call to cuInit" on a machine without a
GPU). None of it is about the user's images, so tfcap imports TensorFlow through `import_tensorflow`
before anything else imports it.
"""

from __future__ import annotations

import os
import sys


def import_tensorflow():
    """Import TensorFlow with its C++ logging at FATAL only (TF_CPP_MIN_LOG_LEVEL=3); return the module.

    Part of the chatter is logged before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so stderr is silenced
    at the file-descriptor level during the import only; the variable keeps the later lines (cuInit)
    away. A user who sets TF_CPP_MIN_LOG_LEVEL sees what it lets through, and a TensorFlow the
    program imported itself is left as it is.
    """
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    import tensorflow

    return tensorflow
