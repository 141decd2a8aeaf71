"""``wsss prepare`` (wsss.data.prepare) on tiny VOC, MSRC-like and COCO fixtures built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config.schema import DataConfig
from wsss.data.prepare import prepare
from wsss.data.readers import open_dataset
from wsss.errors import DataError

H, W = 6, 8
MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"


def write_jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def write_mask(path: Path, value: int, fill: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.full((H, W), fill, dtype=np.uint8)
    m[2:4, 3:6] = value
    m[0, :] = 255
    img = Image.fromarray(m, mode="P")
    img.putpalette([0, 0, 0] * 256)
    img.save(path)


def make_voc(root: Path, train=("t1", "t2", "t3"), val=("v1", "v2"), aug=("t1", "v1", "s1", "s2")) -> Path:
    """VOC with SBD: train/val with VOC masks; SegmentationClassAug overlaps both and adds s1, s2."""
    for k, i in enumerate(sorted(set(train) | set(val) | set(aug or ()))):
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", seed=k)
    for k, i in enumerate(list(train) + list(val)):
        write_mask(root / "SegmentationClass" / f"{i}.png", value=1 + k)
    for k, i in enumerate(aug or ()):
        write_mask(root / "SegmentationClassAug" / f"{i}.png", value=10 + k)
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (seg / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def test_voc_builds_train_aug_without_val_ids(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    report = prepare("voc", root)
    path = root / "ImageSets" / "Segmentation" / "train_aug.txt"
    assert path.read_text().split() == ["s1", "s2", "t1", "t2", "t3"]
    assert "train_aug: 5 ids" in report and "train: 3 ids" in report and "val: 2 ids" in report
    # the reader then serves it, with SBD masks where VOC has none
    reader = open_dataset(DataConfig(root=str(root)))
    samples = {s.id: s for s in reader.samples("train_aug")}
    assert samples["s1"].mask == root / "SegmentationClassAug" / "s1.png"
    assert samples["t2"].mask == root / "SegmentationClass" / "t2.png"
    assert samples["s2"].labels == (13,) and samples["t2"].labels == (2,)
    # rerunning is idempotent
    prepare("voc", root)
    assert path.read_text().split() == ["s1", "s2", "t1", "t2", "t3"]


def test_voc_check_only_writes_nothing(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    report = prepare("voc", root, write=False)
    assert "train_aug: 5 ids" in report
    assert not (root / "ImageSets" / "Segmentation" / "train_aug.txt").exists()


def test_voc_without_sbd_says_how_to_get_it(tmp_path):
    root = make_voc(tmp_path / "VOC2012", aug=None)
    report = prepare("voc", root)
    assert "train_aug: cannot be built" in report and "SegmentationClassAug" in report
    assert not (root / "ImageSets" / "Segmentation" / "train_aug.txt").exists()


def test_prepare_empty_folder_names_missing_folders(tmp_path):
    with pytest.raises(DataError) as e:
        prepare("voc", tmp_path)
    msg = str(e.value)
    assert f"missing: {tmp_path / 'JPEGImages'}/" in msg
    assert str(tmp_path / "ImageSets" / "Segmentation") in msg
    assert "VOCtrainval_11-May-2012.tar" in msg


def test_prepare_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        prepare("voc", tmp_path / "nowhere")


def test_voc_missing_image_and_mask_are_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    (root / "JPEGImages" / "v2.jpg").unlink()
    (root / "SegmentationClass" / "t3.png").unlink()
    with pytest.raises(DataError) as e:
        prepare("voc", root, write=False)
    msg = str(e.value)
    assert str(root / "JPEGImages" / "v2.jpg") in msg
    assert str(root / "SegmentationClass" / "t3.png") in msg


def test_msrc_checks_spec_splits_and_mask_values(tmp_path):
    root = make_voc(tmp_path / "msrc", aug=None)
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("t1\n")
    spec = {"classes": [f"c{i}" for i in range(21)], "background": None, "splits": {"train": 3, "val": 2, "test": 1}}
    (root / "dataset.json").write_text(json.dumps(spec))
    report = prepare("msrc", root)
    assert "21 classes" in report and "test: 1 ids" in report and "mask values checked" in report
    # a mask value beyond the 21 classes is named with its file
    write_mask(root / "SegmentationClass" / "v1.png", value=30)
    with pytest.raises(DataError) as e:
        prepare("msrc", root)
    assert str(root / "SegmentationClass" / "v1.png") in str(e.value) and "[30]" in str(e.value)


def test_msrc_requires_dataset_json_and_test_split(tmp_path):
    root = make_voc(tmp_path / "msrc", aug=None)
    with pytest.raises(DataError) as e:
        prepare("msrc", root)
    msg = str(e.value)
    assert str(root / "dataset.json") in msg and str(root / "ImageSets" / "Segmentation" / "test.txt") in msg


@pytest.mark.skipif(not MSRC.is_dir(), reason=f"{MSRC} not present")
def test_real_msrc21_passes_the_check():
    report = prepare("msrc", MSRC, write=False)
    assert "train: 273 ids, 273 images, 273 masks" in report
    assert "val: 58 ids" in report and "test: 260 ids" in report and report.endswith("ok")


# -- COCO ----------------------------------------------------------------------------------------------------------
def coco_fixture(root: Path) -> Path:
    """train2014: 2 images (a polygon person under a compressed-RLE car; a polygon bicycle beside an uncompressed-RLE
    crowd of people); val2014: 1 image with no annotation."""
    from pycocotools import mask as mask_utils

    car = np.zeros((H, W), dtype=np.uint8)
    car[1:3, 2:4] = 1
    car_rle = mask_utils.encode(np.asfortranarray(car))
    car_rle["counts"] = car_rle["counts"].decode()
    cats = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]
    train = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": H, "width": W},
                   {"id": 2, "file_name": "b.jpg", "height": H, "width": W}],
        "categories": cats,
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 4, "segmentation": car_rle},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 20,
             "segmentation": [[0, 0, 5, 0, 5, 4, 0, 4]]},
            {"id": 12, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 6,
             "segmentation": [[0, 2, 3, 2, 3, 4, 0, 4]]},
            {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 18,
             "segmentation": {"counts": [5 * H, 3 * H], "size": [H, W]}},
        ],
    }
    val = {"images": [{"id": 5, "file_name": "c.jpg", "height": H, "width": W}], "categories": cats,
           "annotations": []}
    (root / "annotations").mkdir(parents=True)
    for split, data in (("train2014", train), ("val2014", val)):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for k, img in enumerate(data["images"]):
            write_jpeg(root / split / img["file_name"], seed=k)
    return root


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "P"
        return np.asarray(img)


def test_coco_builds_class_masks(tmp_path):
    root = coco_fixture(tmp_path / "coco")
    report = prepare("coco", root)
    assert "train2014: 2 images" in report and "val2014: 1 images" in report
    assert "1 images with no annotation" in report and "masks: 2 written" in report
    a = read_png(root / "SegmentationClass" / "train2014" / "a.png")
    b = read_png(root / "SegmentationClass" / "train2014" / "b.png")
    c = read_png(root / "SegmentationClass" / "val2014" / "c.png")
    assert a.shape == (H, W)
    # classes: person=1, bicycle=2, car=3 (categories sorted by id)
    assert a[1, 2] == 3 and a[2, 3] == 3  # the small car stays visible on the person painted first
    assert a[0, 0] == 1 and a[3, 4] == 1 and a[1, 1] == 1
    assert a[5, 7] == 0 and a[1, 6] == 0
    assert (a == 3).sum() == 4
    assert b[3, 1] == 2 and b[0, 0] == 0
    assert (b[:, 5:] == 255).all() and not (b[:, :5] == 255).any()  # crowd region ignored
    assert (c == 0).all()


def test_coco_resumes_and_check_only(tmp_path):
    root = coco_fixture(tmp_path / "coco")
    report = prepare("coco", root, write=False)
    assert "2 to build" in report and not (root / "SegmentationClass").exists()
    prepare("coco", root)
    a = root / "SegmentationClass" / "train2014" / "a.png"
    a.write_bytes(b"kept")  # an existing mask is not rebuilt
    (root / "SegmentationClass" / "train2014" / "b.png").unlink()
    report = prepare("coco", root)
    assert "1 written, 1 already present" in report
    assert a.read_bytes() == b"kept"
    assert (root / "SegmentationClass" / "train2014" / "b.png").is_file()


def test_coco_missing_annotations_and_image_folder(tmp_path):
    with pytest.raises(DataError) as e:
        prepare("coco", tmp_path)
    assert str(tmp_path / "annotations") in str(e.value) and "cocodataset.org" in str(e.value)
    root = coco_fixture(tmp_path / "coco")
    for f in (root / "val2014").iterdir():
        f.unlink()
    (root / "val2014").rmdir()
    with pytest.raises(DataError) as e:
        prepare("coco", root)
    assert f"{root / 'val2014'}/" in str(e.value)


def test_coco_unknown_category_names_json(tmp_path):
    root = coco_fixture(tmp_path / "coco")
    path = root / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        prepare("coco", root)
    assert str(path) in str(e.value) and "99" in str(e.value)


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="unknown dataset format"):
        prepare("cityscapes", tmp_path)
