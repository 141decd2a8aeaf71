"""What every stage shares: the resolved config, the run directory, the dataset reader, and the stage keys.

A stage's key hashes exactly the settings that change its output (plus its inputs' keys), so changing e.g.
``maps.scales`` recomputes maps and everything after them but reuses the classifier. Settings that cannot change a
result (progress bars, loader workers, inference batch size) are left out of the keys.

Adversarial Erasing (``method.name=adv_erase``) trains a chain of classifiers: round 1 depends on the training
settings only (not on the method's options, so changing ``rounds`` or the thresholds keeps it), its train-split maps
("mined") also on the map settings, and round k on the mined maps of round k-1 and the erase options. ``cls_key`` is
then the last round's key, so the maps stage depends on every round.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property
from pathlib import Path

from wsss.config import Config, config_hash, dump_config
from wsss.data.readers import Reader, open_dataset
from wsss.data.spec import DatasetSpec
from wsss.methods.adv_erase import AdversarialErasing, AdversarialErasingOptions
from wsss.saliency import saliency_key

log = logging.getLogger("wsss")


def without(obj, *names: str) -> dict:
    d = dataclasses.asdict(obj)
    for n in names:
        d.pop(n, None)
    return d


class RunContext:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.runs_dir) / cfg.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")

    @cached_property
    def reader(self) -> Reader:
        return open_dataset(self.cfg.data)

    @property
    def spec(self) -> DatasetSpec:
        return self.reader.spec

    def split_name(self, split: str) -> str:
        """Maps a role (train / val / test) to the dataset's split name (data.<role>_split)."""
        names = {"train": self.cfg.data.train_split, "val": self.cfg.data.val_split, "test": self.cfg.data.test_split}
        return names.get(split) or split

    @cached_property
    def erasing(self) -> AdversarialErasingOptions | None:
        """The options of Adversarial Erasing when that is the method (validated here), else None."""
        if self.cfg.method.name != AdversarialErasing.name:
            return None
        return AdversarialErasing(self.cfg.method.options).options

    # -- stage keys ------------------------------------------------------------------------------------------------
    def cls_key(self) -> str:
        c = self.cfg
        if self.erasing is not None:
            return self.round_key(self.erasing.rounds)
        data = without(c.data, "workers", "val_split", "test_split")
        return config_hash(data, c.model, c.method, without(c.train, "progress"), c.seed)

    def round_key(self, k: int) -> str:
        """Adversarial Erasing: the classifier of round ``k`` (1-based)."""
        c = self.cfg
        if k == 1:
            data = without(c.data, "workers", "val_split", "test_split")
            return config_hash(data, c.model, {"name": c.method.name}, without(c.train, "progress"), c.seed, "round 1")
        e = self.erasing
        erase = {"erase_threshold": e.erase_threshold, "max_erased_fraction": e.max_erased_fraction}
        return config_hash(self.mined_key(k - 1), erase, f"round {k}")

    def mined_key(self, k: int) -> str:
        """Adversarial Erasing: round ``k``'s maps of the training split (on its erased inputs, image-level labels)."""
        return config_hash(self.round_key(k), self.mining_settings())

    def mining_settings(self) -> dict:
        """The map settings that shape a round's mined maps (labels are always the image-level labels there)."""
        return without(self.cfg.maps, "batch_size", "labels", "pred_threshold", "splits")

    def maps_key(self) -> str:
        c = self.cfg
        splits = [self.split_name(s) for s in c.maps.splits]
        return config_hash(self.cls_key(), without(c.maps, "batch_size"), splits)

    def pseudo_key(self) -> str:
        c = self.cfg
        crf = without(c.crf, "workers") if c.crf.enabled else {"enabled": False}
        if c.pseudo.method == "cam":  # keys of CAM pseudo masks made before pseudo.method existed stay valid
            return config_hash(self.maps_key(), without(c.pseudo, "method"), c.eval, crf)
        return config_hash(self.maps_key(), c.pseudo, c.eval, crf, saliency_key(c.saliency, c.crf.enabled))
