"""Where `caption-dir` runs: its engines.

- "local" (`tfcap.caption.caption_directory`): this process, one tf.data pipeline over a local
  folder; resumable, with a progress bar.
- "beam" (`tfcap.engines.beam.caption_directory`): one Apache Beam pipeline, on DirectRunner here
  or on Dataflow, Flink or Spark elsewhere, over any file system Beam has (gs://, s3://, local).

Both give the same rows for the same folder and model: the same candidate names
(`caption.is_image_name`), checks and error texts (`caption.diagnose_bytes`), decoding and model.
Apache Beam is an optional dependency (the `beam` extra), so the beam engine is imported here,
on demand, with a one-line message when it is missing.
"""

from __future__ import annotations

import importlib
import logging

from tfcap.errors import TfcapError

ENGINES = ("local", "beam")
BEAM_MISSING = "the beam engine needs Apache Beam: pip install 'tfcap[beam]'"


# Warnings Apache Beam 2.77 logs on every run here that say nothing about the run: the BigQuery
# client it does not need, and memory use it cannot measure because an optional import of its
# model manager needs PyTorch (apache_beam/ml/inference/base.py imports `resource` with it).
_NOISE = ("apitools not found", "Resource module is not available")


class _BeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def beam_engine():
    """The module `tfcap.engines.beam`; TfcapError naming the extra to install if Apache Beam is missing."""
    root = logging.getLogger()
    if not any(isinstance(f, _BeamNoise) for f in root.filters):
        root.addFilter(_BeamNoise())  # Beam logs these on the root logger
    try:
        # import_module, not `from tfcap.engines import beam`: that would find a module attribute left
        # by an earlier import even when the module itself is gone from sys.modules.
        return importlib.import_module("tfcap.engines.beam")
    except ImportError as e:
        if (e.name or "").split(".")[0] != "apache_beam":  # a broken install of something else: its own error
            raise
        raise TfcapError(BEAM_MISSING) from None
