"""Per-image stages split over the processes ``torchrun`` started (one machine with N GPUs, or several nodes).

Under ``torchrun`` with more than one process, :func:`init` joins the process group torchrun describes in the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...): nccl with CUDA (each process on the GPU
of its ``LOCAL_RANK``), gloo on the CPU. A per-image stage then gives process ``r`` the images ``i`` with
``i % world == r`` (:func:`shard`): strided rather than contiguous chunks because datasets are often listed in an
order where image size and content change slowly (a VOC year, an MSRC class), so a stride gives every process the
same mix of sizes and classes and they finish together. Each process writes its own per-image files atomically,
then all meet at a barrier; only rank 0 holds the run lock and writes ``config.yaml`` and ``stage.json``
(:mod:`wsss.stages.pipeline`). Trainings do not use this module: Lightning Fabric joins the same group for DDP.

Without torchrun (or with one process) every function here is the identity of one process: no process group is
created, :func:`shard` returns every item and :func:`barrier` returns at once. The only state is what
``torch.distributed`` holds.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: how long a process waits at a barrier for the others: a process with a slower share (a CRF on larger images)
#: may finish well after the rest; a process that dies is caught by torchrun, which stops all of them
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def launched() -> bool:
    """Whether this process is one of several that ``torchrun`` started."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def nodes() -> int:
    """Number of machines of a torchrun launch (1 outside torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def init() -> None:
    """Join torchrun's process group (once; nothing outside torchrun or when it is already joined). On the CPU the
    processes of a machine share its cores (torch would give each process all of them)."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that holds the run lock and writes records."""
    return rank() == 0


def shard(items: Sequence[T], rank_: int | None = None, world_: int | None = None) -> list[T]:
    """This process's share of ``items``: every ``world``-th item from its rank on (disjoint, covering, sizes differ
    by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world() if world_ is None else world_
    return list(items)[r::w]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every process (what the others pass is ignored): a decision taken once, by the process
    that holds the lock, so that every process follows the same plan. Also a barrier."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def undone(items: Iterable[T], done: Callable[[T], bool]) -> list[T]:
    """The ``items`` not ``done`` yet, as rank 0 sees them, on every process: a resumable per-image stage lists what is
    left before any process writes a file, so that all work on the same list (:func:`shard` then gives each its
    share). Outside torchrun: the items not done."""
    return from_main([x for x in items if not done(x)] if is_main() else None)


def gather(value: Any) -> list:
    """Every process's ``value``, by rank, on every process. Also a barrier."""
    if world() == 1:
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


__all__ = ["barrier", "from_main", "gather", "init", "is_main", "launched", "local_rank", "nodes", "rank", "shard",
           "undone", "world"]
