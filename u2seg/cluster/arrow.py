"""Turn Arrow list<float> columns into dense float32 matrices without Python lists.

Descriptors are stored as `list<float32>` in Parquet (see io/schemas.py). k-means needs them as one
contiguous [n, d] float32 array; going through Python lists would cost ~50x the memory and time, so
we read the flat child buffer and reshape it (zero copy when the chunk is float32, unsliced-compatible
and null-free).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _chunk_to_matrix(chunk: pa.Array) -> np.ndarray:
    """One Arrow list / fixed-size-list chunk -> [rows, d] float32 (a view when possible)."""
    if chunk.null_count:
        raise ValueError(f"descriptor column has {chunk.null_count} null rows; every row needs a vector")
    n = len(chunk)
    if pa.types.is_fixed_size_list(chunk.type):
        d = chunk.type.list_size
    elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
        if n == 0:
            return np.zeros((0, 0), dtype=np.float32)
        lengths = pc.list_value_length(chunk)
        mm = pc.min_max(lengths).as_py()
        if mm["min"] != mm["max"]:
            raise ValueError(f"descriptor rows have different lengths ({mm['min']}..{mm['max']})")
        d = int(mm["min"])
    else:
        raise TypeError(f"expected a list<float> column, got {chunk.type}")
    values = chunk.flatten()  # respects slicing offsets, unlike .values
    if values.null_count:
        raise ValueError("descriptor vectors contain null floats")
    if not pa.types.is_float32(values.type):
        values = values.cast(pa.float32())
    flat = values.to_numpy(zero_copy_only=False)
    if d == 0:
        raise ValueError("descriptor vectors are empty (d=0)")
    return flat.reshape(n, d)


def iter_list_column(col: pa.Array | pa.ChunkedArray) -> Iterator[np.ndarray]:
    """Yield one [rows, d] float32 matrix per Arrow chunk (so callers can copy into a preallocated array)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    for chunk in chunks:
        if len(chunk):
            yield _chunk_to_matrix(chunk)


def list_column_to_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Whole column -> one [n, d] float32 array (copies only when there are several chunks)."""
    mats = list(iter_list_column(col))
    if not mats:
        return np.zeros((0, 0), dtype=np.float32)
    dims = {m.shape[1] for m in mats}
    if len(dims) != 1:
        raise ValueError(f"descriptor chunks have different dimensions: {sorted(dims)}")
    return mats[0] if len(mats) == 1 else np.concatenate(mats, axis=0)


def matrix_to_list_array(x: np.ndarray) -> pa.ListArray:
    """[n, d] float32 -> list<float32> Arrow array (the storage type of descriptor columns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n * d >= 2**31:
        raise ValueError(f"{n}x{d} floats overflow list<float32> int32 offsets; write smaller parts")
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
