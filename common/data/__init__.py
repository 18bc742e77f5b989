"""Text datasets for fedsilo: bundled public corpora, site files and partitioners."""

from common.data.builtin import BUILTIN_DATASETS, builtin_label_names, load_builtin
from common.data.dataset import DataValidationError, TextDataset
from common.data.partition import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
)
from common.data.sitefile import SUPPORTED_SUFFIXES, load_site_file

__all__ = [
    "BUILTIN_DATASETS",
    "SUPPORTED_SUFFIXES",
    "DataValidationError",
    "TextDataset",
    "builtin_label_names",
    "load_builtin",
    "load_site_file",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
]
