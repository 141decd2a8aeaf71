"""Transformer backbones (wsss.models.vit) and the attention localizers (wsss.localize.attention)."""

import math

import pytest
import torch
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.errors import CheckpointError, ConfigError
from wsss.localize import build_localizer, multiscale_maps
from wsss.localize.attention import attention_rollout, capture_attention, class_token_map, rollout_step
from wsss.methods import build_method
from wsss.models import CAMClassifier, build_backbone
from wsss.models.vit import ViTFeatures

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])  # red, green, blue (RGB in [0, 1])


def vit_model(num_classes: int = 3, seed: int = 0) -> CAMClassifier:
    torch.manual_seed(seed)
    return build_method("cam").build_model(ModelConfig(backbone="vit_test", pretrained=False), num_classes)


def _all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------------- rollout


def test_rollout_of_identity_attention_is_identity_and_its_map_uniform():
    n, grid = 1 + 12, (3, 4)
    eye = torch.eye(n).expand(2, 4, n, n)  # (B, heads, N, N): every token attends only to itself
    r = attention_rollout([eye, eye, eye])
    assert torch.allclose(r, torch.eye(n).expand(2, n, n))
    m = class_token_map(r, 1, grid)
    assert m.shape == (2, 1, 3, 4) and torch.all(m == m.flatten()[0])


def test_rollout_of_uniform_attention_gives_a_uniform_map_of_ones():
    n = 1 + 6
    uniform = torch.full((1, n, n), 1.0 / n)
    r = attention_rollout([uniform] * 4)
    assert torch.allclose(r.sum(-1), torch.ones(1, n))  # rows stay distributions
    m = class_token_map(r, 1, (2, 3))
    assert torch.allclose(m, torch.ones(1, 1, 2, 3))  # mean-normalised: uniform attention -> 1


def test_rollout_multiplies_later_blocks_on_the_left():
    # block 1: every token attends to token 0; block 2: every token attends to token 1.
    # A1' = 0.5 A1 + 0.5 I = [[1, 0], [.5, .5]], A2' = [[.5, .5], [0, 1]]; R = A2' A1' = [[.75, .25], [.5, .5]]
    a1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    a2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert torch.allclose(attention_rollout([a1, a2]), torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]))
    # head averaging happens before the residual: two heads [[1,0],[1,0]] and [[0,1],[0,1]] average to 0.5 everywhere
    heads = torch.stack([a1[0], a2[0]])[None]
    assert torch.allclose(rollout_step(None, heads), torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))


# ----------------------------------------------------------------------------------------------------- the ViT body


def test_patch_token_map_is_the_token_grid_in_row_major_order():
    model = vit_model().eval()
    body: ViTFeatures = model.backbone
    x = torch.randn(2, 3, 40, 56)  # 5 x 7 patches of 8
    with torch.no_grad():
        fmap = body(x)
        tokens = body.vit.forward_features(x)  # vit_test's pretrained config is ImageNet's: no renormalisation
    assert fmap.shape == (2, 64, 5, 7)
    for i, j in [(0, 0), (0, 6), (4, 0), (3, 5)]:
        assert torch.allclose(fmap[:, :, i, j], tokens[:, 1 + i * 7 + j])


def test_cam_on_the_vit_at_sizes_that_are_not_patch_multiples():
    model = vit_model().eval()
    x = torch.randn(1, 3, 50, 70)  # 6.25 x 8.75 patches -> resized to a 6 x 9 grid
    with torch.no_grad():
        out = model(x)
    assert out["cams"].shape == (1, 3, 6, 9)
    assert torch.allclose(out["logits"], out["cams"].mean(dim=(2, 3)), atol=1e-6)
    idx = torch.tensor([[0, 2]])
    maps, logits = multiscale_maps(model, build_localizer("cam"), x, idx, scales=[0.5, 1.0, 1.5], flip=True)
    assert maps.shape == (1, 2, 50, 70) and torch.isfinite(maps).all()
    assert torch.allclose(maps.amax(dim=(2, 3)), torch.ones(1, 2))  # max-normalised
    assert torch.allclose(logits, out["logits"], atol=1e-5)


