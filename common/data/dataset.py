"""In-memory text classification dataset shared by the loaders and partitioners."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DataValidationError", "TextDataset"]


class DataValidationError(ValueError):
    """Bad site/bundled data; message names file and line."""


# eq=False: a generated __eq__/__hash__ would compare/hash the ndarray field,
# which is ambiguous/unhashable; identity semantics are what callers get anyway.
@dataclass(frozen=True, eq=False)
class TextDataset:
    """Immutable texts + integer labels, so loaders and partitioners agree on one shape.

    ``labels`` is stored as a read-only int64 copy so a frozen dataset stays frozen.
    """

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None

    def __post_init__(self) -> None:
        """Reject inconsistent fields early instead of failing deep inside training."""
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=True)
        labels.setflags(write=False)
        if len(labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(labels)} labels")
        if not self.label_names:
            raise ValueError("label_names must not be empty")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError("label_names must be unique")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ValueError(f"labels must lie in range({len(self.label_names)})")
        if self.groups is not None and len(self.groups) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.groups)} groups")
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.texts)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """Rows at ``indices`` (integer positions or a boolean mask), e.g. one partition."""
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"indices out of range for dataset of size {len(self)}")
        positions = [int(i) for i in idx]
        return TextDataset(
            name=self.name,
            texts=tuple(self.texts[i] for i in positions),
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else tuple(self.groups[i] for i in positions),
        )

    def label_counts(self) -> dict[str, int]:
        """Examples per label name (zeros included), in ``label_names`` order."""
        counts = np.bincount(self.labels, minlength=len(self.label_names))
        return {name: int(c) for name, c in zip(self.label_names, counts, strict=True)}
