"""Committing one extract group: ledger last, and writers of an older run fenced off."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.io import RunRoot
from u2seg.io.layout import group_name
from u2seg.pipeline.extract_commit import StaleWriterError, run_token, write_group

pytestmark = pytest.mark.unit


def _error_batch(ids: list[str]) -> dict[str, np.ndarray]:
    """A group whose images all failed to decode: enough to exercise the commit without a model."""
    n = len(ids)
    result = np.empty(n, dtype=object)
    result[:] = [b""] * n
    return {"image_id": np.array(ids), "uri": np.array([f"/x/{i}.jpg" for i in ids]), "ok": np.zeros(n, bool),
            "error_class": np.array(["ImageDecodeError:truncated"] * n), "message": np.array(["cut"] * n),
            "result": result}


def test_commit_writes_every_table_under_one_name_and_the_ledger(tmp_path):
    root = RunRoot(str(tmp_path))
    root.write_json("extract/_STARTED", {"config_hash": "h", "run_token": "A"})
    out = write_group(_error_batch(["a", "b"]), root, run_token(root))
    name = group_name(["a", "b"])
    assert out["part"].tolist() == [name]
    for table in ("masks", "patches", "errors", "images"):
        assert root.list(f"extract/{table}") == [name]
    assert root.read_parquet("extract/images").column("status").to_pylist() == ["error", "error"]


def test_a_writer_of_an_older_run_commits_nothing(tmp_path):
    root = RunRoot(str(tmp_path))
    root.write_json("extract/_STARTED", {"config_hash": "h", "run_token": "B"})   # a newer driver started
    with pytest.raises(StaleWriterError, match="newer run"):
        write_group(_error_batch(["c"]), root, "A")
    for table in ("masks", "patches", "errors", "images"):
        assert root.list(f"extract/{table}") == []
    write_group(_error_batch(["c"]), root, None)  # called outside the runner: no fence
    assert root.list("extract/images") == [group_name(["c"])]
