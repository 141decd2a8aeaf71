"""The "larger maps" methods: Hide-and-Seek, ACoL, MDC, Mixup (+ Mixup-CAM regularisers) and CutMix.

Each mechanism is checked on constructed inputs against values computed here by hand, then every method trains a
step on a toy batch and end to end through the CLI, with maps from both CAM and Grad-CAM."""

import math

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F

from wsss.cli import main
from wsss.config.schema import ModelConfig
from wsss.errors import ConfigError
from wsss.localize import load_maps
from wsss.methods import build_method
from wsss.methods.acol import erase, erase_mask, selected_classes
from wsss.methods.hide_and_seek import draw_hidden_cells, hide_and_seek
from wsss.methods.mix import concentration, cutmix, mixup, pixel_entropy

from conftest import fast_overrides

LARGER = ["hide_and_seek", "acol", "mdc", "mixup", "cutmix"]
TINY_MODEL = ModelConfig(backbone="mobilenet_v2", output_stride=32, pretrained=False)


# ---------------------------------------------------------------- Hide-and-Seek

def test_hide_and_seek_hides_whole_cells_rows_by_height_on_non_square_image():
    h, w, s = 40, 70, 16
    image = torch.rand(1, 3, h, w) + 1.0  # no pixel is 0, the hidden value
    cells = draw_hidden_cells(h, w, s, 0.5, torch.Generator().manual_seed(3))
    assert cells.shape == (3, 5)  # ceil(40/16) rows, ceil(70/16) columns
    assert cells.any() and not cells.all()  # the seed gives a mixed grid, so the check below can fail both ways

    # same generator state: one patch-size draw (a single choice), then the image's grid
    g = torch.Generator().manual_seed(3)
    torch.randint(1, (1,), generator=g)
    expected = draw_hidden_cells(h, w, s, 0.5, g)
    out, masks = hide_and_seek(image, (s,), 0.5, torch.Generator().manual_seed(3))

    seen = torch.zeros(h, w, dtype=torch.int64)
    for r in range(3):
        for c in range(5):
            ys = slice(r * s, min(h, (r + 1) * s))
            xs = slice(c * s, min(w, (c + 1) * s))
            seen[ys, xs] += 1
            region, orig = out[0, :, ys, xs], image[0, :, ys, xs]
            if expected[r, c]:
                assert torch.all(region == 0), (r, c)
            else:
                assert torch.equal(region, orig), (r, c)
            assert bool(masks[0, ys, xs].all()) == bool(expected[r, c])
            assert bool(masks[0, ys, xs].any()) == bool(expected[r, c])
    assert torch.all(seen == 1)  # the cells tile the image: last row 8 px high, last column 6 px wide


