"""Dataset readers: PASCAL VOC layout (also MSRC-21 and VOC + SBD), COCO instances JSON, a folder + CSV of labels.

Each reader turns a split name into a list of :class:`Sample` (image path, optional mask path, image-level labels).
Image-level labels come from a label file where one exists (COCO's JSON, the folder CSV, or ``data.labels_csv`` for
any format) and otherwise from the masks. Labels are mask class indices of the (possibly remapped) spec, background
excluded. Training stages only ever see the labels; masks are read for scoring.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss.config.schema import DataConfig
from wsss.data.io import image_size, load_mask
from wsss.data.spec import VOC_SPEC, DatasetSpec, spec_from_json
from wsss.errors import ConfigError, DataError

log = logging.getLogger("wsss.data")


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path | None
    #: mask class indices present in the image (background excluded); None until resolved
    labels: tuple[int, ...] | None = None


def _split_names(folder: Path, suffix: str = ".txt") -> list[str]:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        avail = _split_names(path.parent)
        raise DataError(
            f"split file {path} does not exist"
            + (f"; splits found there: {', '.join(avail)}" if avail else f"; the folder {path.parent} has no split files")
        )
    ids = []
    # one id per line, taken whole: an id may contain spaces (only the line end is stripped; blank lines are skipped)
    for line in path.read_text().split("\n"):
        line = line.rstrip("\r")
        if line.strip():
            ids.append(line)
    if not ids:
        raise DataError(f"split file {path} lists no images")
    return ids


class Reader:
    """Base: resolves labels (from a label file or masks) and the remapping of classes to background."""

    def __init__(self, root: Path, spec: DatasetSpec, cfg: DataConfig):
        self.root = root
        self.base_spec = spec
        self.spec, self.lut = spec.remap_to_background(cfg.to_background)
        self.cfg = cfg
        self._csv_labels = self._read_labels_csv(Path(cfg.labels_csv)) if cfg.labels_csv else None
        self._cache: dict[str, list[Sample]] = {}

    # -- to implement -------------------------------------------------------------------------------------------
    def _raw_samples(self, split: str) -> list[Sample]:
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        """Raise :class:`DataError` naming the file if ``split`` cannot be read; cheap (no image, mask or label is
        read). Default: list the split."""
        self._raw_samples(split)

    # -- shared ---------------------------------------------------------------------------------------------------
    def _read_labels_csv(self, path: Path) -> dict[str, tuple[int, ...]]:
        """CSV rows ``image,labels`` with labels separated by ';' (names of the base spec)."""
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        if not path.is_file():
            raise DataError(f"labels CSV {path} does not exist")
        out: dict[str, tuple[int, ...]] = {}
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames or "labels" not in reader.fieldnames:
                raise DataError(f"{path}: needs a header row with columns 'image' and 'labels' (got {reader.fieldnames})")
            for row in reader:
                names = [n.strip() for n in (row["labels"] or "").replace(",", ";").split(";") if n.strip()]
                idx = []
                for n in names:
                    if n not in self.base_spec.classes:
                        close = difflib.get_close_matches(n, self.base_spec.classes, n=1)
                        hint = f" Did you mean '{close[0]}'?" if close else ""
                        raise DataError(
                            f"{path}, line {reader.line_num}: unknown class '{n}' for image '{row['image']}'.{hint} "
                            f"Classes of dataset '{self.base_spec.name}': {', '.join(self.base_spec.classes)}"
                        )
                    idx.append(self.base_spec.classes.index(n))
                out[Path(row["image"]).stem] = tuple(idx)
        return out

    def _remap_labels(self, raw: tuple[int, ...]) -> tuple[int, ...]:
        mapped = {int(self.lut[c]) for c in raw}
        mapped.discard(self.spec.ignore_index)
        if self.spec.background is not None:
            mapped.discard(self.spec.background)
        return tuple(sorted(mapped))

    def _labels_from_mask(self, s: Sample) -> tuple[int, ...]:
        try:
            hw = image_size(s.image)
        except DataError:
            hw = None  # an unreadable image is reported, with its name, by the stage that loads it
        mask = load_mask(s.mask, self.base_spec.num_classes, self.base_spec.ignore_index, hw, self.lut)
        vals = set(np.unique(mask).tolist())
        vals.discard(self.spec.ignore_index)
        if self.spec.background is not None:
            vals.discard(self.spec.background)
        return tuple(sorted(vals))

    def samples(self, split: str) -> list[Sample]:
        """Samples of a split with labels resolved. Images without any label are kept here (the training
        dataset skips them with a warning) so that scoring still covers the whole split."""
        if split in self._cache:
            return self._cache[split]
        raw = self._raw_samples(split)
        if self.cfg.limit is not None:
            raw = raw[: self.cfg.limit]
        todo = []
        out: list[Sample | None] = []
        for s in raw:
            if self._csv_labels is not None and s.id in self._csv_labels:
                out.append(Sample(s.id, s.image, s.mask, self._remap_labels(self._csv_labels[s.id])))
            elif s.labels is not None:
                out.append(Sample(s.id, s.image, s.mask, self._remap_labels(s.labels)))
            elif s.mask is not None:
                todo.append(len(out))
                out.append(s)
            else:
                raise DataError(f"{s.image}: no image-level labels (not in a label file) and no mask to derive them from")
        if todo:
            with ThreadPoolExecutor(max_workers=4) as pool:
                labels = list(pool.map(lambda i: self._labels_from_mask(out[i]), todo))
            for i, lab in zip(todo, labels):
                s = out[i]
                out[i] = Sample(s.id, s.image, s.mask, lab)
        self._cache[split] = out  # type: ignore[assignment]
        return out  # type: ignore[return-value]

    def load_mask(self, s: Sample, hw: tuple[int, int] | None = None) -> np.ndarray:
        if s.mask is None:
            raise DataError(f"{s.image}: no ground-truth mask")
        return load_mask(s.mask, self.base_spec.num_classes, self.base_spec.ignore_index, hw, self.lut)


class VocReader(Reader):
    """PASCAL VOC 2012 layout: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
    ``ImageSets/Segmentation/<split>.txt``. SBD's ``SegmentationClassAug/<id>.png`` is used where VOC has no mask
    (``train_aug``, built by ``wsss prepare voc``). MSRC-21 in this repo's shared data uses the same layout."""

    def check_split(self, split: str) -> None:
        read_id_list(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")

    def _raw_samples(self, split: str) -> list[Sample]:
        ids = read_id_list(self.root / "ImageSets" / "Segmentation" / f"{split}.txt")
        out = []
        for i in ids:
            img = self.root / "JPEGImages" / f"{i}.jpg"
            mask = None
            for folder in ("SegmentationClass", "SegmentationClassAug"):
                p = self.root / folder / f"{i}.png"
                if p.is_file():
                    mask = p
                    break
            out.append(Sample(i, img, mask))
        return out


def coco_spec(categories: list[dict]) -> tuple[DatasetSpec, dict[int, int]]:
    """Background at 0, then COCO categories in id order; returns the spec and category id -> class index."""
    cats = sorted(categories, key=lambda c: c["id"])
    spec = DatasetSpec(name="coco", classes=("background",) + tuple(c["name"] for c in cats), background=0)
    return spec, {c["id"]: i + 1 for i, c in enumerate(cats)}


class CocoReader(Reader):
    """COCO 2014/2017: ``annotations/instances_<split>.json``, images in ``<split>/``; class masks (PNG, class index,
    255 on crowd regions) in ``SegmentationClass/<split>/<stem>.png`` once ``wsss prepare coco`` has built them."""

    def __init__(self, root: Path, spec: DatasetSpec | None, cfg: DataConfig):
        self._json: dict[str, dict] = {}
        if spec is None:
            first = self._load_json(root, cfg.train_split)
            spec, _ = coco_spec(first["categories"])
        super().__init__(root, spec, cfg)

    @staticmethod
    def _json_path(root: Path, split: str) -> Path:
        path = root / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise DataError(f"COCO annotations {path} do not exist (splits are named like train2014, val2014)")
        return path

    def check_split(self, split: str) -> None:
        self._json_path(self.root, split)  # the JSON itself is read (it can be large) when the split is

    def _load_json(self, root: Path, split: str) -> dict:
        if split not in self._json:
            path = self._json_path(root, split)
            try:
                self._json[split] = json.loads(path.read_text())
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON: {e}") from None
        return self._json[split]

    def _raw_samples(self, split: str) -> list[Sample]:
        data = self._load_json(self.root, split)
        _, cat_to_idx = coco_spec(data["categories"])
        labels: dict[int, set[int]] = {img["id"]: set() for img in data["images"]}
        for ann in data.get("annotations", []):
            if not ann.get("iscrowd", 0) and ann["image_id"] in labels:
                labels[ann["image_id"]].add(cat_to_idx[ann["category_id"]])
        out = []
        for img in sorted(data["images"], key=lambda d: d["file_name"]):
            stem = Path(img["file_name"]).stem
            mask = self.root / "SegmentationClass" / split / f"{stem}.png"
            out.append(Sample(stem, self.root / split / img["file_name"], mask if mask.is_file() else None,
                              tuple(sorted(labels[img["id"]]))))
        return out


class FolderReader(Reader):
    """A folder of images with a CSV of image-level labels (``image,labels[,split]``; labels separated by ';').
    Images are found relative to the root (or ``images/``); optional masks in ``masks/<stem>.png``. Without a
    ``split`` column, every image belongs to every split."""

    def __init__(self, root: Path, spec: DatasetSpec | None, cfg: DataConfig):
        self.csv_path = Path(cfg.labels_csv) if cfg.labels_csv else root / "labels.csv"
        if not self.csv_path.is_absolute() and not self.csv_path.exists():
            self.csv_path = root / self.csv_path
        if not self.csv_path.is_file():
            raise DataError(f"folder dataset: labels CSV {self.csv_path} does not exist (columns: image,labels[,split])")
        with self.csv_path.open(newline="") as f:
            self.rows = list(csv.DictReader(f))
        if spec is None:
            spec = self._infer_spec(root)
        cfg_for_base = DataConfig(**{**cfg.__dict__, "labels_csv": str(self.csv_path)})
        super().__init__(root, spec, cfg_for_base)

    def _infer_spec(self, root: Path) -> DatasetSpec:
        """Without dataset.json the classes are the names the CSV uses; a name used for one image only is likely a
        typo (which would become a class of its own), so those are named in a warning."""
        images: dict[str, set[str]] = {}
        for r in self.rows:
            for n in (r.get("labels") or "").replace(",", ";").split(";"):
                if n.strip():
                    images.setdefault(n.strip(), set()).add(str(r.get("image")))
        names = sorted(images)
        if len(self.rows) > 1:
            once = [n for n in names if len(images[n]) == 1]
            if once:
                def near(n: str) -> str:
                    close = difflib.get_close_matches(n, [m for m in names if m != n], n=1)
                    return f" (like '{close[0]}')" if close else ""

                log.warning("%s: class(es) used by one image only, typos?: %s. Without a dataset.json every name in "
                            "the CSV becomes a class; list the classes in %s (or data.spec) to have unknown names "
                            "refused", self.csv_path, ", ".join(f"'{n}'{near(n)}" for n in once),
                            root / "dataset.json")
        # tagged photos of objects: the rest of the image is background
        return DatasetSpec(name=root.name, classes=("background", *names), background=0)

    def check_split(self, split: str) -> None:
        self._rows_of(split)

    def _rows_of(self, split: str) -> list[dict]:
        has_split = self.rows and "split" in self.rows[0]
        rows = [r for r in self.rows if not has_split or r["split"] == split]
        if not rows:
            avail = sorted({r["split"] for r in self.rows}) if has_split else []
            raise DataError(f"{self.csv_path}: no images in split '{split}' (splits: {', '.join(avail) or 'none'})")
        return rows

    def _raw_samples(self, split: str) -> list[Sample]:
        rows = self._rows_of(split)
        out = []
        for r in rows:
            img = self.root / r["image"]
            if not img.exists() and (self.root / "images" / r["image"]).exists():
                img = self.root / "images" / r["image"]
            stem = Path(r["image"]).stem
            mask = self.root / "masks" / f"{stem}.png"
            out.append(Sample(stem, img, mask if mask.is_file() else None))
        return out


def open_dataset(cfg: DataConfig) -> Reader:
    """Build the reader named by ``cfg.format`` with its spec (``cfg.spec``, ``<root>/dataset.json`` or built-in)."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} does not exist. Set data.root=... (MSRC-21 / VOC layout, COCO root, or a folder "
            "with labels.csv); README.md, section 'Data', says how to get one."
        )
    spec: DatasetSpec | None = None
    if cfg.spec:
        spec = spec_from_json(cfg.spec)
    elif (root / "dataset.json").is_file():
        spec = spec_from_json(root / "dataset.json")
    if cfg.format == "voc":
        return VocReader(root, spec or VOC_SPEC, cfg)
    if cfg.format == "coco":
        return CocoReader(root, spec, cfg)
    if cfg.format == "folder":
        return FolderReader(root, spec, cfg)
    raise ConfigError(f"data.format: unknown reader '{cfg.format}'")  # pragma: no cover - schema rejects it


#: the roles of data splits, each named by the setting data.<role>_split
SPLIT_ROLES = ("train", "val", "test")


def check_splits(reader: Reader, names: Sequence[str]) -> None:
    """Raise :class:`DataError` for the first split of ``names`` that cannot be read (a missing split file, a COCO
    annotation file, a split of the folder CSV without rows), naming the file and the config key to fix; cheap, so
    that a run can check every split it will need before training. ``names``: split names, or the roles train /
    val / test, resolved through ``data.<role>_split`` as the stages do."""
    cfg = reader.cfg
    for name in names:
        if name in SPLIT_ROLES:
            split = getattr(cfg, f"{name}_split") or name
            keys = [f"data.{name}_split"]
        else:
            split = name
            keys = [f"data.{r}_split" for r in SPLIT_ROLES if getattr(cfg, f"{r}_split") == name]
        try:
            reader.check_split(split)
        except DataError as e:
            if keys:
                nullable = [k for k in keys if k != "data.train_split"]
                fix = (f"set {' / '.join(keys)} to a split that exists"
                       + (f" (or {nullable[0]}=null to go without it)" if nullable else ""))
            else:
                fix = ("fix the setting that names it (maps.splits, pseudo.split, eval.select_on or "
                       "seg.predict_split)")
            raise DataError(f"{e}; split '{split}' is needed by this config: {fix}") from None
