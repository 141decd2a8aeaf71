"""EPS (wsss.methods.eps): the saliency loss on hand-made maps, the saliency's way through the augmentation, the
options, the classifier's key and supervision, and a tiny run through training and maps."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import config_hash, load_config
from wsss.data.transforms import SALIENCY_IGNORE, TrainTransform
from wsss.errors import ConfigError
from wsss.localize.store import load_maps
from wsss.methods import build_method
from wsss.methods.eps import EPSClassifier, predicted_saliency, saliency_at, saliency_loss
from wsss.models.backbones import Backbone
from wsss.stages.context import RunContext
from wsss.stages.declare import select
from wsss.stages.evaluate import supervision_of
from wsss.stages.pipeline import Pipeline, run_stage
from wsss.stages.train_cls import KEYED_BY

# ------------------------------------------------------------------------------------------- the loss

#: softmax probabilities of 4 pixels (a 1 x 4 map) over classes 0, 1, 2 and the background channel (last)
P = torch.tensor([
    [0.6, 0.1, 0.2, 0.1],
    [0.7, 0.1, 0.1, 0.1],
    [0.1, 0.6, 0.1, 0.2],
    [0.1, 0.1, 0.1, 0.7],
])
#: classes 0 and 1 labelled, class 2 not
LABELS = torch.tensor([[1.0, 1.0, 0.0]])


def _maps(p: torch.Tensor = P) -> torch.Tensor:
    """(1, 4, 1, W) logits whose softmax over channels is ``p`` (W, 4)."""
    return p.log().T[None, :, None, :].contiguous()


def _sal(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_a_class_outside_the_salient_region_counts_as_background_hand_computed():
    # salient: the first two pixels, where class 0 wins. round(p_0) = [1, 1, 0, 0]: O_0 = 2 / 2 -> foreground;
    # round(p_1) = [0, 0, 1, 0]: O_1 = 0 -> background with the background channel; class 2 unlabelled: neither
    sal = _sal([1.0, 1.0, 0.0, 0.0])
    for lam in (0.5, 0.25):
        pred, overlap, fg = predicted_saliency(_maps(), sal, torch.ones_like(sal, dtype=torch.bool), LABELS, 0.4, lam)
        torch.testing.assert_close(overlap[0, :2], torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
        assert fg.tolist() == [[True, False, False]]
        # S^ = lam p0 + (1 - lam) (1 - p1 - p_bg) = p0 + (1 - lam) p2, pixel by pixel
        expected = [lam * p[0] + (1 - lam) * (1 - p[1] - p[3]) for p in P.tolist()]
        torch.testing.assert_close(pred.view(-1), torch.tensor(expected), atol=1e-6, rtol=0)
        torch.testing.assert_close(pred.view(-1), P[:, 0] + (1 - lam) * P[:, 2], atol=1e-6, rtol=0)
    # tau = 1: O_0 = 1 is not above it, so class 0 is background too: S^ = (1 - lam) p2
    pred, _, fg = predicted_saliency(_maps(), sal, torch.ones_like(sal, dtype=torch.bool), LABELS, 1.0, 0.5)
    assert not fg.any()
    torch.testing.assert_close(pred.view(-1), 0.5 * P[:, 2], atol=1e-6, rtol=0)


def test_saliency_loss_is_zero_when_the_prediction_is_the_saliency_and_larger_when_swapped():
    lam = 0.5
    # the saliency S^ predicts for these maps: rounds to [1, 1, 0, 0], so the class selection is the one above
    s = P[:, 0] + (1 - lam) * P[:, 2]
    sal = _sal(s.tolist())
    zero = saliency_loss(_maps(), sal, LABELS, 0.4, lam)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)
    swapped = saliency_loss(_maps(), 1 - sal, LABELS, 0.4, lam)
    assert swapped.item() > zero.item() + 1e-3
    # padded pixels (SALIENCY_IGNORE) count nowhere, whatever the maps say there
    padded = sal.clone()
    padded[..., 2:] = SALIENCY_IGNORE
    assert saliency_loss(_maps(), padded, LABELS, 0.4, lam).item() == pytest.approx(0.0, abs=1e-6)
    assert saliency_loss(_maps(), torch.full_like(sal, SALIENCY_IGNORE), LABELS, 0.4, lam).item() == 0.0


def test_saliency_is_averaged_over_each_map_cell_and_cells_mostly_padded_do_not_count():
    sal = torch.zeros(1, 1, 4, 4)
    sal[..., :2, :2] = 1.0  # top-left cell fully salient
    sal[..., :2, 2] = 1.0  # a quarter of the top-right cell
    sal[..., 2:, 2:] = SALIENCY_IGNORE  # bottom-right cell padded
    sal[..., 2:, :1] = SALIENCY_IGNORE  # half of the bottom-left cell padded; its real half salient
    sal[..., 2:, 1] = 1.0
    target, valid = saliency_at(sal, (2, 2))
    torch.testing.assert_close(target[0, 0, 0], torch.tensor([1.0, 0.5]))
    assert valid[0, 0].tolist() == [[True, True], [True, False]]
    assert target[0, 0, 1, 0].item() == pytest.approx(1.0)


def test_loss_of_the_model_trains_both_losses():
    method = build_method("eps")
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    model = EPSClassifier(Backbone(body, 8, ["0"]), 3, freeze_bn=False)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out["eps_maps"].shape == (2, 4, 4, 4) and out["cams"].shape == (2, 3, 4, 4)
    # the localization maps: the class channels of the softmax over all four maps (the official infer.py's)
    torch.testing.assert_close(out["cams"], torch.softmax(out["eps_maps"], dim=1)[:, :3])
    assert (out["cams"].sum(1) < 1).all()  # the background map takes its share at every pixel
    torch.testing.assert_close(out["logits"], out["eps_maps"][:, :3].mean(dim=(2, 3)))
    torch.testing.assert_close(model.cam(model.features(x)), out["cams"])
    sal = torch.rand(2, 1, 16, 16)
    loss, parts = method.loss(out, {"labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]]), "saliency": sal})
    assert set(parts) == {"cls", "sal"} and parts["sal"] > 0
    assert loss.item() == pytest.approx(parts["cls"] + parts["sal"], rel=1e-5)
    loss.backward()
    assert model.head.weight.grad[3].abs().sum() > 0  # the background channel learns from the saliency loss
    with pytest.raises(KeyError, match="saliency"):
        method.loss(out, {"labels": torch.zeros(2, 3)})


# ------------------------------------------------------------------------------------------- augmentation


def test_the_saliency_goes_through_the_images_own_rescale_flip_and_crop():
    h, w = 48, 64
    rgb = np.full((h, w, 3), 128, np.uint8)
    rgb[8:30, 4:24] = (230, 20, 20)  # a red box on the left: a flip of one and not the other would show
    sal = np.zeros((h, w), np.float32)
    sal[8:30, 4:24] = 1.0
    transform = TrainTransform((56, 72), (0.7, 1.3), hflip=True)  # larger than some rescaled images: padding
    flips = set()
    padded_any = False
    for seed in range(12):
        img, _, s = transform.apply(rgb, seed, saliency=sal)
        assert img.shape == (3, 56, 72) and s.shape == (1, 56, 72)
        # the image alone is augmented exactly as with its saliency
        torch.testing.assert_close(transform(rgb, None, seed)[0], img, atol=0, rtol=0)
        pad = (img == 0).all(dim=0)
        padded_any |= bool(pad.any())
        assert torch.equal(s[0] == SALIENCY_IGNORE, pad)
        red = (img[0] > 1.0) & (img[1] < -1.0)  # normalised: red well above its mean, green well below
        salient = s[0] > 0.5
        real = ~pad
        agree = (red == salient)[real].float().mean().item()
        assert agree > 0.97, (seed, agree)
        assert salient.sum() > 50
        flips.add(bool(red[:, : red.shape[1] // 2].sum() < red[:, red.shape[1] // 2 :].sum()))
    assert flips == {False, True} and padded_any  # both flips and padding were exercised


# ------------------------------------------------------------------------------------------- options and config


@pytest.mark.parametrize("override,key", [
    ("method.options.tau=1.5", "method.options.tau"),
    ("method.options.lam=-1", "method.options.lam"),
    ("method.options.saliency_weight=0", "method.options.saliency_weight"),
    ("method.options.erase_threshold=0.5", "method.options.erase_threshold"),
])
def test_bad_options_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(None, ["method.name=eps", override])
    assert "tau, lam, saliency_weight" in str(e.value)


def test_defaults_are_the_papers():
    cfg = load_config(None, ["method.name=eps"])
    assert cfg.method.options == {"tau": 0.4, "lam": 0.5, "saliency_weight": 1.0}


def test_a_saliency_setting_that_cannot_serve_eps_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"saliency\.folder"):
        load_config(None, ["method.name=eps", "saliency.source=folder"])
    with pytest.raises(ConfigError, match=r"saliency\.onnx_path"):
        load_config(None, ["method.name=eps", "saliency.source=onnx"])
    with pytest.raises(ConfigError, match=r"saliency\.cache_maps"):
        load_config(None, ["method.name=eps", "saliency.source=u2netp", "saliency.cache_maps=false"])
    with pytest.raises(ConfigError, match=r"saliency\.source"):
        load_config(None, ["method.name=eps", "saliency.source=u2nett"])
    # the same settings are fine for a method that does not read saliency
    load_config(None, ["saliency.source=folder"])


def test_eps_records_image_labels_plus_saliency_only_with_a_trained_saliency_network():
    trained = supervision_of(load_config(None, ["method.name=eps", "saliency.source=u2netp"]))
    assert (trained["maps"], trained["pseudo"], trained["seg"]) == ("I+S", "I+S", "I+S")
    assert trained["saliency_source"] == "u2netp"
    classical = supervision_of(load_config(None, ["method.name=eps", "saliency.source=spectral_residual"]))
    assert (classical["maps"], classical["pseudo"], classical["seg"]) == ("I", "I", "I")
    assert supervision_of(load_config(None, ["saliency.source=u2netp"]))["maps"] == "I"  # cam reads no saliency


def test_the_classifier_key_follows_the_saliency_for_eps_only(fast_cfg):
    def cls_key(**o):
        return Pipeline(RunContext(fast_cfg(**o))).key("cls")

    # other methods: the key of before (the selector the cls stage always had), whatever the saliency settings
    cfg = fast_cfg()
    assert cls_key() == config_hash("cls", [], select(cfg, KEYED_BY))
    assert cls_key(**{"saliency.source": "frequency_tuned"}) == cls_key()
    eps = {"method.name": "eps"}
    assert cls_key(**eps) != cls_key(**eps, **{"saliency.source": "frequency_tuned"})
    assert cls_key(**eps) != cls_key(**eps, **{"saliency.sr_width": 32})
    # settings of the saliency refiner alone do not retrain the classifier
    assert cls_key(**eps) == cls_key(**eps, **{"saliency.threshold": 0.3, "saliency.min_cam": 0.1})


# ------------------------------------------------------------------------------------------- a tiny run


def _folder_of_saliency(root, out):
    """One PNG per image: the objects of its ground-truth mask as salient (255), the rest 0."""
    out.mkdir()
    for m in (root / "SegmentationClass").glob("*.png"):
        mask = np.asarray(Image.open(m))
        Image.fromarray(np.where((mask > 0) & (mask < 255), 255, 0).astype(np.uint8)).save(out / m.name)
    return out


def test_eps_trains_and_extracts_maps_through_the_stages(fast_cfg, toy_root, tmp_path):
    folder = _folder_of_saliency(toy_root, tmp_path / "saliency")
    ctx = RunContext(fast_cfg(**{"train.epochs": 1, "method.name": "eps", "saliency.source": "folder",
                                 "saliency.folder": str(folder), "maps.splits": "[train]"}))
    stage = run_stage(ctx, "maps")
    log = [json.loads(line) for line in (ctx.run_dir / "cls" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and {"cls", "sal"} <= set(log[0]) and math.isfinite(log[0]["loss"]) and log[0]["sal"] > 0
    files = sorted((stage.dir / "train").glob("*.npz"))
    assert len(files) == 8
    m = load_maps(files[0])
    assert m["maps"].shape[1:] == (48, 64) and np.isfinite(m["maps"]).all()


def test_a_missing_saliency_map_fails_before_training(fast_cfg, toy_root, tmp_path):
    from wsss.errors import DataError

    folder = _folder_of_saliency(toy_root, tmp_path / "saliency")
    next(folder.glob("*.png")).unlink()
    ctx = RunContext(fast_cfg(**{"method.name": "eps", "saliency.source": "folder", "saliency.folder": str(folder)}))
    with pytest.raises(DataError, match="no saliency map"):
        run_stage(ctx, "cls")
    assert not (ctx.run_dir / "cls" / "log.jsonl").exists()


def test_stored_saliency_is_picklable_and_gives_the_sources_maps(tmp_path):
    from wsss.config.schema import SaliencyConfig
    from wsss.saliency import StoredSaliency, build_source

    rgb = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    source = build_source(SaliencyConfig(source="spectral_residual"))
    stored = pickle.loads(pickle.dumps(StoredSaliency(source)))
    np.testing.assert_array_equal(stored(rgb), source(rgb))
