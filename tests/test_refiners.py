"""Refiners as plugins (wsss.refine): a refiner defined here, in the test, runs in the pipeline with nothing edited
elsewhere; the chain, its options and its order are validated at load."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import yaml
from PIL import Image

from wsss.cli import main
from wsss.config import load_config
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError
from wsss.refine import MAPS, MASK, REFINERS, Item, Refiner, resolve_refiners
from wsss.stages import pseudo as pseudo_stage

from conftest import fast_overrides, make_voc_dataset

#: images the identity refiner saw: (dtype, shape, maps shape) -- it runs in this process (no workers)
SEEN: list[tuple] = []


@dataclass
class BoxBlurOptions:
    #: side of the square window (odd)
    size: int = 5

    def __post_init__(self):
        if self.size < 1 or self.size % 2 == 0:
            raise ConfigError(f"pseudo.options.box_blur.size: must be an odd integer >= 1, got {self.size}")


@REFINERS.register("box_blur")
class BoxBlur(Refiner):
    """Each map replaced by its mean over a size x size window (edges replicated)."""

    name = "box_blur"
    Options = BoxBlurOptions

    def refine(self, x: Item) -> Item:
        r = self.options.size // 2
        p = np.pad(x.maps, ((0, 0), (r, r), (r, r)), mode="edge")
        h, w = x.maps.shape[1:]
        out = sum(p[:, i : i + h, j : j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)) / (2 * r + 1) ** 2
        return x.replace(maps=out.astype(np.float32))


@REFINERS.register("sharpen")
class Sharpen(Refiner):
    """maps ** 4: per pixel monotone, so it does not move an arg-max by itself -- only before a blur."""

    name = "sharpen"

    def refine(self, x: Item) -> Item:
        return x.replace(maps=x.maps.astype(np.float64) ** 4)  # float64: no small scores underflow into ties


@REFINERS.register("identity")
class Identity(Refiner):
    """Hands on what it is given, maps or a mask."""

    name = "identity"
    takes = (MAPS, MASK)
    gives = None

    def refine(self, x: Item) -> Item:
        SEEN.append((x.image.dtype, x.image.shape, x.maps.shape))
        return x


# -- the pipeline, end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy dataset without background and a config file; the classifier and maps are made by the first run and
    reused by the others (same run name, same keys)."""
    tmp = tmp_path_factory.mktemp("refiners")
    root = make_voc_dataset(tmp / "toy")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "refiners"}))
    args = [a for a in fast_overrides(root, tmp / "runs", **{"train.epochs": 1, "maps.splits": "[train, val]",
                                                             "crf.workers": 0})
            if not a.startswith("name=")]
    return {"config": str(cfg), "args": args, "run": tmp / "runs" / "refiners"}


def pseudo_masks(toy, *overrides: str) -> tuple[dict[str, np.ndarray], dict]:
    """``wsss pseudo`` with ``overrides``; the written masks by image id and the stage info."""
    assert main(["pseudo", toy["config"], *toy["args"], *overrides]) == 0
    d = toy["run"] / "pseudo"
    info = json.loads((d / "stage.json").read_text())
    masks = {p.stem: np.asarray(Image.open(p)) for p in sorted((d / info["split"]).glob("*.png"))}
    return masks, info


def boundary(masks: dict[str, np.ndarray]) -> int:
    """Pixels whose right or lower neighbour has another label: the length of the masks' region boundaries."""
    return sum(int((m[:, 1:] != m[:, :-1]).sum() + (m[1:] != m[:-1]).sum()) for m in masks.values())


