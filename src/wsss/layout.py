"""Where everything of a run lives: the one module that spells out the run directory's folder and file names.

Every other module (stages, evaluation, report, benchmarks) asks a :class:`RunLayout` for paths::

    <run>/config.yaml          the resolved config of the latest command (every default written out)
    <run>/.lock                held while a command writes into the run (see wsss.runs.RunLock)
    <run>/cls/                 classifier: model.pt, last.ckpt (resume), log.jsonl, summary.json
    <run>/maps/<split>/        localization maps, one .npz per image
    <run>/pseudo/<split>/      pseudo masks, palette PNG (255 = ignore)
    <run>/seg/                 segmentation network
    <run>/pred/<split>/        predictions of the segmentation network alone
    <run>/metrics.json         every number the run measured (the latest evaluation)
    <run>/metrics/<key>.json   every evaluation, by the keys of the stage variants it scored
    <run>/store/<stage>/<key>/ every variant of every stage (settings hash); <run>/<stage> links to the latest used
    <run>/report/index.html    the HTML report
    <run>/bench.json           peak memory of the invocations, when made by `wsss bench methods`

A multi-round recipe adds stage folders of its own (e.g. ``cls_r2``), and so does a refiner that declares a stage
(``irn/``, ``psa/``: the affinity network trained on the run's maps, its confident regions ``labels/``); each stage
folder holds ``stage.json``, its key and completion record (wsss.runs.Stage).
"""

from __future__ import annotations

from pathlib import Path

#: the stage names of the standard pipeline (wsss.stages.pipeline declares their order); also their folder names
CLS = "cls"
MAPS = "maps"
PSEUDO = "pseudo"
SEG = "seg"
PRED = "pred"
EVAL = "eval"


class RunLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def metrics_variant(self, key: str) -> Path:
        """metrics.json of one combination of stage variants (every evaluation is kept; ``metrics.json`` is the
        latest)."""
        return self.root / "metrics" / f"{key}.json"

    @property
    def store(self) -> Path:
        """Every variant of every stage: ``store/<stage>/<key>/``; ``<run>/<stage>`` links to the latest one used."""
        return self.root / "store"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def bench(self) -> Path:
        """``wsss bench``'s per-run record (peak memory over the invocations that made the run)."""
        return self.root / "bench.json"

    @property
    def report(self) -> Path:
        return self.root / "report" / "index.html"

    def stage(self, name: str) -> Path:
        """The folder of stage ``name``."""
        return self.root / name

    def stage_record(self, name: str) -> Path:
        return self.stage(name) / "stage.json"

    def split(self, stage: str, split: str) -> Path:
        """Per-image outputs of a stage for one split (maps, pseudo masks, predictions)."""
        return self.stage(stage) / split

    def map_file(self, split: str, image_id: str) -> Path:
        return self.split(MAPS, split) / f"{image_id}.npz"

    def pseudo_mask(self, split: str, image_id: str) -> Path:
        return self.split(PSEUDO, split) / f"{image_id}.png"

    def prediction(self, split: str, image_id: str) -> Path:
        return self.split(PRED, split) / f"{image_id}.png"


__all__ = ["CLS", "EVAL", "MAPS", "PRED", "PSEUDO", "SEG", "RunLayout"]