def test_grid_size_zero_hides_nothing_and_prob_one_hides_everything():
    image = torch.rand(2, 3, 40, 70) + 1.0
    out, masks = hide_and_seek(image, (0,), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and not masks.any()
    assert draw_hidden_cells(40, 70, 0, 1.0, torch.Generator()).numel() == 0
    out, masks = hide_and_seek(image, (16,), 1.0, torch.Generator().manual_seed(0))
    assert masks.all() and torch.all(out == 0)


def test_hide_and_seek_draws_one_cell_size_per_image():
    h, w = 40, 70
    images = torch.rand(8, 3, h, w) + 1.0
    _, masks = hide_and_seek(images, (0, 16, 30), 0.5, torch.Generator().manual_seed(1))

    def cell_constant(m, s):
        cells = m[::s, ::s]  # value at each cell's top-left pixel
        return torch.equal(cells.repeat_interleave(s, 0).repeat_interleave(s, 1)[:h, :w], m)

    for m in masks:
        assert any(cell_constant(m, s) for s in (16, 30)) or not m.any()


def test_hide_and_seek_method_uses_only_the_generator():
    method = build_method("hide_and_seek")
    batch = {"image": torch.rand(4, 3, 40, 70) + 1.0, "labels": torch.ones(4, 3), "index": torch.arange(4)}
    a = method.transform_batch(batch, torch.Generator().manual_seed(5))
    b = method.transform_batch(batch, torch.Generator().manual_seed(5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], batch["labels"])
    assert not torch.equal(a["image"], batch["image"])  # something hidden (seeded)
    assert torch.all(batch["image"] > 0)  # the input batch is not modified in place


# ---------------------------------------------------------------- ACoL

def _inject_features(model, shape):
    """Make the backbone output fixed random non-negative features (an untrained MobileNetV2 outputs ~1e-9, which
    would make every comparison below pass trivially)."""
    feats = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    model.backbone.register_forward_hook(lambda m, i, o: feats)
    return feats


def test_acol_erases_exactly_where_normalised_map_exceeds_threshold():
    maps = torch.tensor([[[[0.0, 1.0, 2.0], [4.0, -3.0, 3.0]],     # /4 after ReLU: 0 .25 .5 / 1 0 .75
                          [[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])    # only (0, 0) is high
    feats = torch.rand(1, 4, 2, 3) + 1.0
    sel = selected_classes(torch.tensor([[2.0, -3.0]]), 0.5)
    assert sel.tolist() == [[True, False]]
    mask = erase_mask(maps, sel, 0.6)
    assert mask[0, 0].tolist() == [[False, False, False], [True, False, True]]
    out = erase(feats, mask)
    assert torch.all(out[..., 1, 0] == 0) and torch.all(out[..., 1, 2] == 0)
    keep = ~mask[0, 0]
    assert torch.equal(out[0][:, keep], feats[0][:, keep])

    # no class above 0.5: the top-1 class (1) is erased all the same
    sel = selected_classes(torch.tensor([[-2.0, -1.0]]), 0.5)
    assert sel.tolist() == [[False, True]]
    assert erase_mask(maps, sel, 0.6)[0, 0].tolist() == [[True, False, False], [False, False, False]]
    # an all-negative map erases nothing
    assert not erase_mask(-maps.abs() - 1, torch.ones(1, 2, dtype=torch.bool), 0.6).any()


@pytest.mark.parametrize("branch_channels", [0, 16])
def test_acol_second_branch_sees_the_erased_features(branch_channels):
    torch.manual_seed(0)
    model = build_method("acol", {"branch_channels": branch_channels}).build_model(TINY_MODEL, 3).eval()
    feats = _inject_features(model, (2, 1280, 5, 6))
    seen = {}
    model.branch_b.register_forward_pre_hook(lambda m, i: seen.__setitem__("b_in", i[0].detach()))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 192))
        cams_a = model.branch_a(feats)
    logits_a = cams_a.mean(dim=(2, 3))
    pos = torch.relu(cams_a)
    norm = pos / pos.amax(dim=(2, 3), keepdim=True)
    chosen = (torch.sigmoid(logits_a) > 0.5) | (logits_a == logits_a.amax(dim=1, keepdim=True))
    high = ((norm > 0.6) & chosen[:, :, None, None]).any(dim=1)  # (2, 5, 6)
    assert high.any() and not high.all()
    b_in = seen["b_in"]
    assert torch.all(b_in.permute(1, 0, 2, 3)[:, high] == 0)
    assert torch.equal(b_in.permute(1, 0, 2, 3)[:, ~high], feats.permute(1, 0, 2, 3)[:, ~high])
    # fused map = max of the branches; logits = mean of the branch logits
    cams_b = model.branch_b(b_in)
    torch.testing.assert_close(out["cams"], torch.maximum(cams_a, cams_b))
    torch.testing.assert_close(out["logits"], (logits_a + cams_b.mean(dim=(2, 3))) / 2)


# ---------------------------------------------------------------- MDC

def test_mdc_heads_have_the_dilations_and_final_map_is_d1_plus_mean_of_dilated():
    torch.manual_seed(0)
    method = build_method("mdc", {"dilations": [1, 2, 5]})
    model = method.build_model(TINY_MODEL, 3).eval()
    assert [h.dilation for h in model.heads] == [(1, 1), (2, 2), (5, 5)]
    assert [h.padding for h in model.heads] == [(1, 1), (2, 2), (5, 5)]
    f = _inject_features(model, (2, 1280, 5, 6))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 192))
    m1, m2, m5 = (F.conv2d(f, h.weight, padding=d, dilation=d) for h, d in zip(model.heads, (1, 2, 5)))
    final = m1 + (m2 + m5) / 2
    assert out["cams"].shape == (2, 3, 5, 6)
    torch.testing.assert_close(out["cams"], final)
    torch.testing.assert_close(out["logits"], final.mean(dim=(2, 3)))
    # the loss is the mean of every head's own pooled soft-margin loss
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, parts = method.loss(out, {"labels": labels})
    manual = sum(F.multilabel_soft_margin_loss(m.mean(dim=(2, 3)), labels) for m in (m1, m2, m5)) / 3
    torch.testing.assert_close(loss, manual)
    assert set(parts) == {"cls_d1", "cls_d2", "cls_d5"}


