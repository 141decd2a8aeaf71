"""``wsss run``: every stage in order, each reused when its config is unchanged."""

from __future__ import annotations

from wsss.stages import evaluate
from wsss.stages.context import RunContext


def run(ctx: RunContext) -> dict:
    return evaluate.run(ctx)
