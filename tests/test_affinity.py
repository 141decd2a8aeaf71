"""Affinity random walk (IRN's inter-pixel relations, PSA's AffinityNet) as refiners: the walk spreads a class over
its own region and not across a boundary (with given and with learned affinities), the sparse walk equals the dense
matrix of the papers, relation labels are counted exactly, the training stage resumes after a kill, bad settings fail
at load, and both refiners run end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from wsss.cli import main
from wsss.config import load_config
from wsss.config.schema import CrfConfig
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError
from wsss.refine.affinity import AffinityNet, FrozenFeatures
from wsss.refine.irn import BoundaryBranch, line_path, path_affinity
from wsss.refine.psa import FeatureHead, feature_affinity
from wsss.refine.random_walk import Transition, half_offsets, random_walk
from wsss.refine.relations import confident_regions, relation_labels, relation_loss
from wsss.stages import pipeline
from wsss.stages.context import RunContext

from conftest import Killed, fast_overrides, kill_after_first_epoch, make_voc_dataset

# -- the walk on a constructed image -------------------------------------------------------------------------------

H, W = 16, 24  # the grid: two flat regions, columns < 12 and >= 12
LEFT = np.zeros((H, W), bool)
LEFT[:, :12] = True


def partial_cam() -> torch.Tensor:
    """(1, H, W): the class of the left region, seen on a patch of it only."""
    cam = torch.zeros(1, H, W)
    cam[0, 4:10, 2:6] = 1.0
    return cam


def spread(walked: torch.Tensor) -> tuple[float, float]:
    """(lowest normalised score in the left region, highest in the right one), the boundary column 11 aside."""
    m = (walked[0] / walked[0].max()).numpy()
    return float(m[:, :11].min()), float(m[:, 12:].max())


@pytest.mark.parametrize("kind", ["irn", "psa"])
def test_the_walk_spreads_a_class_over_its_region_and_not_across_the_boundary(kind):
    offsets = half_offsets(5)
    if kind == "irn":  # a boundary between the regions (IRN cuts a boundary pixel off from every other one)
        boundary = torch.zeros(H, W)
        boundary[:, 11] = 1.0
        half, beta = path_affinity(boundary, offsets), 10.0
    else:  # features that differ between the regions
        features = torch.zeros(1, 4, H, W)
        features[0, :, :, 12:] = 3.0
        half, beta = feature_affinity(features, offsets)[0], 8.0
    cam = partial_cam()
    assert spread(cam) == (0.0, 0.0)  # the patch alone
    low_left, high_right = spread(random_walk(cam, half, 5, beta, 256))
    assert low_left > 0.5  # the whole left region, not only the patch
    assert high_right < 1e-6  # nothing crossed


def test_transition_weights_sum_to_one_and_the_walk_keeps_the_degree_weighted_mass():
    torch.manual_seed(0)
    half = torch.rand(len(half_offsets(4)), 9, 11)
    t = Transition(half, 4, 3.0)
    torch.testing.assert_close(t.weights.sum(0), torch.ones(9, 11))
    assert (t.weights >= 0).all()
    x = torch.rand(3, 9, 11)
    walked = t(x, 20)
    # each pixel takes a weighted mean of its neighbours: the mass weighted by the degree is what the walk keeps,
    # for every class, and a constant map stays constant
    torch.testing.assert_close((walked * t.degree).sum((1, 2)), (x * t.degree).sum((1, 2)))
    torch.testing.assert_close(t(torch.full((1, 9, 11), 0.7), 20), torch.full((1, 9, 11), 0.7))
    assert not torch.allclose(walked.sum((1, 2)), x.sum((1, 2)), rtol=1e-3)  # the plain sum is not kept


def dense_walk(x: torch.Tensor, half: torch.Tensor, radius: int, beta: float, steps: int) -> torch.Tensor:
    """The papers' computation: the dense symmetric affinity matrix with ones on its diagonal, A^beta divided by its
    column sums, and ``steps`` products of a row of scores with it."""
    c, h, w = x.shape
    n = h * w
    a = torch.eye(n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(half_offsets(radius)):
        for y in range(h):
            for xx in range(w):
                if 0 <= y + dy < h and 0 <= xx + dx < w:
                    i, j = y * w + xx, (y + dy) * w + xx + dx
                    a[i, j] = a[j, i] = float(half[k, y, xx])
    t = a**beta
    t = t / t.sum(0, keepdim=True)
    out = x.reshape(c, n).double()
    for _ in range(steps):
        out = out @ t
    return out.reshape(c, h, w).float()


def test_the_sparse_walk_equals_the_dense_reference():
    torch.manual_seed(1)
    radius, beta, steps = 3, 2.5, 7
    half = torch.rand(len(half_offsets(radius)), 6, 8)
    x = torch.rand(2, 6, 8)
    torch.testing.assert_close(random_walk(x, half, radius, beta, steps), dense_walk(x, half, radius, beta, steps),
                               rtol=1e-4, atol=1e-5)


def test_irn_affinity_is_one_minus_the_highest_boundary_on_the_line():
    torch.manual_seed(2)
    b = torch.rand(7, 9)
    offsets = half_offsets(4)
    got = path_affinity(b, offsets)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(7):
            for x in range(9):
                if not (0 <= y + dy < 7 and 0 <= x + dx < 9):
                    assert got[k, y, x] == 0  # leaves the image
                    continue
                # every pixel whose centre is closer than 1 to the segment's line, within the pair's box
                on = [b[y + py, x + px] for py, px in line_path(dy, dx)]
                assert got[k, y, x] == pytest.approx(1 - max(on))
    assert (0, 0) in line_path(2, 3) and (2, 3) in line_path(2, 3) and (0, 3) not in line_path(2, 3)


# -- relation labels -----------------------------------------------------------------------------------------------


def test_relation_labels_count_every_kind_of_pair_exactly():
    # background 0, class 1, unknown 255; pairs closer than 2: (0,1) (1,-1) (1,0) (1,1)
    labels = torch.tensor([[0, 0, 1],
                           [0, 255, 1]])
    offsets = half_offsets(2)
    assert offsets == [(0, 1), (1, -1), (1, 0), (1, 1)]
    bg, fg, neg = relation_labels(labels, offsets, 255, background=0)
    # (0,1): 0-0 bg, 0-1 neg, 0-255 -, 255-1 -;  (1,-1): 0-0 bg, 1-255 -;  (1,0): 0-0 bg, 0-255 -, 1-1 fg;
    # (1,1): 0-255 -, 0-1 neg.  11 pairs inside the image, 5 of them touch the unknown pixel
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (3, 1, 2)
    assert bg[0, 0, 0] and neg[0, 0, 1] and fg[2, 0, 2] and neg[3, 0, 1]
    assert not (bg | fg | neg)[:, 1, :].any()  # the bottom row pairs with nothing below it
    # without a background class every positive pair is a foreground pair
    bg, fg, neg = relation_labels(labels, offsets, 255, background=None)
    assert (int(bg.sum()), int(fg.sum()), int(neg.sum())) == (0, 4, 2)
    # batched: the same counts per image
    bg, fg, neg = relation_labels(torch.stack([labels, labels]), offsets, 255, background=0)
    assert bg.shape == (2, 4, 2, 3) and int(bg.sum()) == 6


def test_the_loss_balances_the_kinds_of_pairs():
    aff = torch.tensor([0.9, 0.9, 0.9, 0.5, 0.2])
    bg = torch.tensor([True, False, False, False, False])
    fg = torch.tensor([False, True, True, True, False])
    neg = torch.tensor([False, False, False, False, True])
    loss, parts = relation_loss(aff, bg, fg, neg, background=True)
    pos_bg, pos_fg = -np.log(0.9 + 1e-5), -np.mean(np.log(np.array([0.9, 0.9, 0.5]) + 1e-5))
    expected = (pos_bg + pos_fg) / 4 + -np.log(1 + 1e-5 - 0.2) / 2  # PSA's bg/4 + fg/4 + neg/2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert parts["bg_pos"] == pytest.approx(pos_bg, rel=1e-5)
    loss, _ = relation_loss(aff, bg & False, fg | bg, neg, background=False)  # positives: one mean
    assert float(loss) == pytest.approx((-np.mean(np.log(np.array([0.9, 0.9, 0.9, 0.5]) + 1e-5))
                                         - np.log(1 + 1e-5 - 0.2)) / 2, rel=1e-5)


# -- learned affinities ------------------------------------------------------------------------------------------


def two_region_image() -> np.ndarray:
    """(64, 96, 3) uint8: red left half, blue right half, a dark contour between them (the grid of a stride-4
    network is H x W; the contour covers grid columns 11 and 12)."""
    img = np.zeros((4 * H, 4 * W, 3), np.uint8)
    img[:, : 4 * 12] = (200, 40, 40)
    img[:, 4 * 12 :] = (40, 40, 200)
    img[:, 44:52] = 20
    return img


def two_class_maps() -> np.ndarray:
    """(2, 64, 96): class 0 (the left region) seen on a band of it; class 1 (the right region) on a band of it, and
    weakly (0.1) everywhere, so the arg-max of the maps gives most of the left region to class 1."""
    maps = np.zeros((2, 4 * H, 4 * W), np.float32)
    maps[0, 20:44, 8:40] = 1.0
    maps[1] = 0.1
    maps[1, 20:44, 56:88] = 1.0
    return maps


def tiny_backbone() -> tuple[nn.Module, list[str]]:
    """A random, frozen 3-stage CNN (strides 2, 4, 8): stands for an ImageNet backbone in seconds. Edge padding, so
    that a flat region has one feature up to the image's border."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, padding_mode="replicate"), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 2, 1, padding_mode="replicate"), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, 2, 1, padding_mode="replicate"), nn.ReLU())
    return body, ["1", "3", "5"]