def test_mdc_rejects_dilations_without_one():
    with pytest.raises(ConfigError, match="include 1"):
        build_method("mdc", {"dilations": [3, 6]})


# ---------------------------------------------------------------- Mixup / CutMix

def _constant_images(values, h, w):
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, h, w).clone()


def test_cutmix_labels_are_the_pixel_shares_of_the_sources():
    h, w = 37, 53
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    images, labels = _constant_images(values, h, w), torch.eye(6)
    partial = 0
    for seed in range(5):
        out, mixed, pasted, perm = cutmix(images, labels, 1.0, torch.Generator().manual_seed(seed))
        for i in range(6):
            shares = torch.tensor([(out[i, 0] == v).float().mean().item() for v in values])
            assert math.isclose(float(shares.sum()), 1.0, abs_tol=1e-6)  # every pixel comes from some source
            torch.testing.assert_close(mixed[i], shares, atol=1e-6, rtol=0)
            partial += int(0 < shares.max() < 1)
    assert partial > 5  # most images really are mixtures, so the check above means something


def test_cutmix_box_is_clipped_to_the_image():
    lam = torch.full((64,), 0.2)  # boxes of ~0.9 of each side: most must overhang the border and be clipped
    from wsss.methods.mix import cutmix_boxes

    boxes = cutmix_boxes(20, 30, lam, torch.Generator().manual_seed(0))
    frac = boxes.flatten(1).float().mean(1)
    assert boxes.shape == (64, 20, 30)
    assert (frac < 0.8 - 0.05).any()  # clipped boxes cover less than 1 - lam
    assert (frac <= 0.8 + 1e-6).all()


def test_mixup_labels_are_the_convex_combination_of_the_mixed_images():
    values = [1.0, 10.0, 100.0, 1000.0]
    images, labels = _constant_images(values, 8, 12), torch.eye(4)
    out, mixed, lam, perm = mixup(images, labels, 1.0, torch.Generator().manual_seed(0))
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and ((lam > 0) & (lam < 1)).all()
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(4))
    assert (mixed >= 0).all() and ((mixed > 0).sum(dim=1) <= 2).all()
    # each mixed image is the label-weighted combination of the source images
    torch.testing.assert_close(out[:, 0, 0, 0], mixed @ torch.tensor(values))
    assert torch.all(out == out[:, :1, :1, :1])


def test_mix_methods_prob_zero_leave_the_batch_alone():
    batch = {"image": torch.rand(4, 3, 8, 8), "labels": torch.eye(4), "index": torch.arange(4)}
    for name in ("mixup", "cutmix"):
        out = build_method(name, {"prob": 0.0}).transform_batch(batch, torch.Generator().manual_seed(0))
        assert torch.equal(out["image"], batch["image"]) and torch.equal(out["labels"], batch["labels"])


def test_mixup_cam_regularisers_on_constructed_maps():
    # entropy: equal scores over K classes -> log K; one class far ahead -> ~0
    assert math.isclose(float(pixel_entropy(torch.zeros(1, 5, 3, 4))), math.log(5), rel_tol=1e-6)
    peaked = torch.zeros(1, 5, 3, 4)
    peaked[:, 2] = 50.0
    assert float(pixel_entropy(peaked)) < 1e-6
    # concentration: a single-pixel map has ~0 variance; a map on two opposite corners of a 2x2 grid has variance
    # (0.25^2 + 0.25^2) = 0.125 (pixel centres 0.25 and 0.75 in both axes); absent classes do not count
    point = torch.zeros(1, 2, 2, 2)
    point[0, 0, 0, 0] = 1e6
    corners = torch.zeros(1, 2, 2, 2)
    corners[0, 0, 0, 0] = corners[0, 0, 1, 1] = 1e6
    present = torch.tensor([[True, False]])
    assert float(concentration(point, present)) < 1e-6
    assert math.isclose(float(concentration(corners, present)), 0.125, rel_tol=1e-4)
    assert float(concentration(corners, torch.zeros(1, 2, dtype=torch.bool))) == 0.0


