"""What every stage shares: the resolved config, the run directory's layout and the dataset reader.

The order of the stages, their inputs and their keys are declared in :mod:`wsss.stages.pipeline`, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from wsss.config import Config, split_name
from wsss.data.readers import Reader, open_dataset
from wsss.data.spec import DatasetSpec
from wsss.layout import RunLayout

log = logging.getLogger("wsss")


class RunContext:
    """One command's view of a run. Creating it writes nothing: the pipeline writes ``config.yaml`` once it holds
    the run's lock and every check has passed.

    ``after_epoch``: called with the epoch number after every training epoch of every stage (tests use it to stop a
    run at a chosen point, as a kill would). ``spec``: the dataset spec when it is known without the dataset (a
    trained run applied to new images, :mod:`wsss.api`); otherwise the reader's."""

    def __init__(self, cfg: Config, after_epoch: Callable[[int], None] | None = None, spec: DatasetSpec | None = None):
        self.cfg = cfg
        self._spec = spec
        self.layout = RunLayout(Path(cfg.runs_dir) / cfg.name)
        self.after_epoch = after_epoch
        #: image files this command has decoded without error (the stages' checks decode each file once)
        self.decoded_images: set[str] = set()

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @cached_property
    def reader(self) -> Reader:
        return open_dataset(self.cfg.data)

    @property
    def spec(self) -> DatasetSpec:
        return self._spec if self._spec is not None else self.reader.spec

    @cached_property
    def label_check(self) -> dict:
        """The label check of the training split (:func:`wsss.data.label_check.check_labels`), computed once."""
        from wsss.data.label_check import check_labels

        split = self.split_name("train")
        c = self.cfg.label_check
        return check_labels(self.reader.samples(split), self.spec, self.reader.load_mask, split=split,
                            common_fraction=c.common_fraction, refuse_fraction=c.refuse_fraction, force=c.force)

    def split_name(self, split: str) -> str:
        """Maps a role (train / val / test) to the dataset's split name (data.<role>_split)."""
        return split_name(self.cfg, split)