@pytest.mark.parametrize("kind", ["irn", "psa"])
def test_affinity_learned_from_the_confident_regions_spreads_the_class_over_its_region(kind):
    spec = DatasetSpec("two", ("left", "right"), background=None)
    image, maps, classes = two_region_image(), two_class_maps(), np.array([0, 1])
    regions = confident_regions(image, maps, classes, spec, CrfConfig(), margin=0.25)
    # confident: the two bands; unknown: where neither class leads (most of each region)
    truth = np.where(np.repeat(np.repeat(LEFT, 4, 0), 4, 1), 0, 1)
    known = regions != 255
    assert 0.2 < known.mean() < 0.3 and (regions[known] == truth[known]).all()

    body, stages = tiny_backbone()
    head = BoundaryBranch([16, 32]) if kind == "irn" else FeatureHead([16, 32])
    net = AffinityNet(FrozenFeatures(body, stages, 4), head, 4)
    assert net.features.levels == ["3", "5"]
    affinity = (lambda out, o: path_affinity(torch.sigmoid(out["boundary"])[:, 0], o)) if kind == "irn" else \
        (lambda out, o: feature_affinity(out["features"], o))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    grid = torch.from_numpy(regions[2::4, 2::4].astype(np.int64))[None]  # nearest, as the training task samples
    offsets = half_offsets(8)  # the bands are 4 grid pixels apart: pairs across the contour
    labels = relation_labels(grid, offsets, 255, None)
    assert int(labels[2].sum()) > 0  # negative pairs
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(60):
        loss, _ = relation_loss(affinity(net(x), offsets), *labels, background=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        half = affinity(net(x), half_offsets(5))[0]
    grid_maps = torch.from_numpy(maps[:, 2::4, 2::4])
    left, right = np.s_[:, :10], np.s_[:, 14:]  # the regions, the contour's columns aside
    before = grid_maps.argmax(0).numpy()
    assert (before[left] == 0).mean() < 0.5  # the maps give most of the left region to the other class
    walked = random_walk(grid_maps, half, 5, 10.0 if kind == "irn" else 8.0, 256).argmax(0).numpy()
    assert (walked[left] == 0).all() and (walked[right] == 1).all()


# -- settings at load ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("pseudo.options.irn.radius=0", r"pseudo\.options\.irn\.radius: must be >= 2, got 0"),
    ("pseudo.options.irn.radius=1", r"pseudo\.options\.irn\.radius: must be >= 2, got 1"),
    ("pseudo.options.irn.label_radius=0", r"pseudo\.options\.irn\.label_radius: must be >= 2"),
    ("pseudo.options.psa.beta=0", r"pseudo\.options\.psa\.beta: must be > 0, got 0"),
    ("pseudo.options.irn.beta=-1", r"pseudo\.options\.irn\.beta: must be > 0, got -1"),
    ("pseudo.options.psa.steps=0", r"pseudo\.options\.psa\.steps: must be >= 1, got 0"),
    ("pseudo.options.irn.conf_bg_threshold=0.4", r"pseudo\.options\.irn\.conf_bg_threshold: must be below "
                                                 r"pseudo\.options\.irn\.conf_fg_threshold"),
    ("pseudo.options.psa.alpha_high=2", r"pseudo\.options\.psa\.alpha_low: must be below "
                                        r"pseudo\.options\.psa\.alpha_high"),
    ("pseudo.options.irn.feature_stride=3", r"pseudo\.options\.irn\.feature_stride: 3 is not one of 4, 8, 16"),
    ("pseudo.options.psa.backbone=resnet05", r"pseudo\.options\.psa\.backbone: unknown backbone 'resnet05'\. Did "
                                             r"you mean 'resnet50'\?"),
    ("pseudo.options.irn.backbone=vit_small", r"pseudo\.options\.irn\.backbone: 'vit_small' is a vision transformer"),
    ("pseudo.options.irn.train.epochs=0", r"pseudo\.options\.irn\.train\.epochs: must be >= 1"),
])
def test_bad_settings_fail_at_load_naming_the_key(override, key):
    name = override.split(".")[2]
    with pytest.raises(ConfigError, match=rf"override '{override}': {key}"):
        load_config(None, [f"pseudo.refiners=[{name}]", override])


