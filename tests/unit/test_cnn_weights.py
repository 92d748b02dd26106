"""CNN backbones load torchvision-layout checkpoints (DINO's dino_resnet50_pretrain.pth layout) from files."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from u2seg.model import ModelConfig, build_model
from u2seg.model.backbone import load_cnn_weights

pytestmark = pytest.mark.unit


def cfg(weights: str) -> ModelConfig:
    return ModelConfig(backbone="resnet18", weights=weights, num_thing_classes=2, num_stuff_classes=1,
                       pyramid_channels=16, representation_size=32, mask_head_layers=(16,), semantic_conv_dims=8)


@pytest.fixture(scope="module")
def dino_like() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 with random weights and non-trivial BN statistics, under DINO's key names."""
    torch.manual_seed(3)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.state_dict()


def assert_all_arrived(model, state: dict[str, torch.Tensor]) -> None:
    body = model.detector.backbone.body.state_dict()
    expected = {k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert expected == set(body)  # every backbone tensor has a source, nothing else is in the body
    for k in expected:
        assert torch.equal(body[k], state[k]), k


def test_pth_with_module_prefix_round_trips(tmp_path, dino_like):
    path = tmp_path / "dino_resnet18.pth"
    torch.save({f"module.{k}": v for k, v in dino_like.items()}, path)
    torch.set_num_threads(1)
    assert_all_arrived(build_model(cfg(str(path))), dino_like)


def test_safetensors_with_backbone_prefix_round_trips(tmp_path, dino_like):
    path = tmp_path / "dino.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in dino_like.items()}, str(path))
    assert_all_arrived(build_model(cfg(str(path))), dino_like)


def test_wrong_layouts_raise_clear_errors(dino_like):
    import timm

    body = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
    d2 = {k.replace("layer1.", "res2.").replace("conv1.", "stem.conv1.", 1): v for k, v in dino_like.items()}
    with pytest.raises(ValueError, match="Detectron2's ResNet layout"):
        load_cnn_weights(body, d2, name="d2.pkl")
    partial = {k: v for k, v in dino_like.items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match=r"lack \d+ of \d+ tensors, e.g. \['layer4"):
        load_cnn_weights(body, partial, name="partial.pth")
    bad = dict(dino_like)
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1\.weight"):
        load_cnn_weights(body, bad, name="bad.pth")


def test_missing_file_is_reported(tmp_path):
    from u2seg.features.weights import WeightsError

    with pytest.raises(WeightsError, match="not found"):
        build_model(cfg(str(tmp_path / "nope.pth")))


def test_random_init_resnet_keeps_its_residual_branches() -> None:
    """BN is frozen; timm's zero-initialised last BN scale of each block would then stay 0 for ever and a
    from-scratch ResNet would train only its stem and shortcuts."""
    model = build_model(cfg("none"))
    scales = {k: v for k, v in model.detector.backbone.body.state_dict().items()
              if k.startswith("layer") and k.endswith("bn2.weight")}
    assert len(scales) == 8 and all(float(v.abs().min()) > 0 for v in scales.values())
