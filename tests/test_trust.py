"""Trust, as a hostile but realistic user tries it (the catalogue of README "What wsss refuses, and when"): a second
command on a busy run, settings that would fail only after training, files wsss did not write, damaged outputs, a
full disk, and one's own tagged images without masks. Each case ends in the right result or a clear error (exit
status 2) raised before anything already computed is touched. The resume cases are in test_train.py and
test_adv_erase.py; the config values accepted silently before are in test_config_load.py and test_readers.py."""

from __future__ import annotations

import csv
import errno
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.localize import load_maps
from wsss.runs import RunLock

from conftest import fast_overrides, make_voc_dataset


@pytest.fixture
def wsss(toy_root, tmp_path, capsys):
    """``wsss(command, **settings) -> (exit status, stderr)`` on the toy dataset, run ``t`` under tmp_path/runs."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")

    def call(command="run", **extra):
        capsys.readouterr()
        rc = main([command, str(cfg), *fast_overrides(toy_root, tmp_path / "runs", **extra)])
        return rc, capsys.readouterr().err

    call.run_dir = tmp_path / "runs" / "t"
    return call


def _mtime(path):
    return path.stat().st_mtime_ns


def test_a_second_command_on_a_busy_run_refuses_and_writes_nothing(wsss):
    run = wsss.run_dir
    with RunLock(run / ".lock"):  # another command holds the run
        rc, err = wsss("run", **{"train.epochs": 1})
    assert rc == 2 and "in use by another wsss command" in err and "pid" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # not even config.yaml
    rc, _ = wsss("train-cls", **{"train.epochs": 1})  # released: the same command now runs
    assert rc == 0 and (run / "cls" / "model.pt").exists()


@pytest.mark.parametrize("setting, named", [
    ({"model.backbone": "resnet5"}, "model.backbone"),
    ({"maps.scales": "[]"}, "maps.scales"),
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"data.limit": -1}, "data.limit"),
    ({"maps.localizer": "gradcam"}, "grad_cam"),
    ({"pseudo.refiners": "[crff]"}, "crf"),
])
def test_a_bad_setting_fails_at_load_and_the_trained_run_is_untouched(wsss, setting, named):
    assert wsss("train-cls", **{"train.epochs": 1})[0] == 0
    model = wsss.run_dir / "cls" / "model.pt"
    before = _mtime(model)
    rc, err = wsss("predict", **{"train.epochs": 1, **setting})
    assert rc == 2 and named in err
    assert _mtime(model) == before and sorted(p.name for p in (wsss.run_dir / "cls").iterdir()) == [
        "last.ckpt", "log.jsonl", "model.pt", "stage.json", "summary.json"]


def test_missing_pretrained_weights_offline_fail_before_the_classifier_is_replaced(wsss, monkeypatch):
    from wsss.models import backbones

    assert wsss("train-cls", **{"train.epochs": 1})[0] == 0
    before = _mtime(wsss.run_dir / "cls" / "model.pt")
    monkeypatch.setattr(backbones, "_reachable", lambda *a, **k: False)  # offline, whatever this machine is
    monkeypatch.setenv("TORCH_HOME", str(wsss.run_dir.parent / "empty-hub"))
    rc, err = wsss("train-cls", **{"train.epochs": 1, "model.backbone": "resnet18", "model.pretrained": True})
    assert rc == 2 and "resnet18" in err and "weights_file" in err
    assert _mtime(wsss.run_dir / "cls" / "model.pt") == before


def test_files_wsss_did_not_write_are_refused_never_deleted(wsss):
    notes = wsss.run_dir / "cls" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my notes")
    rc, err = wsss("train-cls", **{"train.epochs": 1})
    assert rc == 2 and "notes.txt" in err and "did not write" in err
    assert notes.read_text() == "my notes"
    notes.unlink()
    assert wsss("train-cls", **{"train.epochs": 1})[0] == 0
    # a finished stage with a user's file in it, whose settings then change: the new variant is computed beside
    # it, and the old one, the user's file with it, is kept -- by `wsss gc` too (it holds a file wsss did not write)
    notes.write_text("my notes")
    model = wsss.run_dir / "cls" / "model.pt"
    first = model.resolve()
    before = _mtime(first)
    assert wsss("train-cls", **{"train.epochs": 2})[0] == 0
    assert model.resolve() != first and not notes.exists()  # <run>/cls is the new variant
    assert (first.parent / "notes.txt").read_text() == "my notes" and _mtime(first) == before
    assert main(["gc", str(wsss.run_dir), "--yes"]) == 0
    assert (first.parent / "notes.txt").exists() and first.exists()


def test_a_damaged_map_file_is_recomputed_on_resume_and_named_when_read(wsss, caplog):
    assert wsss("maps", **{"train.epochs": 1, "maps.splits": "[train, val]"})[0] == 0
    maps = wsss.run_dir / "maps"
    victim = sorted((maps / "val").glob("*.npz"))[0]
    good = load_maps(victim)
    # a kill left the stage unfinished, and a file damaged (truncated) outside a normal kill
    record = json.loads((maps / "stage.json").read_text())
    (maps / "stage.json").write_text(json.dumps({"key": record["key"], "complete": False}))
    victim.write_bytes(victim.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="wsss.stages"):
        rc, _ = wsss("maps", **{"train.epochs": 1, "maps.splits": "[train, val]"})
    assert rc == 0 and victim.name in caplog.text and "recomputing" in caplog.text
    assert json.loads((maps / "stage.json").read_text())["splits"]["val"]["computed"] == 1
    np.testing.assert_array_equal(load_maps(victim)["maps"], good["maps"])
    # damaged after the stage finished: the stage reading it names the file
    train_file = sorted((maps / "train").glob("*.npz"))[0]
    train_file.write_bytes(b"")
    rc, err = wsss("pseudo", **{"train.epochs": 1, "maps.splits": "[train, val]"})
    assert rc == 2 and train_file.name in err and "damaged map file" in err


@pytest.mark.parametrize("case", ["missing val.txt", "predict split typo", "corrupt test image"])
def test_what_would_fail_after_training_fails_before_it(wsss, toy_root, case):
    extra = {"train.epochs": 1}
    if case == "missing val.txt":
        (toy_root / "ImageSets" / "Segmentation" / "val.txt").unlink()
        expect = "val.txt"
    elif case == "predict split typo":
        extra["seg.predict_split"] = "tset"
        expect = "tset"
    else:
        bad = (toy_root / "ImageSets" / "Segmentation" / "test.txt").read_text().split()[0]
        (toy_root / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        expect = f"{bad}.jpg"
    rc, err = wsss("run", **extra)
    assert rc == 2 and expect in err
    assert not (wsss.run_dir / "cls").exists()  # nothing was trained


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_unwritable_is_a_clear_error_and_keeps_finished_work(wsss, monkeypatch, error):
    from wsss.stages import maps as maps_stage

    assert wsss("train-cls", **{"train.epochs": 1})[0] == 0

    def full(*args, **kwargs):
        raise OSError(error, "No space left on device" if error == errno.ENOSPC else "Permission denied",
                      str(wsss.run_dir / "maps" / "train" / "x.npz"))

    monkeypatch.setattr(maps_stage, "save_maps", full)
    rc, err = wsss("maps", **{"train.epochs": 1})
    assert rc == 2 and "x.npz" in err and ("free some disk space" in err or "writable" in err)
    assert "resume" in err and (wsss.run_dir / "cls" / "model.pt").exists()


def _folder_dataset(voc, root):
    """The README's "your own tagged images": photos + labels.csv with a split column, no masks, no dataset.json."""
    names = json.loads((voc / "dataset.json").read_text())["classes"]
    (root / "photos").mkdir(parents=True)
    rows = []
    for split in ("train", "val", "test"):
        for i in (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            shutil.copy(voc / "JPEGImages" / f"{i}.jpg", root / "photos" / f"{i}.jpg")
            m = np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))
            rows.append((f"photos/{i}.jpg", ";".join(sorted({names[c] for c in np.unique(m) if c not in (0, 255)})),
                         split))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "labels", "split"])
        w.writerows(rows)
    return root


def test_own_tagged_images_without_masks_run_to_the_end(tmp_path, capsys):
    root = _folder_dataset(make_voc_dataset(tmp_path / "voc"), tmp_path / "mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    args = fast_overrides(root, tmp_path / "runs", **{"data.format": "folder", "train.epochs": 1,
                                                      "pseudo.refiners": "[crf]", "crf.workers": 0})
    assert main(["run", str(cfg), *args]) == 0
    out = capsys.readouterr()
    run = tmp_path / "runs" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"]["chosen_on"].startswith("default")
    assert "pseudo" not in metrics and "seg" not in metrics and "maps" not in metrics["splits"]["test"]
    assert "no ground-truth masks" in out.out  # one line saying why the scores are missing
    train_ids = [p.stem for p in (root / "photos").glob("*.jpg")]
    assert len(list((run / "pseudo" / "train").glob("*.png"))) == 8
    assert len(list((run / "pred" / "test").glob("*.png"))) == 4 and len(train_ids) == 16