def test_a_classifier_without_cnn_stages_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"pseudo\.options\.psa\.backbone: the classifier's backbone "
                                          r"\(model\.backbone=vit_small\) is a vision transformer"):
        load_config(None, ["model.backbone=vit_small", "pseudo.refiners=[psa]"])
    cfg = load_config(None, ["model.backbone=vit_small", "pseudo.refiners=[psa]", "pseudo.options.psa.backbone=resnet18"])
    assert cfg.pseudo.options["psa"]["backbone"] == "resnet18"


# -- the pipeline --------------------------------------------------------------------------------------------------


def test_the_pipeline_declares_the_stages_of_the_refiners():
    def declared(*overrides):
        return pipeline.Pipeline(RunContext(load_config(None, list(overrides))))

    p = declared("pseudo.refiners=[irn, crf]")
    assert p.order == ["cls", "maps", "irn", "pseudo", "seg", "pred", "eval"]
    assert p.inputs("pseudo") == ("maps", "irn") and p.inputs("irn") == ("cls", "maps")
    assert declared("pseudo.refiners=[crf]").order == ["cls", "maps", "pseudo", "seg", "pred", "eval"]
    both = declared("pseudo.refiners=[irn, psa]")
    assert both.order[2:4] == ["irn", "psa"] and both.inputs("pseudo") == ("maps", "irn", "psa")
    assert declared("pseudo.refiners=[psa]", "pseudo.options.psa.backbone=resnet18").inputs("psa") == ("maps",)

    base = p.keys()
    walk = declared("pseudo.refiners=[irn, crf]", "pseudo.options.irn.beta=5").keys()
    assert walk["irn"] == base["irn"] and walk["pseudo"] != base["pseudo"]  # the walk changes masks, not the network
    trained = declared("pseudo.refiners=[irn, crf]", "pseudo.options.irn.train.epochs=5").keys()
    assert trained["irn"] != base["irn"] and trained["pseudo"] != base["pseudo"]  # through the pseudo stage's inputs
    workers = declared("pseudo.refiners=[irn, crf]", "crf.workers=7").keys()
    assert workers == base


