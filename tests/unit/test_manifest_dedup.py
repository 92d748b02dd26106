"""First-occurrence mask over image ids: the core of the manifest's duplicate pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from u2seg.pipeline.manifest import first_occurrences

pytestmark = pytest.mark.unit


def test_first_occurrence_wins_across_chunks_and_slices():
    ids = ["a" * 16, "b" * 16, "a" * 16, "c" * 16, "b" * 16, "b" * 16]
    chunked = pa.chunked_array([pa.array(ids[:3]), pa.array(["z" * 16, *ids[3:]]).slice(1)])
    assert first_occurrences(chunked).tolist() == [True, True, False, True, False, False]
    assert first_occurrences(pa.array(ids)).tolist() == [True, True, False, True, False, False]


def test_empty_and_unique():
    assert first_occurrences(pa.array([], pa.string())).shape == (0,)
    ids = [f"{i:016x}" for i in range(1000)]
    assert np.all(first_occurrences(pa.array(ids)))
