"""What the evals score with: greedy prefix agreement, standard errors and paired differences, table cells."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mlx_kvpred.session import common_prefix


def prefix_match(reference: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens of `other` equal to `reference`."""
    return common_prefix(reference, other)


def agreement_prefix(reference: Sequence[int], other: Sequence[int], n: int,
                     eos: set[int] | frozenset = frozenset()) -> int:
    """Exact-match prefix length of a greedy continuation with the base's, out of `n`. The reference ends at its
    first EOS (generation would stop there): matching it through that EOS counts as a full match, n."""
    ref = list(reference[:n])
    cut = next((i for i, t in enumerate(ref) if t in eos), None)
    if cut is not None:
        ref = ref[:cut + 1]
    m = prefix_match(ref, other)
    return n if m == len(ref) else m


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean of per-sequence values (None for fewer than 2)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict:
    """Mean and standard error of per-sequence differences from `reference` on the same sequences: far tighter
    than comparing two means."""
    diff = np.subtract(values, reference)
    return {"diff": float(diff.mean()), "se": standard_error(diff)}


def cell(value, fmt: str) -> str:
    """A table cell: `value` formatted, or empty for None."""
    return "" if value is None else format(value, fmt)