TINY = {"pseudo.options.irn.train.epochs": 2, "pseudo.options.irn.train.batch_size": 4,
        "pseudo.options.irn.train.crop_size": 48, "pseudo.options.irn.label_radius": 3,
        "pseudo.options.irn.radius": 3, "pseudo.options.irn.steps": 16,
        "pseudo.options.psa.train.epochs": 1, "pseudo.options.psa.train.batch_size": 4,
        "pseudo.options.psa.train.crop_size": 48, "pseudo.options.psa.label_radius": 3,
        "pseudo.options.psa.radius": 3, "pseudo.options.psa.steps": 16}


def test_a_killed_affinity_training_resumes(tmp_path):
    root = make_voc_dataset(tmp_path / "toy", splits=(("train", 4), ("val", 2), ("test", 1)))
    args = fast_overrides(root, tmp_path / "runs", **{"train.epochs": 1, "maps.splits": "[train]", "crf.workers": 0,
                                                        "pseudo.refiners": "[irn]", **TINY})
    pipeline.run(RunContext(load_config(None, args)), "maps")
    ctx = RunContext(load_config(None, args), after_epoch=kill_after_first_epoch)
    with pytest.raises(Killed):
        pipeline.run(ctx, "irn")
    stage = ctx.run_dir / "irn"
    assert (stage / "last.ckpt").exists() and not (stage / "model.pt").exists()
    assert len(list((stage / "labels").glob("*.png"))) == 4
    pipeline.run(RunContext(load_config(None, args)), "irn")
    info = json.loads((stage / "stage.json").read_text())
    assert info["complete"] and info["resumed"] and info["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (stage / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy dataset without background and a config file; the classifier and maps are made by the first run and
    reused by the others."""
    tmp = tmp_path_factory.mktemp("affinity")
    root = make_voc_dataset(tmp / "toy")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "affinity"}))
    args = [a for a in fast_overrides(root, tmp / "runs", **{"train.epochs": 1, "maps.splits": "[train, val]",
                                                             "crf.workers": 0, **TINY})
            if not a.startswith("name=")]
    return {"config": str(cfg), "args": args, "run": tmp / "runs" / "affinity"}


def pseudo(toy, chain: str) -> tuple[dict[str, np.ndarray], dict]:
    assert main(["pseudo", toy["config"], *toy["args"], f"pseudo.refiners={chain}"]) == 0
    d = toy["run"] / "pseudo"
    info = json.loads((d / "stage.json").read_text())
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((d / info["split"]).glob("*.png"))}, info


@pytest.mark.parametrize("name", ["irn", "psa"])
def test_the_refiners_run_end_to_end_through_the_cli(toy, name):
    plain, _ = pseudo(toy, "[]")
    walked, info = pseudo(toy, f"[{name}]")
    assert info["refiners"] == [name] and info["images"] == len(walked) == 8
    assert info[f"{name}_walk_images"] == 8 and info[f"{name}_walk_images_per_s"] > 0
    assert all(m.shape == (48, 64) and set(np.unique(m)) <= {0, 1, 2, 3} for m in walked.values())
    assert any((walked[k] != plain[k]).any() for k in plain)  # the walk moved labels
    stage = toy["run"] / name
    trained = json.loads((stage / "stage.json").read_text())
    assert trained["complete"] and trained["role"] == "affinity" and trained["seconds_per_epoch"] > 0
    assert (stage / "model.pt").exists() and len(list((stage / "labels").glob("*.png"))) == 8
    model = (stage / "model.pt").stat().st_mtime_ns

    with_crf, info = pseudo(toy, f"[{name}, crf]")
    assert info["refiners"] == [name, "crf"] and len(with_crf) == 8
    assert (stage / "model.pt").stat().st_mtime_ns == model  # the trained network is reused, not retrained
    config = yaml.safe_load((toy["run"] / "config.yaml").read_text())
    assert config["pseudo"]["options"][name]["steps"] == 16


def test_with_a_background_class_the_threshold_is_chosen_on_the_walked_maps(tmp_path):
    root = make_voc_dataset(tmp_path / "toy", splits=(("train", 6), ("val", 3), ("test", 1)), background=True)
    args = fast_overrides(root, tmp_path / "runs", **{"train.epochs": 1, "maps.splits": "[train, val]",
                                                        "crf.workers": 0, **TINY})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["pseudo", str(cfg), *args, "pseudo.refiners=[psa]"]) == 0
    info = json.loads((tmp_path / "runs" / "t" / "pseudo" / "stage.json").read_text())
    assert info["chosen_on"] == "val" and info["bg_threshold"] in [round(0.05 * i, 2) for i in range(1, 20)]
    assert info["psa_walk_images"] == 6 + 3  # the selection split walked too
    regions = json.loads((tmp_path / "runs" / "t" / "psa" / "stage.json").read_text())
    assert 0 < regions["confident_fraction"] <= 1