def test_augreg_vits_get_their_own_input_normalisation():
    body = build_backbone(ModelConfig(backbone="vit_tiny", pretrained=False)).body
    # an ImageNet-normalised pixel of raw value v must reach the model as (v - 0.5) / 0.5
    raw = torch.tensor([0.0, 0.5, 1.0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (raw.view(3, 1) - mean.view(1, 3)) / std.view(1, 3)  # (value, channel)
    converted = x.T.reshape(1, 3, 3, 1) * body.in_scale + body.in_shift
    assert torch.allclose(converted[0, :, :, 0], ((raw - 0.5) / 0.5).expand(3, 3), atol=1e-6)


def test_output_stride_32_is_refused_for_a_vit():
    with pytest.raises(ConfigError, match="output_stride=32.*patch size"):
        build_backbone(ModelConfig(backbone="vit_test", output_stride=32, pretrained=False))


# ----------------------------------------------------------------------------------------------------- weights


def test_weights_file_loads_a_saved_state_dict(tmp_path):
    src = vit_model(seed=1).backbone.vit
    path = tmp_path / "vit_test.pth"
    state = dict(src.state_dict())
    state["head.weight"] = torch.zeros(1000, 64)  # a classification checkpoint's head is dropped, not an error
    torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    body = build_backbone(ModelConfig(backbone="vit_test", pretrained=True, weights_file=str(path))).body
    for (name, a), b in zip(src.state_dict().items(), body.vit.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone(ModelConfig(backbone="vit_tiny", pretrained=False)).body.vit.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_backbone(ModelConfig(backbone="vit_test", pretrained=False, weights_file=str(path)))


def test_pretrained_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    # offline and an empty hub cache: the hub is not asked and the weights are nowhere
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as e:
        build_backbone(ModelConfig(backbone="deit_tiny", pretrained=True))
    msg = str(e.value)
    assert "deit_tiny" in msg and "model.weights_file" in msg and "model.pretrained=false" in msg
    with pytest.raises(ConfigError, match="without pretrained weights"):
        build_backbone(ModelConfig(backbone="vit_test", pretrained=True))


# ----------------------------------------------------------------------------------------------------- localizers


def test_attention_localizers_shapes_and_uniform_scale():
    model = vit_model().eval()
    x = torch.randn(2, 3, 48, 64)
    idx = torch.tensor([[0, 1], [2, 2]])
    cams = model(x)["cams"].detach()
    for name in ("attention", "rollout"):
        maps, logits = build_localizer(name)(model, x, idx)
        assert maps.shape == (2, 2, 6, 8) and logits.shape == (2, 3)
        # coupled maps are CAM times an attention of mean 1: their ratio to the CAM is positive with mean 1
        ratio = maps[1, 0] / cams[1, 2]
        assert ratio.min() > 0 and math.isclose(float(ratio.mean()), 1.0, rel_tol=1e-4)


def test_attention_hooks_removed_and_fused_flag_restored_even_on_error():
    model = vit_model().eval()
    attn = model.backbone.attention_modules()
    fused = [m.fused_attn for m in attn]
    hooks = _all_hooks(model)
    build_localizer("rollout")(model, torch.randn(1, 3, 32, 32), torch.tensor([[0]]))
    assert _all_hooks(model) == hooks and [m.fused_attn for m in attn] == fused
    with pytest.raises(RuntimeError), capture_attention(attn, lambda i, p: None):
        assert all(m.fused_attn is False for m in attn) and _all_hooks(model) == hooks + len(attn)
        model(torch.randn(1, 5, 32, 32))  # wrong channel count: the forward fails inside the context
    assert _all_hooks(model) == hooks and [m.fused_attn for m in attn] == fused


def test_captured_attention_is_the_softmax_of_the_unfused_computation():
    model = vit_model().eval()
    blk = model.backbone.vit.blocks[0]
    x = torch.randn(1, 3, 24, 32)
    seen = {}
    tokens = {}
    h = blk.register_forward_pre_hook(lambda m, inp: tokens.__setitem__("x", inp[0]))
    try:
        with torch.no_grad(), capture_attention([blk.attn], lambda i, p: seen.__setitem__(i, p)):
            model(x)
    finally:
        h.remove()
    a = blk.attn
    y = blk.norm1(tokens["x"])
    b, n, c = y.shape
    q, k, _ = a.qkv(y).reshape(b, n, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // a.num_heads), dim=-1)
    assert seen[0].shape == (1, 2, 1 + 12, 1 + 12) and torch.allclose(seen[0], ref, atol=1e-5)


def test_attention_on_a_cnn_names_the_localizers_that_apply():
    cnn = CAMClassifier(build_backbone(ModelConfig(backbone="mobilenet_v2", pretrained=False)), 3).eval()
    for name in ("attention", "rollout"):
        with pytest.raises(ConfigError) as e:
            build_localizer(name)(cnn, torch.randn(1, 3, 32, 32), torch.tensor([[0]]))
        assert "cam, grad_cam, grad_cam_pp" in str(e.value) and "vit_small" in str(e.value)
    with pytest.raises(ConfigError, match="target_layer"):
        build_localizer("attention", target_layer="vit.blocks.1")


def test_grad_cam_on_transformer_tokens_names_the_localizers_that_apply():
    model = vit_model().eval()
    hooks = _all_hooks(model)
    with pytest.raises(ConfigError) as e:
        build_localizer("grad_cam", target_layer="vit.blocks.1")(model, torch.randn(1, 3, 32, 32), torch.tensor([[0]]))
    msg = str(e.value)
    assert "(1, 17, 64)" in msg and "attention" in msg and "rollout" in msg and "cam" in msg
    assert _all_hooks(model) == hooks
    # at the backbone's patch-token map Grad-CAM works, and equals CAM (GAP + linear head)
    x, idx = torch.randn(1, 3, 32, 32), torch.tensor([[0, 1]])
    gc, _ = build_localizer("grad_cam")(model, x, idx)
    cam, _ = build_localizer("cam")(model, x, idx)
    assert torch.allclose(gc, torch.relu(cam), atol=1e-5)


# ----------------------------------------------------------------------------------------------------- trained ViT


def coloured_squares(n: int, gen: torch.Generator, size: int = 48, side: int = 16):
    """Noisy grey images with one coloured square (red / green / blue) each: ImageNet-normalised images, one-hot
    labels, and (n, H, W) masks of the squares."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    cls = torch.randint(0, 3, (n,), generator=gen)
    pos = torch.randint(0, size - side + 1, (n, 2), generator=gen)
    img = 0.5 + 0.08 * torch.randn(n, 3, size, size, generator=gen)
    yy, xx = torch.arange(size).view(1, size, 1), torch.arange(size).view(1, 1, size)
    inside = ((yy >= pos[:, 0, None, None]) & (yy < pos[:, 0, None, None] + side)
              & (xx >= pos[:, 1, None, None]) & (xx < pos[:, 1, None, None] + side))  # (n, H, W)
    img = torch.where(inside[:, None], COLOURS[cls][:, :, None, None].expand_as(img), img)
    return (img - mean) / std, F.one_hot(cls, 3).float(), inside


def test_attention_localizers_land_on_the_object_of_a_trained_vit():
    """A vit_test trained for 30 steps (CAM loss) on one coloured square per image. Its last block's class-token
    attention is not trained by the CAM loss (the class token's output is unused, as in TS-CAM, which relies on
    pretrained attention), and at this size it misses the squares of one colour: ``attention`` must land on the
    object for a clear majority (chance: 1/9 of the pixels), rollout (which follows the flow through both blocks)
    for nearly all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is ~20x faster than two contended ones
    try:
        gen = torch.Generator().manual_seed(0)
        model = vit_model(seed=0).train()
        method = build_method("cam")
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
        for _ in range(30):
            x, y, _ = coloured_squares(16, gen)
            loss, _ = method.loss(model(x), {"labels": y})
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        x, y, inside = coloured_squares(24, gen)
        idx = y.argmax(1, keepdim=True)
        with torch.no_grad():
            assert (model(x)["logits"].argmax(1) == idx[:, 0]).float().mean() >= 0.9  # it learned the task
        for name, least in (("attention", 0.5), ("rollout", 0.8)):
            maps, _ = multiscale_maps(model, build_localizer(name), x, idx, scales=[1.0], flip=False)
            assert maps.shape == (24, 1, 48, 48)
            peak = maps[:, 0].flatten(1).argmax(1)
            on_object = inside.flatten(1).gather(1, peak[:, None])[:, 0]
            assert on_object.float().mean() >= least, (name, on_object.tolist())
    finally:
        torch.set_num_threads(threads)


def test_maps_stage_with_rollout_on_a_vit(fast_cfg, toy_root):
    """The whole path a user takes: config -> classifier training on vit_test -> rollout maps of every image."""
    from wsss.localize import load_maps
    from wsss.stages.context import RunContext
    from wsss.stages.pipeline import run_stage

    ctx = RunContext(fast_cfg(**{"model.backbone": "vit_test", "model.output_stride": 16, "train.epochs": 1,
                                 "maps.localizer": "rollout", "maps.scales": "[0.5, 1.0]", "maps.splits": "[train]"}))
    run_stage(ctx, "cls")
    stage = run_stage(ctx, "maps")
    files = sorted((stage.dir / "train").glob("*.npz"))
    assert len(files) == 8
    m = load_maps(files[0])
    assert m["maps"].shape[1:] == (48, 64) and len(m["maps"]) == len(m["classes"]) >= 1
    assert abs(float(m["maps"].max()) - 1.0) < 1e-3  # max-normalised
