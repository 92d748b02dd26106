"""Batched model calls: a batch failing for the batch's or the machine's sake never makes an error row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from u2seg.pipeline.batch_retry import ItemFailure, ResourceError, call_per_item, is_resource_error

pytestmark = pytest.mark.unit


def test_resource_errors_are_told_from_an_items_own_errors():
    assert is_resource_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_resource_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_resource_error(MemoryError())
    assert not is_resource_error(ValueError("expected uint8 HxWx3 image, got float32"))
    assert not is_resource_error(RuntimeError("shape mismatch"))


def test_an_oom_on_any_batch_of_two_or_more_leaves_every_item_ok():
    calls: list[int] = []

    def model(items):
        calls.append(len(items))
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [x * 10 for x in items]

    out = call_per_item(model, [1, 2, 3, 4, 5], sleep=lambda s: None)
    assert out == [10, 20, 30, 40, 50] and calls[0] == 5 and calls.count(1) == 5


def test_only_the_item_that_fails_alone_with_its_own_error_is_a_failure():
    def model(items):
        if 3 in items:
            raise ValueError("a shape the model cannot take")
        return [x * 10 for x in items]

    out = call_per_item(model, [1, 2, 3, 4], sleep=lambda s: None)
    assert out[:2] == [10, 20] and out[3] == 40
    assert isinstance(out[2], ItemFailure) and out[2].error_class == "ValueError"


def test_a_resource_error_that_persists_on_one_item_fails_the_task_after_retries():
    sleeps: list[float] = []

    def model(items):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(ResourceError, match="still failing after 3 retries"):
        call_per_item(model, [np.zeros(2)], sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 4.0]
    flaky = iter([torch.cuda.OutOfMemoryError("CUDA out of memory"), None])

    def recovers(items):
        err = next(flaky)
        if err is not None:
            raise err
        return ["ok"]

    assert call_per_item(recovers, ["x"], sleep=lambda s: None) == ["ok"]