def differ(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


def test_a_refiner_defined_in_a_test_runs_in_the_pipeline(toy):
    plain, info = pseudo_masks(toy, "pseudo.refiners=[]")
    assert info["refiners"] == [] and info["images"] == len(plain) == 8
    SEEN.clear()
    same, info = pseudo_masks(toy, "pseudo.refiners=[identity]")
    assert info["refiners"] == ["identity"] and differ(same, plain) == 0
    # it was handed the original image, as loaded, and the image's maps
    assert len(SEEN) == 8 and all(dt == np.uint8 and s == (48, 64, 3) and m[1:] == (48, 64) for dt, s, m in SEEN)

    blurred, _ = pseudo_masks(toy, "pseudo.refiners=[box_blur]")
    assert differ(blurred, plain) > 0
    assert boundary(blurred) < boundary(plain)  # a blur of the maps smooths the regions of their arg-max
    wider, _ = pseudo_masks(toy, "pseudo.refiners=[box_blur]", "pseudo.options.box_blur.size=9")
    assert differ(wider, blurred) > 0 and boundary(wider) < boundary(blurred)

    # the order of a chain is the order of the refinements: sharpening before a blur lets the strongest class win
    # wider, after it changes no arg-max
    sharp_then_blur, _ = pseudo_masks(toy, "pseudo.refiners=[sharpen, box_blur]")
    blur_then_sharp, _ = pseudo_masks(toy, "pseudo.refiners=[box_blur, sharpen]")
    assert differ(blur_then_sharp, blurred) == 0 and differ(sharp_then_blur, blurred) > 0

    # with the CRF after it, in worker processes: the toy refiner runs here, the CRF in the workers
    crf, _ = pseudo_masks(toy, "pseudo.refiners=[crf]")
    assert differ(pseudo_masks(toy, "pseudo.refiners=[crf, identity]")[0], crf) == 0  # a mask handed on as it is
    blur_crf, info = pseudo_masks(toy, "pseudo.refiners=[box_blur, crf]", "crf.workers=2")
    assert info["refiners"] == ["box_blur", "crf"] and info["workers"] == 2
    assert differ(blur_crf, crf) > 0
    again, _ = pseudo_masks(toy, "pseudo.refiners=[box_blur, crf]", "crf.workers=0")
    assert differ(again, blur_crf) == 0  # workers do not change the masks


def test_the_written_config_holds_every_option_of_the_chain(toy):
    pseudo_masks(toy, "pseudo.refiners=[box_blur, crf]")
    written = yaml.safe_load((toy["run"] / "config.yaml").read_text())["pseudo"]
    assert written["refiners"] == ["box_blur", "crf"]
    assert written["options"] == {"box_blur": {"size": 5}, "crf": {"gt_prob": 0.7}}


# -- validation at load --------------------------------------------------------------------------------------------
def test_unknown_refiner_suggests_the_nearest_name(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pseudo\.refiners: unknown refiner 'crff'\. Did you mean 'crf'\?"):
        load_config(None, ["pseudo.refiners=[crff]"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"pseudo": {"refiners": ["box_blr"]}}))
    assert main(["pseudo", str(cfg), f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert "Did you mean 'box_blur'?" in capsys.readouterr().err


def test_bad_options_are_refused_naming_them():
    with pytest.raises(ConfigError, match=r"'pseudo\.options\.box_blur\.sise'\. Did you mean 'size'\?.*refiner "
                                          r"'box_blur' takes: size"):
        load_config(None, ["pseudo.refiners=[box_blur]", "pseudo.options.box_blur.sise=3"])
    with pytest.raises(ConfigError, match=r"pseudo\.options\.box_blur\.size: expected an integer, got 'big'"):
        load_config(None, ["pseudo.refiners=[box_blur]", "pseudo.options.box_blur.size=big"])
    with pytest.raises(ConfigError, match=r"pseudo\.options\.box_blur\.size: must be an odd integer"):
        load_config(None, ["pseudo.refiners=[box_blur]", "pseudo.options.box_blur.size=4"])
    with pytest.raises(ConfigError, match=r"pseudo\.options\.crf\.gt_prob: must be a number in \(0, 1\)"):
        load_config(None, ["pseudo.refiners=[crf]", "pseudo.options.crf.gt_prob=1.0"])
    with pytest.raises(ConfigError, match=r"refiner 'identity' takes: no options"):
        load_config(None, ["pseudo.refiners=[identity]", "pseudo.options.identity.size=3"])
    with pytest.raises(ConfigError, match=r"pseudo\.options\.box_blurr: unknown refiner 'box_blurr'\. Did you mean "
                                          r"'box_blur'\?"):
        load_config(None, ["pseudo.refiners=[box_blur]", "pseudo.options.box_blurr.size=3"])


def test_chain_order_is_checked_where_it_matters():
    # the CRF gives a mask; refiners that need maps cannot follow it
    for chain, name in (("[crf, saliency]", "saliency"), ("[crf, box_blur]", "box_blur")):
        with pytest.raises(ConfigError, match=rf"'{name}' takes maps, but 'crf' before it gives a mask; reorder"):
            load_config(None, [f"pseudo.refiners={chain}"])
    for chain in ("[saliency, crf]", "[box_blur, crf]", "[crf, identity]", "[box_blur, saliency, crf]"):
        assert load_config(None, [f"pseudo.refiners={chain}"]).pseudo.refiners == yaml.safe_load(chain)
    with pytest.raises(ConfigError, match="'crf' appears twice"):
        load_config(None, ["pseudo.refiners=[crf, crf]"])


def test_resolve_refiners_fills_in_options_and_is_idempotent():
    cfg = load_config(None, ["pseudo.refiners=[box_blur, crf]", "pseudo.options.box_blur.size=3"])
    cfg.pseudo.options = {"box_blur": {"size": 3}, "saliency": {}}  # a refiner outside the chain: dropped
    resolve_refiners(cfg)
    assert cfg.pseudo.options == {"box_blur": {"size": 3}, "crf": {"gt_prob": 0.7}}
    before = json.dumps(cfg.pseudo.options)
    resolve_refiners(cfg)
    assert json.dumps(cfg.pseudo.options) == before
    cfg.pseudo.refiners = ["crff"]
    with pytest.raises(ConfigError, match="Did you mean 'crf'"):
        resolve_refiners(cfg)


def test_the_stage_key_follows_the_chain_and_the_settings_its_refiners_read():
    def key(*overrides):
        return json.dumps(pseudo_stage.key_settings(load_config(None, list(overrides))), sort_keys=True)

    base = key("pseudo.refiners=[box_blur, crf]")
    assert key("pseudo.refiners=[box_blur, crf]", "pseudo.options.box_blur.size=5") == base  # the default, spelled out
    assert key("pseudo.refiners=[box_blur, crf]", "crf.workers=7") == base  # cannot change a mask
    assert key("pseudo.refiners=[box_blur, crf]", "saliency.threshold=0.3") == base  # not in the chain
    assert key("pseudo.refiners=[box_blur, crf]", "pseudo.options.box_blur.size=3") != base
    assert key("pseudo.refiners=[box_blur, crf]", "crf.bilateral_srgb=20") != base
    assert key("pseudo.refiners=[crf, identity]") != key("pseudo.refiners=[crf]")
    assert key("pseudo.refiners=[sharpen, box_blur]") != key("pseudo.refiners=[box_blur, sharpen]")
    assert key("pseudo.refiners=[saliency, crf]") != key("pseudo.refiners=[saliency, crf]", "saliency.threshold=0.3")
    # gt_prob shapes the CRF of a mask only
    assert key("pseudo.refiners=[crf]", "pseudo.options.crf.gt_prob=0.9") == key("pseudo.refiners=[crf]")
    assert (key("pseudo.refiners=[saliency, crf]", "pseudo.options.crf.gt_prob=0.9")
            != key("pseudo.refiners=[saliency, crf]"))


def test_the_contract_of_a_refiner_is_enforced():
    class Cropping(Refiner):
        name = "cropping"

        def refine(self, x):
            return x.replace(maps=x.maps[:, :-1])

    cfg = load_config(None)
    x = Item(None, np.ones((1, 4, 4), np.float32), np.array([1]), DatasetSpec("s", ("a", "b"), background=None))
    with pytest.raises(ValueError, match="refiner 'cropping' returned maps of shape"):
        Cropping(None, cfg)(x)
    with pytest.raises(ValueError, match="refiner 'box_blur' takes maps, got mask"):
        BoxBlur(None, cfg)(x.replace(mask=np.zeros((4, 4), np.uint8)))
    assert BoxBlur(None, cfg)(x).maps.shape == (1, 4, 4)
