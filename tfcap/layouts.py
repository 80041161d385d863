"""Former home of dataset layouts and splits, now `tfcap.datasets`: kept so that imports still work."""

from tfcap.datasets import LAYOUTS, SPLITS, Captions, Source, SplitConfig, assign_splits, image_id, read_source

__all__ = ["LAYOUTS", "SPLITS", "Captions", "Source", "SplitConfig", "assign_splits", "image_id", "read_source"]
