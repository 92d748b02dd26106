"""Every run-root writer round-trips through local disk and the S3 server."""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from u2seg.io import RunRoot, RunRootError
from u2seg.io.schemas import ERRORS_SCHEMA, MANIFEST_SCHEMA, MASKS_SCHEMA, error_row

pytestmark = pytest.mark.integration


def test_bytes_text_json_round_trip(any_root):
    any_root.write_bytes("a/b/blob.bin", b"\x00\x01binary")
    any_root.write_text("a/note.txt", "héllo")
    any_root.write_json("a/obj.json", {"x": [1, 2], "f": np.float32(0.5), "i": np.int64(3)})
    assert any_root.read_bytes("a/b/blob.bin") == b"\x00\x01binary"
    assert any_root.read_text("a/note.txt") == "héllo"
    assert any_root.read_json("a/obj.json") == {"x": [1, 2], "f": 0.5, "i": 3}
    assert any_root.list("a") == ["note.txt", "obj.json"]
    assert any_root.list("a", ".json") == ["obj.json"]
    assert any_root.list("missing") == []
    any_root.write_text("a/note.txt", "overwritten")
    assert any_root.read_text("a/note.txt") == "overwritten"
    any_root.remove("a/note.txt")
    assert not any_root.exists("a/note.txt")


def test_parquet_round_trip_with_every_schema(any_root):
    masks = pa.table({
        "image_id": ["i1"], "mask_id": [0], "rle": [{"size": [4, 4], "counts": "abc"}],
        "bbox": [[0.0, 1.0, 2.0, 3.0]], "area": [5], "score": [0.9], "descriptor": [[0.1, 0.2]],
        "image_width": [4], "image_height": [4]}, schema=MASKS_SCHEMA)
    any_root.write_parquet("extract/masks/part-0.parquet", masks)
    any_root.write_parquet("extract/masks/part-1.parquet", masks)
    errors = pa.Table.from_pylist([error_row("i2", "u", "extract", ValueError("bad"))], schema=ERRORS_SCHEMA)
    any_root.write_parquet("extract/errors/part-0.parquet", errors)
    back = any_root.read_parquet("extract/masks")
    assert back.num_rows == 2 and back.schema.equals(MASKS_SCHEMA)
    assert back.column("rle").to_pylist()[0] == {"size": [4, 4], "counts": "abc"}
    assert any_root.read_parquet("extract/errors").column("error_class").to_pylist() == ["ValueError"]
    # Ray Data / pyarrow read the same files through the pyarrow filesystem
    files = any_root.parquet_files("extract/masks")
    assert len(files) == 2
    ds = pq.ParquetDataset([any_root.path("extract/masks", f.rsplit("/", 1)[1]) for f in files],
                           filesystem=any_root.pyarrow_fs())
    assert ds.read().num_rows == 2
    empty = any_root.read_parquet("extract/none", schema=MANIFEST_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(MANIFEST_SCHEMA)


def test_run_root_pickles_without_its_filesystem(any_root):
    import pickle

    any_root.write_text("x.txt", "1")
    clone = pickle.loads(pickle.dumps(any_root))
    assert clone.uri == any_root.uri and clone.read_text("x.txt") == "1"
    assert "secret" not in repr(any_root)


def test_local_write_is_atomic_no_temp_left(tmp_path):
    root = RunRoot(str(tmp_path / "r"))
    root.write_bytes("d/f.bin", b"x" * 1000)
    assert os.listdir(tmp_path / "r" / "d") == ["f.bin"]


def test_unwritable_roots_fail_early_and_clearly(s3, tmp_path):
    bad_bucket = RunRoot("s3://x_/run", s3.storage_options())  # an invalid bucket name
    with pytest.raises(RunRootError, match="not writable"):
        bad_bucket.ensure_writable()
    unreachable = RunRoot("s3://b/x", {"key": "k", "secret": "s", "client_kwargs": {
        "endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}, "config_kwargs": {
        "connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(RunRootError, match="not writable") as info:
        unreachable.ensure_writable()
    assert "secret" not in str(info.value)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permissions
        with pytest.raises(RunRootError):
            RunRoot(str(ro / "run")).ensure_writable()


def test_a_write_waits_out_a_storage_outage_and_a_permanent_error_does_not_wait(s3):
    """The S3 endpoint is down for ~5 s: a write with a retry budget lands once it is back; an invalid
    bucket (a permanent error) fails at once despite the budget; with no budget the outage fails the write."""
    from helpers import Background

    uri = s3.uri(f"t-{uuid.uuid4().hex[:10]}")
    patient = RunRoot(uri, s3.storage_options(), retry_s=120)
    impatient = RunRoot(uri, s3.storage_options(), retry_s=0)
    patient.write_bytes("warm.bin", b"0")   # connections and caches exist before the outage
    with s3.outage():
        write = Background(patient.write_bytes, "a/part.bin", b"x" * 100_000)
        t0 = time.time()
        with pytest.raises(Exception) as info:
            impatient.write_bytes("a/other.bin", b"y")
        failed_after = time.time() - t0
        time.sleep(max(0.0, 5 - failed_after))
        assert write.alive(), f"the patient write ended during the outage: {write.error!r}"
    write.join(150)
    assert write.error is None, repr(write.error)
    assert patient.read_bytes("a/part.bin") == b"x" * 100_000
    assert not patient.exists("a/other.bin") and info.value is not None
    bad = RunRoot("s3://x_/run", s3.storage_options(), retry_s=120)
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017 - the backend's own error type for a bad bucket
        bad.write_bytes("f.bin", b"z")
    assert time.time() - t0 < 60, "a permanent error was retried"


def test_unfinished_writes_of_a_killed_writer_are_removed(s3, tmp_path):
    """A local temp file and an S3 multipart upload that never completed: invisible, then removed."""
    local = RunRoot(str(tmp_path / "run"))
    local.write_bytes("extract/masks/part-a.parquet", b"done")
    os.makedirs(local.path("extract/images"), exist_ok=True)
    with open(local.path("extract/images/.tmp-0123-part-b.parquet"), "wb") as fh:
        fh.write(b"half")
    assert local.list("extract/images") == []
    assert local.remove_unfinished_writes("extract") == 1
    assert sorted(os.listdir(local.path("extract/images"))) == []
    assert local.list("extract/masks") == ["part-a.parquet"]

    remote = RunRoot(s3.uri(f"t-{uuid.uuid4().hex[:10]}"), s3.storage_options())
    bucket, _, key = remote.path("extract/masks/part-c.parquet").partition("/")
    up = remote.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    remote.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1,
                      Body=b"x" * 1024)
    other = remote.path("label/x.json").partition("/")[2]
    other_up = remote.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=other)

    def pending(prefix: str) -> list[str]:
        page = remote.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=remote.path(prefix).partition("/")[2])
        return [u["Key"] for u in page.get("Uploads", [])]

    assert pending("extract") == [key] and remote.list("extract/masks") == []
    assert remote.remove_unfinished_writes("extract") == 1
    assert pending("extract") == [] and pending("label") == [other]   # other stages' uploads untouched
    remote.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=other, UploadId=other_up["UploadId"])
