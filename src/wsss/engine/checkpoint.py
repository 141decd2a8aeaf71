"""Checkpoints carry the model's identity (backbone, stride, method, class names) next to its weights, so that
loading one into a different model fails with a message saying what differs instead of a shape error."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from wsss.errors import CheckpointError
from wsss.runs import atomic_write_bytes


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, expect_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable wsss checkpoint: {e}") from None
    if not isinstance(state, dict) or "meta" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a wsss checkpoint (no 'meta'/'model' entries)")
    if expect_meta is not None:
        diffs = [
            f"{k}: checkpoint has {state['meta'].get(k)!r}, config wants {v!r}"
            for k, v in expect_meta.items()
            if state["meta"].get(k) != v
        ]
        if diffs:
            raise CheckpointError(f"{path}: checkpoint is from another model ({'; '.join(diffs)})")
    return state


def load_classifier_backbone(module: torch.nn.Module, path: Path, expect_meta: dict[str, Any] | None = None) -> None:
    """The backbone of the classifier checkpoint ``path`` (its ``backbone.*`` tensors) into ``module``, strictly: the
    segmentation network's ``seg.init: classifier`` and the affinity networks' frozen features."""
    state = load_checkpoint(path, expect_meta)["model"]
    body = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    try:
        module.load_state_dict(body)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its backbone does not fit this network ({str(e).splitlines()[0]})") from None

