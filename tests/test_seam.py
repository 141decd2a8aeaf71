"""SEAM: equivariant regularisation, the pixel correlation module, equivariant cross regularisation, the siamese
model in training and eval mode, options, and the whole pipeline on the toy dataset."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from wsss.config.schema import ModelConfig
from wsss.errors import ConfigError
from wsss.localize import build_localizer, load_maps
from wsss.methods import build_method
from wsss.methods.seam import (
    SEAMClassifier,
    cross_equivariance_loss,
    equivariance_loss,
    hard_l1,
    keep_top_class,
    pcm_seeds,
    pixel_correlation,
    transform_maps,
    transformed_size,
)
from wsss.models.backbones import Backbone
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage


def toy_backbone() -> Backbone:
    """Five convolutions, strides 2, 4, 8, 16, 16: stages at stride 8 ('2') and 16 ('3') before the final ('4')."""
    torch.manual_seed(0)
    chans = [3, 8, 8, 12, 16, 24]
    body = nn.Sequential(*[nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 4 else 2, padding=1),
                                         nn.ReLU()) for i in range(5)])
    return Backbone(body=body, out_channels=24, stages=[str(i) for i in range(5)])


def toy_seam(**options):
    """The method with ``options`` (default here: 0.5x + mirror) and its model on the toy backbone, 3 classes."""
    method = build_method("seam", {"scale": 0.5, "flip": True, **options})
    o = method.options
    model = SEAMClassifier(toy_backbone(), 3, scale=o.scale, flip=o.flip, background=o.background, pcm=o.pcm,
                           pcm_stages=o.pcm_stages, freeze_bn=False)
    nn.init.normal_(model.head.weight, std=0.5)  # maps of a useful size for the tests
    return method, model.train()


LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------------------- equivariance (ER)


def test_er_is_zero_for_exactly_equivariant_maps_and_one_for_a_mirrored_ramp():
    # a 1 x 2 map [0, 1]; the transformed branch (same size, mirrored) should see [1, 0]
    maps = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    maps_t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    labels = torch.ones(1, 1)
    assert equivariance_loss(maps, maps_t, labels, (1, 2), flip=True).item() == pytest.approx(0.0, abs=1e-6)
    # without the mirror in A, both pixels disagree by (almost exactly) 1
    assert equivariance_loss(maps, maps_t, labels, (1, 2), flip=False).item() == pytest.approx(1.0, abs=1e-4)
    # an absent class never counts
    assert equivariance_loss(maps, maps_t, torch.zeros(1, 1), (1, 2), flip=False).item() == 0.0


def test_er_is_zero_when_the_transformed_maps_are_the_transformed_maps():
    torch.manual_seed(1)
    maps = torch.randn(2, 3, 8, 10)
    size = transformed_size((64, 80), 0.3)
    assert size == (19, 24)
    for flip in (False, True):
        maps_t = transform_maps(maps, size, flip)
        assert equivariance_loss(maps, maps_t, LABELS, size, flip).item() == pytest.approx(0.0, abs=1e-6)
        assert equivariance_loss(maps, maps_t, LABELS, size, not flip).item() > 0.05


def test_er_of_a_model_with_constant_maps_is_zero_and_positive_for_image_dependent_maps():
    method, model = toy_seam()
    x = torch.randn(2, 3, 64, 64)
    x[..., :, :20] += 3  # a bright left border: mirrored, the maps no longer agree
    batch = {"image": x, "labels": LABELS}

    model.cam = lambda feats: torch.full((feats.shape[0], 3, *feats.shape[-2:]), 0.7)
    _, parts = method.loss(model(x), batch)
    assert parts["er"] == 0.0

    model.cam = lambda feats: feats[:, :3]  # maps follow the image content
    _, parts = method.loss(model(x), batch)
    assert parts["er"] > 0.01


# ------------------------------------------------------------------------------------------- PCM


def test_pcm_preserves_a_map_constant_on_each_region_of_orthogonal_features():
    h, w = 4, 6
    emb = torch.zeros(1, 2, h, w)
    emb[0, 0, :, :3] = 1.0  # left region: e1
    emb[0, 1, :, 3:] = 2.0  # right region: 2 e2 (length does not matter, only the direction)
    maps = torch.zeros(1, 2, h, w)
    maps[0, 0, :, :3], maps[0, 0, :, 3:] = 0.8, 0.1
    maps[0, 1, :, :3], maps[0, 1, :, 3:] = 0.0, 1.0
    torch.testing.assert_close(pixel_correlation(maps, emb), maps)
    # the same map with one pixel disturbed is smoothed back towards its region's value
    noisy = maps.clone()
    noisy[0, 0, 0, 0] = 0.2
    out = pixel_correlation(noisy, emb)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.8 - 0.6 / 12, abs=1e-6)  # mean of its 12-pixel region
    assert out[0, 0, :, 3:].eq(0.1).all()  # the other region does not see it


def test_pcm_hand_computed_on_three_pixels_at_0_60_120_degrees():
    # cosines [[1, .5, -.5], [.5, 1, .5], [-.5, .5, 1]] -> ReLU -> column sums 1.5, 2, 1.5; a map [1, 0, 0] becomes
    # each pixel's weighted average over the source pixels: [1 / 1.5, .5 / 2, 0 / 1.5]
    angles = torch.tensor([0.0, math.pi / 3, 2 * math.pi / 3])
    emb = torch.stack([angles.cos(), angles.sin()]).view(1, 2, 1, 3)
    maps = torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 1, 3)
    torch.testing.assert_close(pixel_correlation(maps, emb), torch.tensor([2 / 3, 1 / 4, 0.0]).view(1, 1, 1, 3))
    # opposite directions (cos < 0) get no weight
    emb = torch.tensor([[1.0, -1.0]]).view(1, 1, 1, 2)
    maps = maps[..., :2]
    torch.testing.assert_close(pixel_correlation(maps, emb), maps)


def test_pcm_seeds_keep_each_pixels_top_class_and_add_background():
    cams = torch.tensor([[[[2.0, -1.0]], [[1.0, 4.0]]]])  # (1, 2 classes, 1, 2)
    # max-normalised: class 0 [1, 0], class 1 [.25, 1]; top class per pixel: 0 then 1
    seeds = pcm_seeds(cams, background=True)
    torch.testing.assert_close(seeds, torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]]))
    torch.testing.assert_close(pcm_seeds(cams, background=False), seeds[:, 1:])
    # keep_top_class leaves the background channel alone
    m = torch.tensor([[[[0.3]], [[0.5]], [[0.7]]]])
    torch.testing.assert_close(keep_top_class(m, True), torch.tensor([[[[0.3]], [[0.0]], [[0.7]]]]))


# ------------------------------------------------------------------------------------------- ECR


def test_hard_l1_averages_the_largest_share_per_image():
    pred = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.0, 0.0, 0.0, 0.4]])
    target = torch.zeros_like(pred)
    assert hard_l1(pred, target, 0.5).item() == pytest.approx(((0.9 + 0.5) + (0.4 + 0.0)) / 4)
    assert hard_l1(pred, target, 1.0).item() == pytest.approx(pred.mean().item())


@pytest.mark.parametrize("background", [True, False])
def test_ecr_is_zero_when_each_pcm_equals_the_other_branchs_transformed_cam(background):
    size = (4, 4)
    cams = torch.zeros(2, 3, 4, 4)  # one present class per pixel, values 0 / 1: normalising changes nothing
    cams[0, 0, :, :2], cams[0, 2, :, 2:] = 1.0, 1.0
    cams[1, 1, :2], cams[1, 1, 2:, :1] = 1.0, 1.0
    cams_t = transform_maps(cams, size, True)

    def as_pcm(m):
        return torch.cat([1 - m.amax(1, keepdim=True), m], 1) if background else m

    pcm, pcm_t = as_pcm(cams), as_pcm(cams_t)
    loss = cross_equivariance_loss(cams, cams_t, pcm, pcm_t, LABELS, size, True, background, topk=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    wrong = cross_equivariance_loss(cams, cams_t, pcm_t, pcm, LABELS, size, True, background, topk=1.0)
    assert wrong.item() > 0.1


def test_ecr_trains_only_the_pcm_projections():
    _, model = toy_seam()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    size = transformed_size(x.shape[-2:], 0.5)
    ecr = cross_equivariance_loss(out["raw_cams"], out["raw_cams_t"], out["pcm"], out["pcm_t"], LABELS, size, True,
                                  True, 0.2)
    ecr.backward()
    assert model.head.weight.grad is None and all(p.grad is None for p in model.backbone.parameters())
    assert model.embed.weight.grad.abs().sum() > 0 and all(c.weight.grad.abs().sum() > 0 for c in model.side_proj)


# ------------------------------------------------------------------------------------------- loss weights


def _cls(out):
    return (F.multilabel_soft_margin_loss(out["logits"], LABELS) + F.multilabel_soft_margin_loss(out["logits_t"], LABELS)) / 2


def test_losses_switch_off_with_zero_weights():
    x = torch.randn(2, 3, 64, 64)
    batch = {"image": x, "labels": LABELS}

    method, model = toy_seam(pcm=False, er_weight=0.0, ecr_weight=0.0)
    out = model(x)
    assert "pcm" not in out and torch.equal(out["cams"], out["raw_cams"])
    loss, parts = method.loss(out, batch)
    assert set(parts) == {"cls"} and loss.item() == pytest.approx(_cls(out).item(), rel=1e-6)

    full, model = toy_seam(min_pool_weight=1.0)
    out = model(x)
    loss, parts = full.loss(out, batch)
    assert set(parts) == {"cls", "er", "ecr", "min_pool"} and parts["er"] > 0 and parts["ecr"] > 0
    assert loss.item() == pytest.approx(sum(parts.values()), rel=1e-5)

    no_er = build_method("seam", {"scale": 0.5, "flip": True, "er_weight": 0.0, "ecr_weight": 2.0})
    loss, parts = no_er.loss(out, batch)
    assert set(parts) == {"cls", "ecr"}
    assert loss.item() == pytest.approx(_cls(out).item() + 2 * parts["ecr"], rel=1e-5)


def test_options_are_validated_with_clear_errors():
    with pytest.raises(ConfigError, match="hide_prob.*scale, flip, er_weight"):
        build_method("seam", {"hide_prob": 0.5})
    with pytest.raises(ConfigError, match="min_pool_weight.*background"):
        build_method("seam", {"background": False, "min_pool_weight": 1.0})
    with pytest.raises(ConfigError, match="pcm=false.*ecr_weight"):
        build_method("seam", {"pcm": False})
    with pytest.raises(ConfigError, match="never train"):
        build_method("seam", {"ecr_weight": 0.0})
    with pytest.raises(ConfigError, match="scale"):
        build_method("seam", {"scale": 0.0})
    with pytest.raises(ConfigError, match="copy of the image"):
        build_method("seam", {"scale": 1.0})
    with pytest.raises(ConfigError, match="ecr_topk"):
        build_method("seam", {"ecr_topk": 1.5})
    with pytest.raises(ConfigError, match="pcm_stages.*layer9"):
        toy_seam(pcm_stages=("2", "layer9"))


# ------------------------------------------------------------------------------------------- model


def test_two_training_steps_are_finite_and_train_the_pcm():
    method, model = toy_seam(scale=0.3, flip=False, min_pool_weight=1.0)
    opt = torch.optim.SGD(model.param_groups(0.01, 10), lr=0.01, momentum=0.9)
    before = model.embed.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(2, 3, 80, 96, generator=gen)
        loss, parts = method.loss(model(x), {"image": x, "labels": LABELS})
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in parts.values())
    assert not torch.equal(before, model.embed.weight)
    # the PCM layers are new layers: they train at the head's learning rate
    head_group = {id(p) for p in model.param_groups(0.01, 10)[1]["params"]}
    assert id(model.embed.weight) in head_group and all(id(c.weight) in head_group for c in model.side_proj)


def test_eval_cams_come_from_the_pcm():
    _, model = toy_seam()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.cam(model.features(x))
        out = model(x)
    assert out["cams"].shape == raw.shape  # foreground classes only, even with background=True
    torch.testing.assert_close(out["logits"], raw.mean(dim=(2, 3)))
    # one embedding vector everywhere: every pixel gets the spatial mean of the seeds, whatever the raw CAM
    model.embedding = lambda x, side, batch, size: torch.ones(batch, 4, *size)
    with torch.no_grad():
        flat = model(x)["cams"]
    torch.testing.assert_close(flat, pcm_seeds(raw, False).mean(dim=(2, 3), keepdim=True).expand_as(raw))
    assert raw.flatten(2).std(dim=2).min() > 0  # the raw maps were not flat
    # without the PCM the maps are the raw CAM
    _, plain = toy_seam(pcm=False, ecr_weight=0.0)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x)["cams"], plain.cam(plain.features(x)))


def test_grad_cam_runs_on_the_seam_model():
    _, model = toy_seam()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    idx = torch.tensor([[0, 2], [1, 1]])
    cam_maps, logits = build_localizer("cam")(model, x, idx)
    for target in ("", "1", "3"):  # backbone output, and layers before / after a PCM stage (replicated batch)
        maps, glogits = build_localizer("grad_cam", target)(model, x, idx)
        assert maps.shape[:2] == (2, 2) and torch.isfinite(maps).all()
        torch.testing.assert_close(glogits, logits)
    assert cam_maps.shape == (2, 2, 4, 4)


@pytest.mark.parametrize("backbone,os_,expected", [
    ("mobilenet_v2", 16, ["6", "17"]), ("mobilenet_v2", 32, ["6", "13"]), ("resnet18", 16, ["layer2", "layer3"]),
])
def test_default_pcm_stages(backbone, os_, expected):
    cfg = ModelConfig(backbone=backbone, output_stride=os_, pretrained=False)
    model = build_method("seam").build_model(cfg, 4)
    assert model.side_stages == expected


def test_backbone_without_a_stride_16_stage_asks_for_pcm_stages():
    b = toy_backbone()
    b.body[2][0].stride = (1, 1)  # strides 2, 4, 4, 8, 8: nothing at 16
    with pytest.raises(ConfigError, match="stride 16.*pcm_stages"):
        SEAMClassifier(b, 3, scale=0.3, flip=False, background=True)
    model = SEAMClassifier(b, 3, scale=0.3, flip=False, background=True, pcm_stages=("1", "3"))
    assert model.side_stages == ["1", "3"]


# ------------------------------------------------------------------------------------------- pipeline


def test_background_follows_the_runs_dataset_unless_set(fast_cfg):
    from wsss.data.spec import DatasetSpec
    from wsss.engine.train import ClassifierTask

    assert build_method("seam").options.background is True  # no dataset known: the paper's VOC setting
    assert build_method("seam", has_background=False).options.background is False
    assert build_method("seam", {"background": True}, has_background=False).options.background is True
    with pytest.raises(ConfigError, match="min_pool_weight.*no background class"):
        build_method("seam", {"min_pool_weight": 1.0}, has_background=False)
    assert build_method("seam", {"min_pool_weight": 1.0}, has_background=True).options.background is True
    # a run builds its method with its dataset's answer (MSRC-21-like: every pixel a class; VOC-like: background 0)
    cfg = fast_cfg(**{"method.name": "seam"})
    stuff = DatasetSpec("stuff", ("grass", "cow", "sky"), None)
    voc = DatasetSpec("objects", ("background", "cow", "sheep"), 0)
    assert ClassifierTask(cfg, [], stuff).method.options.background is False
    assert ClassifierTask(cfg, [], voc).method.options.background is True


def test_seam_trains_and_extracts_maps_through_the_stages(fast_cfg):
    ctx = RunContext(fast_cfg(**{"train.epochs": 1, "method.name": "seam", "method.options.background": False,
                                 "method.options.flip": True}))
    stage = run_stage(ctx, "maps")
    log = [json.loads(line) for line in (ctx.run_dir / "cls" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"cls", "er", "ecr"} <= set(log[0]) and math.isfinite(log[0]["loss"])
    files = sorted((stage.dir / "train").glob("*.npz"))
    assert len(files) == 8
    m = load_maps(files[0])
    assert m["maps"].shape[1:] == (48, 64) and np.isfinite(m["maps"]).all() and m["maps"].max() <= 1.0 + 1e-3


def test_transform_images_accepts_bfloat16_inputs():
    from wsss.methods.seam import transform_images

    x = torch.rand(2, 3, 40, 30)
    out = transform_images(x.to(torch.bfloat16), (12, 9), flip=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 12, 9)
    torch.testing.assert_close(out.float(), transform_images(x, (12, 9), flip=True), atol=0.02, rtol=0.02)
