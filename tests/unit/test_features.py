"""Backbone: build, weights from files/URIs (safetensors, torch, wrapped DINO checkpoints), features."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from u2seg.features import (
    WeightsError,
    build_backbone,
    extract_features,
    preprocess,
    set_fused_attention,
)
from u2seg.features.weights import load_into, read_state_dict

pytestmark = pytest.mark.unit
NAME = "vit_small_patch8_224.dino"
SIZE = 32  # 4x4 patch grid: tiny and fast


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source():
    """A random model whose weights the tests save and load back."""
    return build_backbone(NAME, "none", image_size=SIZE, seed=1)


def _same_outputs(a, b, images) -> bool:
    fa, fb = extract_features(a, images, amp="none"), extract_features(b, images, amp="none")
    return all(torch.allclose(x, y, atol=1e-5) for x, y in
               ((fa.keys, fb.keys), (fa.tokens, fb.tokens), (fa.cls, fb.cls)))


def test_build_random_is_seeded_eval_and_fused(source, images):
    a = build_backbone(NAME, "none", image_size=SIZE, seed=0)
    b = build_backbone(NAME, "none", image_size=SIZE, seed=0)
    assert not a.training
    assert all(m.fused_attn for m in a.modules() if hasattr(m, "fused_attn"))
    assert _same_outputs(a, b, images)
    assert not _same_outputs(a, source, images)  # source is seed 1


def test_feature_shapes_and_keys_match_manual_qkv(source, images):
    f = extract_features(source, images, amp="none")
    assert f.grid == (4, 4)
    assert f.keys.shape == (2, 16, 384) and f.tokens.shape == (2, 16, 384) and f.cls.shape == (2, 384)
    assert f.keys.dtype == torch.float32
    # Recompute the last block's keys by hand: tokens entering the last block -> norm1 -> qkv.
    with torch.no_grad():
        x = source.patch_embed(images)
        x = source._pos_embed(x)
        x = source.norm_pre(x)
        for blk in source.blocks[:-1]:
            x = blk(x)
        last = source.blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))
        keys = qkv.reshape(2, 17, 3, 384)[:, 1:, 1]
        out = source.norm(last(x))
    assert torch.allclose(f.keys, keys, atol=1e-5)
    assert torch.allclose(f.tokens, out[:, 1:], atol=1e-5)
    assert torch.allclose(f.cls, out[:, 0], atol=1e-5)


def test_sdpa_equals_explicit_attention(source, images):
    fused = extract_features(source, images, amp="none")
    try:
        assert set_fused_attention(source, False) == 12
        explicit = extract_features(source, images, amp="none")
    finally:
        set_fused_attention(source, True)
    assert torch.allclose(fused.keys, explicit.keys, atol=1e-4)
    assert torch.allclose(fused.tokens, explicit.tokens, atol=1e-4)


def test_cpu_ignores_amp(source, images):
    a = extract_features(source, images, amp="bf16")
    b = extract_features(source, images, amp="none")
    assert a.tokens.dtype == torch.float32 and torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="amp"):
        extract_features(source, images, amp="fp8")


def test_dynamic_image_size(source):
    f = extract_features(source, torch.randn(1, 3, 48, 64), amp="none")
    assert f.grid == (6, 8) and f.keys.shape == (1, 48, 384)
    with pytest.raises(ValueError, match="patch size"):
        extract_features(source, torch.randn(1, 3, 30, 32), amp="none")
    with pytest.raises(ValueError, match="multiple"):
        build_backbone(NAME, "none", image_size=36)


def test_safetensors_roundtrip(tmp_path, source, images):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_backbone(NAME, str(path), image_size=SIZE, seed=0)
    assert _same_outputs(source, loaded, images)


def test_torch_file_with_dino_wrapping_and_prefixes(tmp_path, source, images):
    # DINO full checkpoints: {"teacher": {"module.backbone.<key>": ...}, "student": ..., "epoch": ...}
    wrapped = {"module.backbone." + k: v for k, v in source.state_dict().items()}
    wrapped["module.head.mlp.0.weight"] = torch.zeros(4, 4)  # DINO head: unexpected, ignored
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": wrapped, "student": {}, "epoch": 3}, path)
    loaded = build_backbone(NAME, str(path), image_size=SIZE, seed=0)
    assert _same_outputs(source, loaded, images)


def test_fsspec_uri_and_pos_embed_resampling(source, images):
    # A checkpoint saved at another resolution (224 px: 1 + 28x28 position tokens) through an fsspec
    # URI; the position embedding is resampled to our grid (s3:// goes through the same fsspec path).
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + 28 * 28, 384, generator=torch.Generator().manual_seed(3))
    uri = "memory://u2seg-test/vit.safetensors"
    with fsspec.open(uri, "wb") as fh:
        fh.write(save(state))
    loaded = build_backbone(NAME, uri, image_size=SIZE, seed=0)
    assert loaded.pos_embed.shape == source.pos_embed.shape
    assert torch.equal(loaded.pos_embed[0, 0], state["pos_embed"][0, 0])  # CLS position kept as is
    assert torch.equal(loaded.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)


def test_bad_weights_fail_clearly(tmp_path, source):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable torch checkpoint"):
        build_backbone(NAME, str(junk), image_size=SIZE)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(WeightsError, match="safetensors"):
        read_state_dict(str(bad_st))
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(str(tmp_path / "missing.pth"))
    # The checks below raise before anything is loaded, so `source` stays untouched.
    with pytest.raises(WeightsError, match="no key matches"):
        load_into(source, {"encoder_layer.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_into(source, {"blocks.0.attn.qkv.weight": torch.zeros(10, 10)})
    with pytest.raises(WeightsError, match="no tensor state dict"):
        load_into(source, {"epoch": 3})


def test_preprocess_resizes_and_normalises():
    mean_rgb = np.array([0.485, 0.456, 0.406]) * 255
    img = np.broadcast_to(np.round(mean_rgb).astype(np.uint8), (50, 70, 3)).copy()
    out = preprocess([img, np.zeros((10, 20, 3), np.uint8)], 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert float(out[0].abs().max()) < 0.01
    assert torch.allclose(out[1, 0], torch.full((32, 32), -0.485 / 0.229), atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess([np.zeros((10, 10), np.uint8)], 32)
    assert preprocess([], 32).shape == (0, 3, 32, 32)


def test_timm_pretrained_without_hub_is_a_clear_error(monkeypatch):
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("hub unreachable")
        raise AssertionError("only the pretrained path should be taken")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError, match="hub must be reachable"):
        build_backbone(NAME, "timm", image_size=SIZE)
