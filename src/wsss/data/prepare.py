"""``wsss prepare``: check a downloaded dataset's layout and build the files the readers need.

What each format checks (and, unless ``write=False``, builds):

``voc``
    PASCAL VOC 2012 at ROOT: the folders ``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/`` and
    the split files ``train.txt`` and ``val.txt``. Every id of every split file must have ``JPEGImages/<id>.jpg``;
    ids of ``train``, ``val`` and ``trainval`` must also have ``SegmentationClass/<id>.png`` (``train_aug``: there
    or in ``SegmentationClassAug/``). The values of a few
    masks are checked (class indices or 255, same size as the image). If SBD's ``SegmentationClassAug/`` (the SBD
    masks converted to VOC PNGs, as used by DeepLab, PSA and IRN) is present, ``ImageSets/Segmentation/train_aug.txt``
    is built: the ids with an SBD mask or in VOC train, minus the VOC val ids (and minus ids without a JPEG),
    sorted; 10,582 ids for the full data.
``msrc``
    MSRC-21 in VOC layout: the same folders, ``dataset.json`` (must load as a dataset spec; its optional ``splits``
    counts are compared with the split files), split files ``train``, ``val``, ``test``, all with images and masks,
    and the values of a few masks of each split.
``coco``
    COCO 2014 or 2017: ``annotations/instances_<split>.json`` for ``train2014``/``val2014`` (or ``train2017``/
    ``val2017``) and the image folder ``ROOT/<split>/`` of each split found. Builds the class-index masks the COCO
    reader scores against, ``SegmentationClass/<split>/<file stem>.png``: 0 = background, category = 1 + its
    position among the categories sorted by id, 255 = crowd regions. Annotations are painted largest first, so a
    small object drawn over a large one (or over a crowd region) stays visible. Masks that already exist are
    skipped, so an interrupted run resumes.

Missing folders or annotation files raise :class:`~wsss.errors.DataError` before anything is written; missing or
broken individual files raise it after the checks (and after building what could be built), naming the first few
files at fault together with the report.

Once the layout is sound, the report ends with the label check of the training split (:mod:`wsss.data.label_check`:
per class, the share of training images labelled with it and its share of the pixels, and a warning naming the
classes on nearly every image, which image-level labels cannot localize); VOC's is ``train_aug`` where it exists,
COCO's each ``train*`` split. The thresholds are the defaults of the ``label_check`` config section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wsss.config.schema import DataConfig, LabelCheckConfig
from wsss.data.io import image_size, load_mask, save_mask_png
from wsss.data.label_check import check_labels, format_check
from wsss.data.readers import Sample, coco_spec, open_dataset
from wsss.data.spec import VOC_SPEC, DatasetSpec, spec_from_json
from wsss.errors import DataError
from wsss.runs import atomic_write_text

#: how many missing files are named per check
SHOW = 5
#: how many masks per split have their values checked
MASKS_CHECKED = 3

VOC_HOWTO = (
    "Get PASCAL VOC 2012: download VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
    "and extract it; ROOT is the VOCdevkit/VOC2012 folder inside."
)
SBD_HOWTO = (
    "To train on the usual 10,582-image train_aug split, download the SBD masks converted to VOC PNGs "
    "(SegmentationClassAug.zip, the archive used by DeepLab, PSA and IRN: "
    "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip), unzip it so that "
    "{root}/SegmentationClassAug/<id>.png exist, and rerun `wsss prepare voc {root}`."
)
MSRC_HOWTO = (
    "MSRC-21 in VOC layout holds JPEGImages/<id>.jpg, SegmentationClass/<id>.png, "
    "ImageSets/Segmentation/{train,val,test}.txt and dataset.json (class names, background: null); "
    "the copy in ../shared/data/msrc21 has this layout (see its README.md)."
)
COCO_HOWTO = (
    "Get COCO 2014 from https://cocodataset.org/#download: train2014.zip, val2014.zip and "
    "annotations_trainval2014.zip, unzipped into ROOT so that ROOT/train2014/, ROOT/val2014/ and "
    "ROOT/annotations/instances_train2014.json exist (2017 works the same way)."
)
COCO_SPLITS = ("train2014", "val2014", "train2017", "val2017")


def prepare(fmt: str, root: str | Path, write: bool = True) -> str:
    """Check the dataset at ``root`` (``fmt``: voc, msrc or coco), build derived files when ``write``, and
    return a multi-line report. Raises :class:`DataError` naming what is missing and how to get it."""
    root = Path(root)
    if fmt == "voc":
        return _prepare_voc(root, write, msrc=False)
    if fmt == "msrc":
        return _prepare_voc(root, write, msrc=True)
    if fmt == "coco":
        return _prepare_coco(root, write)
    raise DataError(f"prepare: unknown dataset format '{fmt}' (voc, msrc or coco)")


# -- helpers --------------------------------------------------------------------------------------------------------
def _missing_error(root: Path, missing: list[str], howto: str) -> DataError:
    lines = "\n".join(f"  missing: {m}" for m in missing)
    return DataError(f"{root} is not a usable dataset root:\n{lines}\n{howto}")


def _first(items: list, n: int = SHOW) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _read_ids(path: Path) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            ids.append(line.split()[0])
    return ids


def _check_masks(root: Path, ids: list[str], spec: DatasetSpec, problems: list[str]) -> int:
    """Load a few masks with full validation (mode, size, values); returns how many were checked."""
    n = 0
    for i in ids[:MASKS_CHECKED]:
        img, mask = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        if not (img.is_file() and mask.is_file()):
            continue
        try:
            load_mask(mask, spec.num_classes, spec.ignore_index, image_size(img))
        except DataError as e:
            problems.append(str(e))
        n += 1
    return n


def _label_check(samples, spec: DatasetSpec, load, split: str) -> list[str]:
    """The label check's report lines; a mask it cannot read (prepare checks only a few, and keeps masks it finds)
    is named, and the pixel shares are left out."""
    c = LabelCheckConfig()
    note = []
    try:
        record = check_labels(samples, spec, load, split=split, common_fraction=c.common_fraction,
                              refuse_fraction=c.refuse_fraction)
    except DataError as e:
        note = [f"  warning: pixel shares not measured, a mask cannot be read: {e}"]
        record = check_labels(samples, spec, None, split=split, common_fraction=c.common_fraction,
                              refuse_fraction=c.refuse_fraction)
    return ["  " + line for line in format_check(record)] + note


# -- VOC / MSRC-21 ---------------------------------------------------------------------------------------------------
def _prepare_voc(root: Path, write: bool, msrc: bool) -> str:
    howto = MSRC_HOWTO if msrc else VOC_HOWTO
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder. {howto}")
    seg = root / "ImageSets" / "Segmentation"
    required = ("train", "val", "test") if msrc else ("train", "val")
    missing = [str(root / d) + "/" for d in ("JPEGImages", "SegmentationClass") if not (root / d).is_dir()]
    if not seg.is_dir():
        missing.append(str(seg) + "/")
    else:
        missing += [str(seg / f"{s}.txt") for s in required if not (seg / f"{s}.txt").is_file()]
    if msrc and not (root / "dataset.json").is_file():
        missing.append(str(root / "dataset.json"))
    if missing:
        raise _missing_error(root, missing, howto)

    spec = VOC_SPEC
    lines = [f"{'MSRC-21' if msrc else 'PASCAL VOC 2012'} layout at {root}"]
    expected_sizes: dict = {}
    if (root / "dataset.json").is_file():
        spec = spec_from_json(root / "dataset.json")  # raises a DataError naming the file
        lines.append(f"  dataset.json: {spec.num_classes} classes, background: "
                     f"{'none' if spec.background is None else spec.classes[spec.background]}")
        expected_sizes = json.loads((root / "dataset.json").read_text()).get("splits") or {}
        if not isinstance(expected_sizes, dict):
            expected_sizes = {}

    problems: list[str] = []
    splits = sorted(p.stem for p in seg.glob("*.txt"))
    aug_dir = root / "SegmentationClassAug"
    if not msrc and aug_dir.is_dir():
        splits = [s for s in splits if s != "train_aug"]  # rebuilt below
    ids_of: dict[str, list[str]] = {}
    for split in splits:
        ids = _read_ids(seg / f"{split}.txt")
        ids_of[split] = ids
        if not ids:
            problems.append(f"{seg / f'{split}.txt'} lists no images")
            continue
        no_img = [str(root / "JPEGImages" / f"{i}.jpg") for i in ids if not (root / "JPEGImages" / f"{i}.jpg").is_file()]
        needs_mask = msrc or split in ("train", "val", "trainval", "train_aug")
        line = f"  {split}: {len(ids)} ids, {len(ids) - len(no_img)} images"
        if needs_mask:
            mask_dirs = ("SegmentationClass", "SegmentationClassAug") if split == "train_aug" else ("SegmentationClass",)
            no_mask = [str(root / "SegmentationClass" / f"{i}.png") for i in ids
                       if not any((root / d / f"{i}.png").is_file() for d in mask_dirs)]
            line += f", {len(ids) - len(no_mask)} masks"
            if no_mask:
                problems.append(f"split {split}: {len(no_mask)} masks missing: {_first(no_mask)}")
        lines.append(line)
        if no_img:
            problems.append(f"split {split}: {len(no_img)} images missing: {_first(no_img)}")
        if split in expected_sizes and expected_sizes[split] != len(ids):
            problems.append(f"{seg / f'{split}.txt'} lists {len(ids)} ids but {root / 'dataset.json'} "
                            f"says {expected_sizes[split]}")
        if needs_mask:
            n = _check_masks(root, ids, spec, problems)
            if n:
                lines.append(f"    mask values checked on {n} images")

    if not msrc:
        lines += _train_aug(root, seg, aug_dir, ids_of, write)

    if problems:
        raise DataError(f"{root}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems)
                        + "\n" + "\n".join(lines))
    train = "train_aug" if (seg / "train_aug.txt").is_file() else "train"
    reader = open_dataset(DataConfig(root=str(root)))  # the spec read above: dataset.json, else VOC's
    lines += _label_check(reader.samples(train), reader.spec, reader.load_mask, train)
    lines.append("  ok")
    return "\n".join(lines)


def _train_aug(root: Path, seg: Path, aug_dir: Path, ids_of: dict[str, list[str]], write: bool) -> list[str]:
    out_path = seg / "train_aug.txt"
    if not aug_dir.is_dir():
        return [f"  train_aug: cannot be built, {aug_dir}/ does not exist.", "    " + SBD_HOWTO.format(root=root)]
    aug_ids = {p.stem for p in aug_dir.glob("*.png")}
    val = set(ids_of.get("val", []))
    ids = (aug_ids | set(ids_of.get("train", []))) - val
    no_img = sorted(i for i in ids if not (root / "JPEGImages" / f"{i}.jpg").is_file())
    ids = sorted(ids - set(no_img))
    lines = [f"  SegmentationClassAug: {len(aug_ids)} masks"]
    if no_img:
        lines.append(f"    {len(no_img)} of its ids have no JPEG and are left out of train_aug: {_first(no_img)}")
    if not ids:
        lines.append("  train_aug: no ids left (SegmentationClassAug and train hold only val ids?); not written")
        return lines
    if write:
        atomic_write_text(out_path, "\n".join(ids) + "\n")
        lines.append(f"  train_aug: {len(ids)} ids written to {out_path}")
    else:
        lines.append(f"  train_aug: {len(ids)} ids (check only, {out_path} not written)")
    return lines


# -- COCO --------------------------------------------------------------------------------------------------------------
def _ann_to_mask(ann: dict, h: int, w: int, where: str) -> np.ndarray | None:
    """Binary HxW mask of one annotation (polygons, uncompressed or compressed RLE), as COCO's annToMask."""
    from pycocotools import mask as mask_utils

    segm = ann.get("segmentation")
    try:
        if isinstance(segm, list):
            # polygons of fewer than 3 points are degenerate (and a 4-number one would be read as a box)
            polys = [p for p in segm if len(p) >= 6]
            if not polys:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, h, w)
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
            rle = segm
        else:
            raise DataError(f"{where}: annotation {ann.get('id')} has no polygon or RLE segmentation")
        m = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"{where}: cannot decode the segmentation of annotation {ann.get('id')}: {e}") from None
    if m.shape[:2] != (h, w):
        raise DataError(f"{where}: annotation {ann.get('id')} is {m.shape[1]}x{m.shape[0]} (WxH) "
                        f"but its image is {w}x{h}")
    return m


