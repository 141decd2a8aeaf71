"""Dataset readers on tiny fixtures built in tmp_path, plus the real MSRC-21 copy in ../shared/data when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.config.schema import DataConfig
from wsss.data.prepare import prepare
from wsss.data.readers import CocoReader, FolderReader, VocReader, open_dataset
from wsss.errors import ConfigError, DataError

H, W = 6, 8
MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"


def write_jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0] * 256)
    img.save(path)


def mask_with(*regions: tuple[int, slice, slice], fill: int = 0) -> np.ndarray:
    m = np.full((H, W), fill, dtype=np.uint8)
    for value, ys, xs in regions:
        m[ys, xs] = value
    return m


def make_voc(root: Path, masks: dict[str, np.ndarray], splits: dict[str, list[str]],
             aug: dict[str, np.ndarray] | None = None, dataset_json: dict | None = None) -> Path:
    for k, i in enumerate(sorted(set(masks) | set(aug or {}) | {i for ids in splits.values() for i in ids})):
        write_jpeg(root / "JPEGImages" / f"{i}.jpg", seed=k)
    for i, m in masks.items():
        write_mask(root / "SegmentationClass" / f"{i}.png", m)
    for i, m in (aug or {}).items():
        write_mask(root / "SegmentationClassAug" / f"{i}.png", m)
    seg = root / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (seg / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    if dataset_json is not None:
        (root / "dataset.json").write_text(json.dumps(dataset_json))
    return root


# -- VOC layout ----------------------------------------------------------------------------------------------------
@pytest.fixture
def voc_root(tmp_path):
    return make_voc(
        tmp_path / "voc",
        masks={
            # person (15) on background, with a void border
            "a": mask_with((15, slice(1, 4), slice(2, 6)), (255, slice(0, 1), slice(None))),
            # aeroplane (1) and cat (8)
            "b": mask_with((1, slice(0, 3), slice(None)), (8, slice(4, 6), slice(0, 2))),
        },
        # c has no VOC mask, only an SBD one: car (7)
        aug={"c": mask_with((7, slice(2, 5), slice(1, 3)))},
        splits={"train": ["a", "b", "c"], "val": ["b"]},
    )


def test_voc_labels_from_masks(voc_root):
    reader = open_dataset(DataConfig(root=str(voc_root), format="voc"))
    assert isinstance(reader, VocReader)
    assert reader.spec.num_classes == 21 and reader.spec.background == 0
    samples = {s.id: s for s in reader.samples("train")}
    assert samples["a"].labels == (15,)  # background and 255 excluded
    assert samples["b"].labels == (1, 8)
    assert samples["a"].image == voc_root / "JPEGImages" / "a.jpg"
    assert samples["a"].mask == voc_root / "SegmentationClass" / "a.png"


def test_voc_uses_sbd_mask_when_voc_has_none(voc_root):
    reader = open_dataset(DataConfig(root=str(voc_root), format="voc"))
    c = next(s for s in reader.samples("train") if s.id == "c")
    assert c.mask == voc_root / "SegmentationClassAug" / "c.png"
    assert c.labels == (7,)
    m = reader.load_mask(c)
    assert m[3, 1] == 7 and m[0, 0] == 0


def test_voc_missing_split_names_path_and_available_splits(voc_root):
    reader = open_dataset(DataConfig(root=str(voc_root), format="voc"))
    with pytest.raises(DataError) as e:
        reader.samples("train_aug")
    msg = str(e.value)
    assert str(voc_root / "ImageSets" / "Segmentation" / "train_aug.txt") in msg
    assert "train, val" in msg


def test_missing_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(DataConfig(root=str(tmp_path / "nowhere")))


# -- data.to_background ----------------------------------------------------------------------------------------------
NO_BG = {"name": "fields", "classes": ["grass", "cow", "sky"], "background": None}


@pytest.fixture
def fields_root(tmp_path):
    return make_voc(
        tmp_path / "fields",
        masks={
            # sky on top, grass below, a cow in the middle, one void pixel
            "p": mask_with((2, slice(0, 2), slice(None)), (1, slice(2, 5), slice(3, 6)), (255, slice(5, 6), slice(0, 1)),
                           fill=0),
            "q": mask_with((2, slice(0, 3), slice(None)), fill=0),  # only stuff
        },
        splits={"train": ["p", "q"]},
        dataset_json=NO_BG,
    )


def test_no_background_spec_without_remap(fields_root):
    reader = open_dataset(DataConfig(root=str(fields_root)))
    assert reader.spec.classes == ("grass", "cow", "sky") and reader.spec.background is None
    labels = {s.id: s.labels for s in reader.samples("train")}
    assert labels == {"p": (0, 1, 2), "q": (0, 2)}  # every class is foreground, 255 excluded


def test_to_background_remaps_spec_masks_and_labels(fields_root):
    reader = open_dataset(DataConfig(root=str(fields_root), to_background=["grass", "sky"]))
    assert reader.spec.classes == ("background", "cow")
    assert reader.spec.background == 0 and reader.spec.fg_names == ("cow",)
    samples = {s.id: s for s in reader.samples("train")}
    assert samples["p"].labels == (1,)
    assert samples["q"].labels == ()
    m = reader.load_mask(samples["p"])
    raw = np.asarray(Image.open(fields_root / "SegmentationClass" / "p.png"))
    expected = np.select([raw == 1, raw == 255], [1, 255], default=0)
    np.testing.assert_array_equal(m, expected)
    assert m[3, 4] == 1 and m[0, 0] == 0 and m[4, 0] == 0 and m[5, 0] == 255


def test_to_background_unknown_class_names_it_and_lists_classes(fields_root):
    with pytest.raises(ConfigError) as e:
        open_dataset(DataConfig(root=str(fields_root), to_background=["grass", "sheep"]))
    msg = str(e.value)
    assert "'sheep'" in msg and "grass, cow, sky" in msg


# -- COCO ----------------------------------------------------------------------------------------------------------
def coco_json() -> dict:
    """2 images of 8x6; categories listed out of id order (person=1, bicycle=2, car=3 after sorting by id)."""
    from pycocotools import mask as mask_utils

    car = np.zeros((H, W), dtype=np.uint8)
    car[1:3, 2:4] = 1  # small car inside the person's box, compressed RLE
    car_rle = mask_utils.encode(np.asfortranarray(car))
    car_rle["counts"] = car_rle["counts"].decode()
    # crowd of people on image 2: columns 5..7, all rows, uncompressed column-major RLE
    crowd_counts = [5 * H, 3 * H]
    return {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": H, "width": W},
            {"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "height": H, "width": W},
        ],
        "categories": [
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
        ],
        "annotations": [
            # listed small-first: painting in file order would hide the car under the person
            {"id": 10, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 4.0, "segmentation": car_rle,
             "bbox": [2, 1, 2, 2]},
            {"id": 11, "image_id": 7, "category_id": 1, "iscrowd": 0, "area": 20.0, "bbox": [0, 0, 5, 4],
             "segmentation": [[0.0, 0.0, 5.0, 0.0, 5.0, 4.0, 0.0, 4.0]]},
            {"id": 12, "image_id": 3, "category_id": 2, "iscrowd": 0, "area": 6.0, "bbox": [0, 2, 3, 2],
             "segmentation": [[0.0, 2.0, 3.0, 2.0, 3.0, 4.0, 0.0, 4.0]]},
            {"id": 13, "image_id": 3, "category_id": 1, "iscrowd": 1, "area": 18.0, "bbox": [5, 0, 3, 6],
             "segmentation": {"counts": crowd_counts, "size": [H, W]}},
        ],
    }


def make_coco(root: Path, split: str = "train2014", data: dict | None = None) -> Path:
    data = data or coco_json()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    for k, img in enumerate(data["images"]):
        write_jpeg(root / split / img["file_name"], seed=k)
    return root


def test_coco_labels_from_json_and_masks_after_prepare(tmp_path):
    root = make_coco(tmp_path / "coco")
    cfg = DataConfig(root=str(root), format="coco", train_split="train2014", val_split=None, test_split=None)
    reader = open_dataset(cfg)
    assert isinstance(reader, CocoReader)
    assert reader.spec.classes == ("background", "person", "bicycle", "car")
    samples = {s.id: s for s in reader.samples("train2014")}
    assert samples["COCO_train2014_000000000007"].labels == (1, 3)
    assert samples["COCO_train2014_000000000003"].labels == (2,)  # the crowd of people is not a label
    assert all(s.mask is None for s in samples.values())
    with pytest.raises(DataError, match="no ground-truth mask"):
        reader.load_mask(samples["COCO_train2014_000000000007"])

    prepare("coco", root)
    reader = open_dataset(cfg)
    samples = {s.id: s for s in reader.samples("train2014")}
    s7, s3 = samples["COCO_train2014_000000000007"], samples["COCO_train2014_000000000003"]
    assert s7.mask == root / "SegmentationClass" / "train2014" / "COCO_train2014_000000000007.png"
    m7, m3 = reader.load_mask(s7), reader.load_mask(s3)
    assert m7.shape == (H, W)
    assert m7[1, 2] == 3 and m7[2, 3] == 3  # car, painted over the larger person
    assert m7[0, 0] == 1 and m7[3, 1] == 1  # person
    assert m7[5, 7] == 0  # background
    assert m3[3, 1] == 2 and (m3[:, 5:] == 255).all() and m3[0, 0] == 0


def test_coco_missing_annotations_file(tmp_path):
    root = make_coco(tmp_path / "coco")
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(root=str(root), format="coco", train_split="train2017"))
    assert str(root / "annotations" / "instances_train2017.json") in str(e.value)


# -- folder + CSV ------------------------------------------------------------------------------------------------------
def make_folder(root: Path, csv_text: str, images=("x.jpg", "y.jpg")) -> Path:
    for k, name in enumerate(images):
        write_jpeg(root / "images" / name, seed=k)
    (root / "labels.csv").write_text(csv_text)
    return root


def test_folder_reader_infers_spec_with_background(tmp_path):
    root = make_folder(tmp_path / "pets", "image,labels\nx.jpg,dog;cat\ny.jpg,dog\n")
    reader = open_dataset(DataConfig(root=str(root), format="folder"))
    assert isinstance(reader, FolderReader)
    assert reader.spec.classes == ("background", "cat", "dog") and reader.spec.background == 0
    samples = {s.id: s for s in reader.samples("train")}
    assert samples["x"].labels == (1, 2) and samples["y"].labels == (2,)
    assert samples["x"].image == root / "images" / "x.jpg" and samples["x"].mask is None
    # without a split column, every image is in every split
    assert [s.id for s in reader.samples("val")] == ["x", "y"]


def test_folder_reader_split_column(tmp_path):
    root = make_folder(tmp_path / "pets", "image,labels,split\nx.jpg,cat,train\ny.jpg,dog,val\n")
    reader = open_dataset(DataConfig(root=str(root), format="folder"))
    assert [s.id for s in reader.samples("train")] == ["x"]
    with pytest.raises(DataError, match="no images in split 'test'.*train, val"):
        reader.samples("test")


def test_folder_reader_unknown_class_names_csv_line(tmp_path):
    root = make_folder(tmp_path / "pets", "image,labels\nx.jpg,cat\ny.jpg,dog;bird\n")
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "cat", "dog"], "background": "background"}))
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(root=str(root), format="folder"))
    msg = str(e.value)
    assert f"{root / 'labels.csv'}, line 3" in msg and "'bird'" in msg and "background, cat, dog" in msg


# -- the real MSRC-21 ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not MSRC.is_dir(), reason=f"{MSRC} not present")
def test_msrc21_reader():
    reader = open_dataset(DataConfig(root=str(MSRC)))
    assert isinstance(reader, VocReader)
    assert reader.spec.num_classes == 21 and reader.spec.background is None
    assert reader.spec.classes[:3] == ("building", "grass", "tree")
    sizes = {split: len(reader.samples(split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 273, "val": 58, "test": 260}
    for split, i in (("train", "12_20_s"), ("val", "17_12_s")):
        s = next(s for s in reader.samples(split) if s.id == i)
        values = np.unique(np.asarray(Image.open(MSRC / "SegmentationClass" / f"{i}.png"))).tolist()
        expected = tuple(v for v in values if v != 255)
        assert len(expected) >= 3
        assert s.labels == expected


# -- dataset specs: values that used to be accepted silently -----------------------------------------------------------
def _spec_file(tmp_path, **spec) -> Path:
    p = tmp_path / "dataset.json"
    p.write_text(json.dumps({"classes": ["grass", "cow", "sky"], **spec}))
    return p


@pytest.mark.parametrize("bg", [True, False, 1.0, ["grass"]])
def test_spec_background_must_be_named(tmp_path, bg):
    from wsss.data.spec import spec_from_json

    p = _spec_file(tmp_path, background=bg)
    with pytest.raises(DataError) as e:
        spec_from_json(p)
    assert str(p) in str(e.value) and "'background' must be the background class's name" in str(e.value)


def test_spec_background_by_name_index_or_null(tmp_path):
    from wsss.data.spec import spec_from_json

    assert spec_from_json(_spec_file(tmp_path, background="sky")).background == 2
    assert spec_from_json(_spec_file(tmp_path, background=0)).background == 0
    assert spec_from_json(_spec_file(tmp_path, background=None)).background is None
    with pytest.raises(DataError, match="background 'skye' is not in classes. Did you mean 'sky'"):
        spec_from_json(_spec_file(tmp_path, background="skye"))
    with pytest.raises(DataError, match="index 3 is out of range"):
        spec_from_json(_spec_file(tmp_path, background=3))


@pytest.mark.parametrize("palette,message", [
    ([[0, 0, 0], [255, 0, 0]], "'palette' has 2 colours for 3 classes"),
    ([0, 0, 0, 255, 0, 0, 0, 255, 0], "'palette' must be a list of \\[r, g, b\\] colours"),
    ([[0, 0, 0], [255, 0], [0, 0, 255]], "'palette' must be a list"),
    ([[0, 0, 0], [256, 0, 0], [0, 0, 255]], "integers 0..255"),
])
def test_spec_palette_checked(tmp_path, palette, message):
    from wsss.data.spec import spec_from_json

    p = _spec_file(tmp_path, background=None, palette=palette)
    with pytest.raises(DataError, match=message) as e:
        spec_from_json(p)
    assert str(p) in str(e.value)


def test_spec_object_refuses_bool_background_and_short_palette():
    from wsss.data.spec import DatasetSpec

    with pytest.raises(DataError, match="background must be a class index or None, got True"):
        DatasetSpec(name="x", classes=("a", "b"), background=True)
    with pytest.raises(DataError, match="palette has 1 colours for 2 classes"):
        DatasetSpec(name="x", classes=("a", "b"), background=None, palette=((0, 0, 0),))


def test_spec_classes_and_ignore_index_checked(tmp_path):
    from wsss.data.spec import spec_from_json

    with pytest.raises(DataError, match="'classes' must be a list of names"):
        spec_from_json(_spec_file(tmp_path, classes=["a", 3]))
    with pytest.raises(DataError, match="'ignore_index' must be an integer in 3..255"):
        spec_from_json(_spec_file(tmp_path, ignore_index=True))


# -- split files and label CSVs ----------------------------------------------------------------------------------------
def test_voc_ids_are_whole_lines(tmp_path):
    root = make_voc(tmp_path / "v", masks={"a b": mask_with((15, slice(1, 4), slice(2, 6)))}, splits={"train": ["a b"]})
    seg = root / "ImageSets" / "Segmentation" / "train.txt"
    seg.write_bytes(b"a b\r\n\r\n")  # CRLF and a blank line
    reader = open_dataset(DataConfig(root=str(root)))
    (s,) = reader.samples("train")
    assert s.id == "a b" and s.image == root / "JPEGImages" / "a b.jpg" and s.labels == (15,)


def test_labels_csv_typo_names_line_and_nearest_class(tmp_path):
    root = make_folder(tmp_path / "pets", "image,labels\nx.jpg,cat\n\ny.jpg,dgo;cat\n")
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "cat", "dog"], "background": "background"}))
    with pytest.raises(DataError) as e:
        open_dataset(DataConfig(root=str(root), format="folder"))
    msg = str(e.value)
    assert f"{root / 'labels.csv'}, line 4" in msg and "'dgo'" in msg and "Did you mean 'dog'" in msg


def test_folder_without_class_list_warns_of_classes_of_one_image(tmp_path, caplog):
    csv_text = "image,labels\nx.jpg,dog;cat\ny.jpg,dog;cat\nz.jpg,dgo\n"
    root = make_folder(tmp_path / "pets", csv_text, images=("x.jpg", "y.jpg", "z.jpg"))
    with caplog.at_level("WARNING", logger="wsss.data"):
        reader = open_dataset(DataConfig(root=str(root), format="folder"))
    assert reader.spec.classes == ("background", "cat", "dgo", "dog")  # no class list: the name is taken as given
    warned = [r.getMessage() for r in caplog.records if r.name == "wsss.data"]
    assert len(warned) == 1 and "'dgo' (like 'dog')" in warned[0] and "'cat'" not in warned[0]
    assert str(root / "labels.csv") in warned[0]


def test_check_splits_names_the_missing_file_and_the_key(voc_root):
    from wsss.data.readers import check_splits

    cfg = DataConfig(root=str(voc_root), val_split="val", test_split="test")
    reader = open_dataset(cfg)
    check_splits(reader, ["train", "val"])  # roles, resolved through data.<role>_split
    check_splits(reader, ["train"])
    with pytest.raises(DataError) as e:
        check_splits(reader, ["train", "val", "test"])
    msg = str(e.value)
    assert str(voc_root / "ImageSets" / "Segmentation" / "test.txt") in msg and "data.test_split" in msg
    assert "splits found there: train, val" in msg and "data.test_split=null" in msg
    reader = open_dataset(DataConfig(root=str(voc_root), train_split="train_aug"))
    with pytest.raises(DataError, match="train_aug.txt does not exist.*set data.train_split to a split that exists"):
        check_splits(reader, ["train"])
    with pytest.raises(DataError, match="fix the setting that names it"):
        check_splits(reader, ["trainval"])


def test_check_splits_coco_and_folder(tmp_path):
    from wsss.data.readers import check_splits

    root = make_coco(tmp_path / "coco")
    reader = open_dataset(DataConfig(root=str(root), format="coco", train_split="train2014", val_split="val2014"))
    check_splits(reader, ["train"])
    with pytest.raises(DataError, match="instances_val2014.json do not exist.*data.val_split"):
        check_splits(reader, ["train", "val"])
    root = make_folder(tmp_path / "pets", "image,labels,split\nx.jpg,cat,train\ny.jpg,dog,val\n")
    reader = open_dataset(DataConfig(root=str(root), format="folder"))
    check_splits(reader, ["train", "val"])
    with pytest.raises(DataError, match="no images in split 'test'.*data.test_split"):
        check_splits(reader, ["test"])


def test_loader_workers_never_exceed_the_cores_this_process_may_use():
    import os

    from wsss.data.datasets import loader_workers

    cores = len(os.sched_getaffinity(0))
    assert loader_workers(0) == 0 and loader_workers(1) == 1
    assert loader_workers(cores + 6) == cores


@pytest.mark.parametrize("orientation, turned", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_gives_the_image_viewers_show(tmp_path, orientation, turned):
    from wsss.data.io import image_size, load_image, load_mask

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the stored image's left edge
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    shown = load_image(tmp_path / "photo.jpg")
    assert shown.shape[:2] == ((40, 20) if turned else (20, 40))
    assert image_size(tmp_path / "photo.jpg") == shown.shape[:2]  # the header size is the rotated one too
    # where the band ends up: 6 turns clockwise (band on top), 8 anticlockwise (band at the bottom), 3 by 180 degrees
    band = {1: np.s_[:, :10], 3: np.s_[:, -10:], 6: np.s_[:10, :], 8: np.s_[-10:, :]}[orientation]
    assert shown[band].mean() > 200 and shown.mean() < 100
    # a mask drawn on the image as shown fits it
    Image.fromarray(np.zeros(shown.shape[:2], np.uint8)).save(tmp_path / "mask.png")
    assert load_mask(tmp_path / "mask.png", 3, 255, image_size(tmp_path / "photo.jpg")).shape == shown.shape[:2]
