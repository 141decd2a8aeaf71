import numpy as np
import pytest
import torch
from torch import nn

from wsss.config.schema import ModelConfig
from wsss.errors import ConfigError
from wsss.localize import build_localizer, multiscale_maps, normalize_maps
from wsss.models import CAMClassifier, build_backbone
from wsss.models.backbones import Backbone


def colour_model() -> CAMClassifier:
    """Backbone channel 0 responds to red, channel 1 to green; head: class 0 <- red, class 1 <- green."""
    body = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        body.weight.zero_()
        body.weight[0, 0] = 1.0  # red
        body.weight[1, 1] = 1.0  # green
    model = CAMClassifier(Backbone(body=nn.Sequential(body, nn.ReLU()), out_channels=2, stages=["0"]), 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    return model.eval()


def constructed_image() -> torch.Tensor:
    """64x96 (non-square) image: red square top-left, green square bottom-right."""
    x = torch.zeros(1, 3, 64, 96)
    x[0, 0, 4:24, 8:32] = 1.0
    x[0, 1, 40:60, 60:90] = 1.0
    return x


@pytest.mark.parametrize("name", ["cam", "grad_cam", "grad_cam_pp"])
def test_maps_land_on_the_object(name):
    model = colour_model()
    x = constructed_image()
    idx = torch.tensor([[0, 1]])
    maps, logits = multiscale_maps(model, build_localizer(name), x, idx, scales=[1.0, 0.5], flip=True)
    assert maps.shape == (1, 2, 64, 96)
    red, green = maps[0, 0], maps[0, 1]
    assert red[4:24, 8:32].mean() > 0.8 and red[40:, 48:].max() < 0.05
    assert green[40:60, 60:90].mean() > 0.8 and green[:32, :48].max() < 0.05
    y, xx = divmod(int(red.argmax()), 96)
    assert 4 <= y < 24 and 8 <= xx < 32
    assert torch.allclose(maps.amax(dim=(2, 3)), torch.ones(1, 2), atol=1e-3)  # max-normalised
    assert logits.shape == (1, 2)


def small_net() -> CAMClassifier:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", output_stride=16, pretrained=False)
    return CAMClassifier(build_backbone(cfg), 5).eval()


def per_class_reference(model, x, layer, b, k, plus_plus=False):
    """Textbook Grad-CAM: one forward and one backward for a single (image, class)."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(x[b : b + 1])
        a = store["a"]
        (g,) = torch.autograd.grad(out["logits"][0, k], a)
    finally:
        h.remove()
    a, g = a.detach()[0], g[0]
    if plus_plus:
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum((1, 2), keepdim=True) * g3 + 1e-7)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (alpha * torch.relu(g)).sum((1, 2))
    else:
        w = g.mean((1, 2))
    return torch.relu((w[:, None, None] * a).sum(0)) * a.shape[-2] * a.shape[-1]


@pytest.mark.parametrize("name,pp", [("grad_cam", False), ("grad_cam_pp", True)])
def test_batched_grad_cam_equals_per_class(name, pp):
    model = small_net()
    x = torch.randn(2, 3, 64, 80)
    idx = torch.tensor([[1, 3], [4, 0]])
    loc = build_localizer(name, target_layer="13")
    maps, _ = loc(model, x, idx)
    layer = model.backbone.get_submodule("13")
    for b in range(2):
        for p in range(2):
            ref = per_class_reference(model, x, layer, b, int(idx[b, p]), pp)
            torch.testing.assert_close(maps[b, p], ref, rtol=1e-4, atol=1e-6)


def test_grad_cam_at_head_input_equals_cam():
    model = small_net()
    x = torch.randn(2, 3, 64, 64)
    idx = torch.tensor([[0, 2], [1, 4]])
    cam, _ = build_localizer("cam")(model, x, idx)
    gc, _ = build_localizer("grad_cam")(model, x, idx)
    torch.testing.assert_close(torch.relu(cam), gc, rtol=1e-3, atol=1e-4)  # at any input size, so views add up alike


def test_hooks_are_removed_even_on_error():
    model = small_net()
    layer = model.backbone.get_submodule("13")
    loc = build_localizer("grad_cam", target_layer="13")
    loc(model, torch.randn(1, 3, 32, 32), torch.tensor([[0]]))
    assert not layer._forward_hooks
    with pytest.raises(RuntimeError):
        loc(model, torch.randn(1, 4, 32, 32), torch.tensor([[0]]))  # wrong channel count fails inside the pass
    assert not layer._forward_hooks and not model.backbone._forward_hooks


def test_unknown_target_layer_names_valid_ones():
    with pytest.raises(ConfigError, match="target_layer"):
        build_localizer("grad_cam", target_layer="layer9")(small_net(), torch.randn(1, 3, 32, 32), torch.tensor([[0]]))


def test_unknown_localizer_lists_registered():
    with pytest.raises(ConfigError, match="grad_cam_pp"):
        build_localizer("gradcam")


def test_normalisation_modes():
    m = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    torch.testing.assert_close(normalize_maps(m, "max", eps=0), m / 5)
    torch.testing.assert_close(normalize_maps(m, "minmax", eps=0), (m - 1) / 4)
    assert normalize_maps(m, "none") is m


def test_flip_aggregation_is_explicit():
    model = colour_model()
    x = constructed_image()
    idx = torch.tensor([[0, 1]])
    loc = build_localizer("cam")
    s, _ = multiscale_maps(model, loc, x, idx, scales=[1.0, 0.5], flip=True, aggregate="sum", normalize="none")
    m, _ = multiscale_maps(model, loc, x, idx, scales=[1.0, 0.5], flip=True, aggregate="mean", normalize="none")
    mx, _ = multiscale_maps(model, loc, x, idx, scales=[1.0, 0.5], flip=True, aggregate="max", normalize="none")
    torch.testing.assert_close(s / 4, m)
    assert (mx <= s + 1e-6).all() and (mx > m - 1e-6).all()


def test_map_files_are_compact_and_read_back_within_half_a_level(tmp_path):
    from wsss.localize import load_maps, save_maps

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:60] / 60.0
    maps = np.stack([np.clip(np.sin(3 * xx + yy), 0, 1), rng.uniform(0, 1, (40, 60))]).astype(np.float32)
    maps[0, 0, 0], maps[1, 0, 0] = 1.0, 0.0
    classes, scores = np.array([2, 5]), np.array([0.1, 0.9], np.float32)
    save_maps(tmp_path / "a.npz", maps, classes, scores)
    back = load_maps(tmp_path / "a.npz")
    assert back["maps"].dtype == np.float32 and np.abs(back["maps"] - maps).max() <= 0.5 / 255 + 1e-7
    assert back["maps"][0, 0, 0] == 1.0 and back["maps"][1, 0, 0] == 0.0
    assert back["classes"].tolist() == [2, 5] and np.array_equal(back["scores"], scores)
    with np.load(tmp_path / "a.npz") as z:
        assert z.files.count("maps_u8_delta") == 1 and "maps" not in z.files
    # smooth maps (CAM-like blobs) compress to a fraction of float16
    yy, xx = np.mgrid[0:120, 0:160].astype(np.float32)
    smooth = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 30.0 ** 2))
                       for cx, cy in ((40, 30), (120, 90), (80, 60), (10, 110))])
    save_maps(tmp_path / "s.npz", smooth, np.arange(4), scores)
    np.savez_compressed(tmp_path / "f16.npz", maps=smooth.astype(np.float16))
    assert (tmp_path / "s.npz").stat().st_size < (tmp_path / "f16.npz").stat().st_size / 4
    # unnormalised maps (maps.normalize: none) and files of the earlier format: float16
    raw = maps * 7 - 1
    save_maps(tmp_path / "r.npz", raw, classes, scores)
    np.testing.assert_allclose(load_maps(tmp_path / "r.npz")["maps"], raw, atol=1e-2)
    np.savez_compressed(tmp_path / "old.npz", maps=maps.astype(np.float16), classes=classes.astype(np.int16),
                        scores=scores)
    np.testing.assert_allclose(load_maps(tmp_path / "old.npz")["maps"], maps, atol=1e-3)
