"""Run-root IO: URIs over fsspec, atomic commits, Parquet schemas, image decoding."""

from u2seg.io.runroot import RunRoot, RunRootError, filesystem_for, pyarrow_filesystem, split_protocol

__all__ = ["RunRoot", "RunRootError", "filesystem_for", "pyarrow_filesystem", "split_protocol"]
