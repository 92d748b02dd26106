"""Reading input images from S3 through an outage: waited out, never recorded as a bad image."""

from __future__ import annotations

import time
import uuid

import cv2
import numpy as np
import pytest

from u2seg.io.inputs import InputUnreachableError
from u2seg.pipeline.extract_actor import decode_batch

pytestmark = pytest.mark.integration


def _batch(uris: list[str]) -> dict[str, np.ndarray]:
    return {"uri": np.array(uris), "image_id": np.array([f"id{i}" for i in range(len(uris))]),
            "version": np.array(["1-1"] * len(uris))}


def test_an_outage_is_waited_out_and_a_missing_image_is_an_error_row(s3):
    import s3fs
    from helpers import Background

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    prefix = f"{s3.bucket}/reads-{uuid.uuid4().hex[:8]}"
    ok, png = cv2.imencode(".png", np.full((20, 30, 3), 200, np.uint8))
    assert ok
    fs.pipe_file(f"{prefix}/a.png", png.tobytes())
    uris = [f"s3://{prefix}/a.png", f"s3://{prefix}/missing.png"]
    opts = s3.storage_options()
    warm = decode_batch(_batch(uris), opts, 0)
    assert warm["ok"].tolist() == [True, False] and "FileNotFoundError" in warm["error_class"][1]
    with s3.outage():
        patient = Background(decode_batch, _batch(uris[:1]), opts, 120)
        with pytest.raises(InputUnreachableError, match="could not read"):
            decode_batch(_batch(uris[:1]), opts, 0)    # no budget: the task fails, no error row
        time.sleep(3)
        assert patient.alive(), f"the read gave up during the outage: {patient.error!r}"
    out = patient.value(150)
    assert out["ok"].tolist() == [True] and out["image"][0].shape == (20, 30, 3)