# ---------------------------------------------------------------- every method: options, steps, CLI

@pytest.mark.parametrize("name", LARGER)
def test_wrong_option_name_lists_the_methods_options(name):
    method = build_method(name)
    own = [f for f in vars(method.options)]
    with pytest.raises(ConfigError, match=f"method '{name}' takes") as e:
        build_method(name, {"no_such_option": 1})
    assert all(o in str(e.value) for o in own)


@pytest.mark.parametrize("name", LARGER)
def test_method_trains_two_steps_on_a_toy_batch(name):
    torch.manual_seed(0)
    method = build_method(name)
    model = method.build_model(TINY_MODEL, 3)
    model.train()
    _inject_features(model, (4, 1280, 2, 3))  # so the new layers get gradients above float resolution
    opt = torch.optim.SGD(model.param_groups(0.01, 10.0), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 64, 96), "index": torch.arange(4),
             "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]])}
    before = {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("backbone.")}
    for _ in range(2):
        b = method.transform_batch(batch, g)
        out = model(b["image"])
        assert out["cams"].shape == (4, 3, 2, 3) and out["logits"].shape == (4, 3)
        loss, parts = method.loss(out, b)
        assert math.isfinite(float(loss.detach())) and all(math.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every new layer is trained


@pytest.mark.parametrize("name", LARGER)
def test_method_trains_through_cli_and_maps_with_cam_and_grad_cam(name, toy_root, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": name}))
    runs = tmp_path / "runs"
    args = [a for a in fast_overrides(toy_root, runs, **{"train.epochs": 1, "method.name": name,
                                                         "maps.splits": "[val]", "maps.flip": False})
            if not a.startswith("name=")]
    assert main(["train-cls", str(cfg), *args]) == 0
    for localizer in ("cam", "grad_cam"):
        assert main(["maps", str(cfg), *args, f"maps.localizer={localizer}"]) == 0
        files = sorted((runs / name / "maps" / "val").glob("*.npz"))
        assert len(files) == 4
        for f in files:
            m = load_maps(f)
            assert np.isfinite(m["maps"]).all() and m["maps"].min() >= 0 and m["maps"].max() <= 1 + 1e-3
            assert m["maps"].shape[1:] == (48, 64)


def test_acol_branches_default_to_cam_heads_and_hidden_convs_train_at_the_backbone_rate():
    plain = build_method("acol").build_model(TINY_MODEL, 3)
    assert [type(m) for m in plain.branch_a] == [torch.nn.Conv2d] and plain.branch_a[0].kernel_size == (1, 1)
    assert plain.branch_a[0].bias is None
    deep = build_method("acol", {"branch_channels": 8}).build_model(TINY_MODEL, 3)
    base, head = deep.param_groups(0.01, 10.0)
    hidden = {id(p) for b in (deep.branch_a, deep.branch_b) for p in b[0].parameters()}
    classifiers = {id(b[2].weight) for b in (deep.branch_a, deep.branch_b)}
    assert hidden <= {id(p) for p in base["params"]} and not hidden & {id(p) for p in head["params"]}
    assert classifiers <= {id(p) for p in head["params"]} and head["lr"] == pytest.approx(0.1)


def test_acol_loss_is_the_mean_of_the_branch_losses():
    method = build_method("acol")
    torch.manual_seed(0)
    out = {"logits_a": torch.randn(2, 3), "logits_b": torch.randn(2, 3)}
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, parts = method.loss(out, {"labels": labels})
    la = F.multilabel_soft_margin_loss(out["logits_a"], labels)
    lb = F.multilabel_soft_margin_loss(out["logits_b"], labels)
    torch.testing.assert_close(loss, (la + lb) / 2)
    assert parts == pytest.approx({"cls_a": float(la), "cls_b": float(lb)})
