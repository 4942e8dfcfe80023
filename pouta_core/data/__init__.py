"""Data set layouts (MVTec AD, VisA, DAGM 2007, generic folders), decoding and caching."""

from pouta_core.data.datasets import EvalDataset, TrainDataset, decode
from pouta_core.data.errors import DataError
from pouta_core.data.images import ImageCache, load_image, load_mask
from pouta_core.data.layouts import DATASETS, Sample, Split, categories, read_split

__all__ = ["DATASETS", "DataError", "ImageCache", "Sample", "Split", "EvalDataset", "TrainDataset",
           "categories", "decode", "load_image", "load_mask", "read_split"]