def coco_class_mask(img: dict, anns: list[dict], cat_to_idx: dict[int, int], ignore_index: int = 255,
                    where: str = "COCO") -> np.ndarray:
    """Class-index mask of one COCO image: 0 background, category indices, ``ignore_index`` on crowd regions;
    annotations are painted in order of decreasing area so that small objects stay visible."""
    h, w = int(img["height"]), int(img["width"])
    out = np.zeros((h, w), dtype=np.uint8)
    layers = []
    for ann in anns:
        if ann["category_id"] not in cat_to_idx:
            raise DataError(f"{where}: annotation {ann.get('id')} has category {ann['category_id']}, "
                            "which is not in 'categories'")
        m = _ann_to_mask(ann, h, w, where)
        if m is None:
            continue
        m = m.astype(bool)
        value = ignore_index if ann.get("iscrowd", 0) else cat_to_idx[ann["category_id"]]
        layers.append((int(m.sum()), value, m))
    for _, value, m in sorted(layers, key=lambda t: -t[0]):
        out[m] = value
    return out


def _prepare_coco(root: Path, write: bool) -> str:
    from tqdm import tqdm

    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder. {COCO_HOWTO}")
    ann_dir = root / "annotations"
    found = [s for s in COCO_SPLITS if (ann_dir / f"instances_{s}.json").is_file()]
    if not found:
        wanted = ", ".join(str(ann_dir / f"instances_{s}.json") for s in COCO_SPLITS[:2])
        raise _missing_error(root, [f"{ann_dir}/" if not ann_dir.is_dir() else wanted + " (or the 2017 ones)"],
                             COCO_HOWTO)
    no_dir = [f"{root / s}/ (images of {ann_dir / f'instances_{s}.json'})" for s in found if not (root / s).is_dir()]
    if no_dir:
        raise _missing_error(root, no_dir, COCO_HOWTO)

    lines = [f"COCO layout at {root}"]
    problems: list[str] = []
    for split in found:
        json_path = ann_dir / f"instances_{split}.json"
        try:
            data = json.loads(json_path.read_text())
        except ValueError as e:
            raise DataError(f"{json_path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
            raise DataError(f"{json_path}: not a COCO instances file (needs 'images' and 'categories' lists)")
        spec, cat_to_idx = coco_spec(data["categories"])
        anns_of: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
        for ann in data.get("annotations", []):
            if ann.get("image_id") in anns_of:
                anns_of[ann["image_id"]].append(ann)
        images = sorted(data["images"], key=lambda d: d["file_name"])
        no_ann = sum(1 for img in images if not anns_of[img["id"]])
        no_file = [str(root / split / img["file_name"]) for img in images if not (root / split / img["file_name"]).is_file()]
        lines.append(f"  {split}: {len(images)} images ({len(images) - len(no_file)} found in {root / split}/), "
                     f"{len(spec.classes) - 1} categories, {no_ann} images with no annotation")
        if no_file:
            problems.append(f"split {split}: {len(no_file)} images missing: {_first(no_file)}")

        mask_dir = root / "SegmentationClass" / split
        todo = [img for img in images if not (mask_dir / f"{Path(img['file_name']).stem}.png").is_file()]
        done = len(images) - len(todo)
        if not write:
            lines.append(f"    masks: {done} present, {len(todo)} to build (check only, nothing written)")
        else:
            palette = spec.palette_bytes()
            for img in tqdm(todo, desc=f"masks {split}", unit="img", dynamic_ncols=True):
                mask = coco_class_mask(img, anns_of[img["id"]], cat_to_idx, spec.ignore_index,
                                       where=f"{json_path}, image {img['file_name']}")
                save_mask_png(mask_dir / f"{Path(img['file_name']).stem}.png", mask, palette)
            lines.append(f"    masks: {len(todo)} written, {done} already present, in {mask_dir}/")
        if split.startswith("train"):  # pixel shares from the masks that exist
            samples = []
            for img in images:
                m = mask_dir / f"{Path(img['file_name']).stem}.png"
                labels = {cat_to_idx[a["category_id"]] for a in anns_of[img["id"]] if not a.get("iscrowd", 0)}
                samples.append(Sample(Path(img["file_name"]).stem, root / split / img["file_name"],
                                      m if m.is_file() else None, tuple(sorted(labels))))
            lines += _label_check(samples, spec, lambda s, spec=spec: load_mask(s.mask, spec.num_classes, spec.ignore_index),
                                  split)

    if problems:
        raise DataError(f"{root}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems)
                        + "\n" + "\n".join(lines))
    lines.append("  ok")
    return "\n".join(lines)
