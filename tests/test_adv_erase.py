"""Adversarial Erasing: erase masks from constructed maps, mean-colour filling before augmentation, over-erasing
guard, the union of rounds, and the multi-round stages (cached per round, resumed at the round that was killed)."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import main
from wsss.data.datasets import ClassificationDataset, InferenceDataset
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import to_tensor
from wsss.errors import ConfigError, DataError
from wsss.localize import load_maps, save_maps
from wsss.methods import build_method
from wsss.methods.adv_erase import erase_region, erase_summary, union_maps
from wsss.stages.adv_erase import ErasedInputs, load_erase_mask, mean_colour, write_erase_masks
from wsss.stages.context import RunContext
from wsss.stages.pipeline import Pipeline, run_stage

from conftest import fast_overrides

SPEC = DatasetSpec(name="t", classes=("ground", "red", "green", "blue"), background=None)


def _png(path, rgb):
    Image.fromarray(rgb).save(path)
    return path


def _raw(rgb, mask, seed):
    """A transform that returns its input untouched: what the dataset hands to augmentation."""
    return torch.from_numpy(rgb.copy()), None


def test_round2_input_is_round1_region_filled_with_the_mean_colour(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    b = np.zeros((4, 8, 3), np.uint8)
    b[:] = (30, 60, 90)
    samples = [Sample("a", _png(tmp_path / "a.png", a), None, (1, 2)), Sample("b", _png(tmp_path / "b.png", b), None, (3,))]
    # pixel-weighted mean of both images, by hand
    expect = np.rint((a.reshape(-1, 3).sum(0) + b.reshape(-1, 3).sum(0)) / (48 + 32)).astype(int)
    fill = mean_colour(samples)
    assert fill == tuple(expect.tolist())

    # round 1's maps of image a: class 1 peaks in rows 0-1 cols 0-2, class 2 in rows 4-5 cols 5-7; 0.8 and below stays
    maps = np.full((2, 6, 8), 0.3, np.float32)
    maps[0, 0:2, 0:3] = 1.0
    maps[1, 4:6, 5:8] = 0.9
    maps[1, 0, 7] = 0.8  # not above the threshold
    mined = tmp_path / "mined"
    mined.mkdir()
    save_maps(mined / "a.npz", maps, np.array([1, 2]), np.zeros(3))
    save_maps(mined / "b.npz", np.zeros((1, 4, 8), np.float32), np.array([3]), np.zeros(3))
    fractions = write_erase_masks(samples, mined, None, tmp_path / "r2", 0.8)
    region = np.zeros((6, 8), bool)
    region[0:2, 0:3] = True
    region[4:6, 5:8] = True  # both classes of the multi-label image
    assert np.array_equal(load_erase_mask(tmp_path / "r2" / "a.png"), region)
    assert fractions == {"a": region.mean(), "b": 0.0}

    erase = ErasedInputs(tmp_path / "r2", fill)
    ds = ClassificationDataset(samples, SPEC, _raw, image_filter=erase)
    got = ds[(0, 0)]["image"].numpy()
    assert (got[region] == np.array(fill, np.uint8)).all()
    assert np.array_equal(got[~region], a[~region])  # untouched elsewhere
    assert np.array_equal(ds[(1, 0)]["image"].numpy(), b)  # nothing mined: nothing erased
    # the mining pass sees the same erased image, normalised
    torch.testing.assert_close(InferenceDataset(samples, SPEC, erase)[0]["image"], to_tensor(got))

    # round 3 erases the union of round 2's mask and round 2's own region
    maps3 = np.zeros((2, 6, 8), np.float32)
    maps3[0, 2:4, 0:2] = 1.0
    mined3 = tmp_path / "mined3"
    mined3.mkdir()
    save_maps(mined3 / "a.npz", maps3, np.array([1, 2]), np.zeros(3))
    save_maps(mined3 / "b.npz", np.zeros((1, 4, 8), np.float32), np.array([3]), np.zeros(3))
    write_erase_masks(samples, mined3, tmp_path / "r2", tmp_path / "r3", 0.8)
    region3 = region.copy()
    region3[2:4, 0:2] = True
    assert np.array_equal(load_erase_mask(tmp_path / "r3" / "a.png"), region3)


def test_erase_mask_of_another_size_is_an_error(tmp_path):
    img = _png(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.ones((5, 4), bool)).save(tmp_path / "masks" / "a.png")
    ds = ClassificationDataset([Sample("a", img, None, (1,))], SPEC, _raw, ErasedInputs(tmp_path / "masks", (0, 0, 0)))
    with pytest.raises(DataError, match="5x4"):
        ds[(0, 0)]


def test_erase_region_and_summary_flag_a_fully_erased_image():
    maps = np.zeros((2, 3, 4), np.float32)
    maps[0, :, :2] = 0.95
    maps[1, :, 2:] = 0.85
    assert erase_region(maps, 0.8).all()  # two classes cover the whole image between them
    assert not erase_region(maps, 0.9)[:, 2:].any()
    assert erase_region(np.zeros((0, 3, 4)), 0.5).shape == (3, 4)
    s = erase_summary({"x": 1.0, "y": 0.25, "z": 0.5}, 0.9)
    assert s["dropped"] == ["x"] and s["over_erased"] == 1
    assert s["fraction_mean"] == pytest.approx(0.5833, abs=1e-4) and s["fraction_max"] == 1.0


def test_union_is_the_per_class_max_of_the_rounds():
    r1 = np.array([[[0.2, 1.0]], [[1.0, 0.1]]], np.float32)  # classes 3 and 5
    r2 = np.array([[[0.7, 0.4]]], np.float32)  # class 3 only
    r3 = np.array([[[0.0, 0.6]], [[0.9, 0.9]]], np.float32)  # classes 5 and 7
    maps, classes = union_maps([(r1, np.array([3, 5])), (r2, np.array([3])), (r3, np.array([5, 7]))])
    assert classes.tolist() == [3, 5, 7]
    np.testing.assert_array_equal(maps[:, 0], np.array([[0.7, 1.0], [1.0, 0.6], [0.9, 0.9]], np.float32))


def test_options_are_validated_and_maps_must_be_max_normalised(fast_cfg):
    with pytest.raises(ConfigError, match="rounds, erase_threshold, max_erased_fraction"):
        build_method("adv_erase", {"drop_rate": 0.5})
    with pytest.raises(ConfigError, match="erase_threshold"):
        build_method("adv_erase", {"erase_threshold": 1.5})
    with pytest.raises(ConfigError, match="rounds"):
        build_method("adv_erase", {"rounds": 0})
    with pytest.raises(ConfigError, match="maps.normalize=max"):  # when the config is loaded
        fast_cfg(**{"method.name": "adv_erase", "maps.normalize": "minmax"})


def _mtimes(paths):
    return {p: p.stat().st_mtime_ns for p in paths}


def _records(d, *names):
    return [json.loads((d / n / "stage.json").read_text()) for n in names]


def test_one_command_runs_every_round_and_a_rerun_reuses_them(toy_root, tmp_path, capsys):
    args = fast_overrides(toy_root, tmp_path / "runs", **{
        "name": "ae", "method.name": "adv_erase", "method.options.rounds": 2, "method.options.erase_threshold": 0.5,
        "train.epochs": 1, "seg.enabled": False, "maps.flip": False, "maps.splits": "[train, val]"})
    assert main(["run", _cfg_file(tmp_path), *args]) == 0
    d = tmp_path / "runs" / "ae"
    for r in ("cls", "cls_r2"):
        assert (d / r / "model.pt").exists()
    assert all(r["complete"] for r in _records(d, "mined_r1", "mined_r2"))
    train_ids = (toy_root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert sorted(p.stem for p in (d / "cls_r2" / "erase").glob("*.png")) == sorted(train_ids)

    # the per-round report: each round's record, carried into metrics.json
    r1, r2, m2 = _records(d, "cls", "cls_r2", "mined_r2")
    assert r1["round"] == 1 and "erase" not in r1
    assert r2["erase"]["images"] == len(train_ids)
    assert r2["images"] == len(train_ids) - r2["erase"]["over_erased"]
    assert m2["train_map_scores"]["union"] is not None
    stages = json.loads((d / "metrics.json").read_text())["stages"]
    assert stages["cls_r2"]["erase"] == r2["erase"] and stages["mined_r2"]["role"] == "mining"

    # the round-2 classifier trained on the erased images: its mined maps were taken on them too
    i = train_ids[0]
    erase = load_erase_mask(d / "cls_r2" / "erase" / f"{i}.png")
    m1 = load_maps(d / "mined_r1" / f"{i}.npz")
    assert np.array_equal(erase, (m1["maps"] > 0.5).any(0))
    # union maps: per-class max of the rounds (train: the mined maps; val: the chain run by the maps stage)
    for split, dirs in (("train", [d / "mined_r1", d / "mined_r2"]),
                        ("val", [d / "maps" / "rounds" / "val" / f"r{k}" / "maps" for k in (1, 2)])):
        for f in sorted((d / "maps" / split).glob("*.npz")):
            u = load_maps(f)
            parts = [load_maps(x / f.name) for x in dirs]
            maps, classes = union_maps([(p["maps"], p["classes"]) for p in parts])
            np.testing.assert_array_equal(u["maps"], maps)
            np.testing.assert_array_equal(u["classes"], classes)
            np.testing.assert_array_equal(u["scores"], parts[0]["scores"])  # round 1, on the unerased image
    assert (d / "maps" / "rounds" / "val" / "r2" / "erase").is_dir()

    before = _mtimes([d / "cls" / "model.pt", d / "cls_r2" / "model.pt", *sorted((d / "maps" / "val").glob("*.npz")),
                      *sorted((d / "mined_r2").glob("*.npz"))])
    capsys.readouterr()
    assert main(["maps", _cfg_file(tmp_path), *args]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert _mtimes(before) == before  # nothing retrained or re-extracted


def _cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    return str(p)


class _Killed(Exception):
    pass


def test_over_erased_image_dropped_and_killed_round_resumes(fast_cfg, caplog):
    fast = {"method.name": "adv_erase", "train.epochs": 1, "maps.flip": False}
    ctx = RunContext(fast_cfg(name="ae", **{**fast, "method.options.rounds": 1}))
    run_stage(ctx, "mined_r1")
    d = ctx.run_dir
    assert not (d / "cls_r2").exists()
    r1_mtime = (d / "cls" / "model.pt").stat().st_mtime_ns

    # round 1 "found" the whole of one image: round 2 must not train on its blank remains
    victim = ctx.reader.samples("train")[2]
    path = d / "mined_r1" / f"{victim.id}.npz"
    m = load_maps(path)
    save_maps(path, np.ones_like(m["maps"]), m["classes"], m["scores"])

    def kill_in_round_2(epoch):
        if (d / "cls_r2" / "last.ckpt").exists():
            raise _Killed

    two = RunContext(fast_cfg(name="ae", **{**fast, "method.options.rounds": 2}), after_epoch=kill_in_round_2)
    with caplog.at_level(logging.WARNING, logger="wsss.stages"), pytest.raises(_Killed):
        run_stage(two, "cls_r2")
    assert victim.id in caplog.text and "dropped" in caplog.text
    assert (d / "cls_r2" / "last.ckpt").exists() and not (d / "cls_r2" / "model.pt").exists()
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == r1_mtime

    stage = run_stage(RunContext(two.cfg), "cls_r2")
    assert stage.dir == (d / "cls_r2").resolve() and stage.complete
    assert (d / "cls" / "model.pt").stat().st_mtime_ns == r1_mtime  # round 1 reused (rounds is not in its key)
    assert load_erase_mask(d / "cls_r2" / "erase" / f"{victim.id}.png").all()
    info = stage.info()
    assert info["erase"]["dropped"] == [victim.id] and info["erase"]["fraction_max"] == 1.0
    n_labelled = sum(1 for s in ctx.reader.samples("train") if s.labels)
    assert info["images"] == n_labelled - 1
    assert json.loads((d / "cls_r2" / "summary.json").read_text())["images"] == n_labelled - 1


def test_a_killed_round_resumes_to_the_uninterrupted_result(fast_cfg):
    """Bit for bit in fp32: round 2 killed after its first epoch and resumed ends where an uninterrupted run ends."""
    fast = {"method.name": "adv_erase", "method.options.rounds": 2, "train.epochs": 2, "maps.flip": False}
    whole = RunContext(fast_cfg(name="whole", **fast))
    run_stage(whole, "cls_r2")

    def kill(epoch):
        if (cut.run_dir / "cls_r2" / "last.ckpt").exists():
            raise _Killed

    cut = RunContext(fast_cfg(name="cut", **fast), after_epoch=kill)
    with pytest.raises(_Killed):
        run_stage(cut, "cls_r2")
    run_stage(RunContext(cut.cfg), "cls_r2")
    a = torch.load(whole.run_dir / "cls_r2" / "model.pt", weights_only=True)["model"]
    b = torch.load(cut.run_dir / "cls_r2" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_keys(fast_cfg):
    base = Pipeline(RunContext(fast_cfg()))
    ae = Pipeline(RunContext(fast_cfg(**{"method.name": "adv_erase", "method.options.rounds": 2})))
    assert base.order == ["cls", "maps", "pseudo", "seg", "pred", "eval"]
    assert ae.order == ["cls", "mined_r1", "cls_r2", "mined_r2", "maps", "pseudo", "seg", "pred", "eval"]
    assert ae.key("cls") != base.key("cls")  # the method's name is part of round 1
    # round 1 does not depend on the method's options or the map settings; later rounds do
    other = Pipeline(RunContext(fast_cfg(**{"method.name": "adv_erase", "method.options.rounds": 3,
                                            "method.options.erase_threshold": 0.6, "maps.flip": False})))
    assert other.key("cls") == ae.key("cls")
    assert other.key("mined_r1") != ae.key("mined_r1")  # maps.flip
    assert other.key("cls_r2") != ae.key("cls_r2") and other.key("maps") != ae.key("maps")
    same_maps = Pipeline(RunContext(fast_cfg(**{"method.name": "adv_erase", "method.options.rounds": 3})))
    assert same_maps.key("cls_r2") == ae.key("cls_r2")  # more rounds keep the earlier ones
    assert same_maps.key("maps") != ae.key("maps")
