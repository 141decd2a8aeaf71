"""Per-image stages sharded over processes started by torchrun (wsss.engine.shard): the files of 2 CPU processes
(gloo) equal those of one process, and the stage records are rank 0's, complete."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image

from wsss.config import load_config
from wsss.engine import shard
from wsss.localize import load_maps
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

from conftest import fast_overrides

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


@pytest.mark.parametrize("n", [0, 1, 7, 10, 11])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_are_disjoint_covering_and_balanced(n, world):
    shares = [shard.shard(range(n), r, world) for r in range(world)]
    every = sorted(i for s in shares for i in s)
    assert every == list(range(n))  # covering, and disjoint: no item twice
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(s == sorted(s) for s in shares)  # each share keeps the list's order


def test_outside_torchrun_one_process_does_everything():
    assert not dist.is_initialized() or shard.world() > 1
    assert (shard.world(), shard.rank(), shard.is_main()) == (1, 0, True)
    assert shard.shard(list("abc")) == list("abc")
    assert shard.from_main(5) == 5 and shard.gather(5) == [5]
    assert shard.undone(range(6), lambda i: i % 3 == 0) == [1, 2, 4, 5]
    shard.barrier()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "stage.json"}


def _link_stage(src_run: Path, dst_run: Path, stage: str) -> None:
    """``stage``'s current variant of ``src_run`` copied into ``dst_run``, linked as there."""
    target = os.readlink(src_run / stage)
    shutil.copytree(src_run / target, dst_run / target, symlinks=True)
    os.symlink(target, dst_run / stage)


def test_two_processes_write_the_files_of_one(toy_root, tmp_path):
    runs = tmp_path / "runs"
    # batches of 2 images: both processes get some (and each image is in the batch one process would put it in)
    extra = {"train.epochs": 1, "pseudo.refiners": "[crf]", "crf.workers": 0, "maps.batch_size": 2}
    one = RunContext(load_config(None, fast_overrides(toy_root, runs, name="one", **extra)))
    run_stage(one, "seg")  # classifier, maps, pseudo masks and segmentation network, in this process
    a, b = runs / "one", runs / "two"
    b.mkdir()
    for stage in ("cls", "seg"):  # the same networks; the per-image stages computed anew, by 2 processes
        _link_stage(a, b, stage)
    metrics_one = run_stage(one, "eval")  # predictions and scores of one process

    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump({"name": "two"}))
    args = [x for x in fast_overrides(toy_root, runs, **extra) if not x.startswith("name=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "wsss.cli",
           "run", str(cfg), *args]
    # torchrun sets OMP_NUM_THREADS=1 when unset, and the thread count the OpenMP runtime starts with changes the
    # classifier's logits in the last bit: the processes start with this process's
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("metrics:") == 1  # rank 0 alone prints

    for stage in ("maps", "pseudo", "pred"):
        fa, fb = _files(a / stage), _files(b / stage)
        assert fa.keys() == fb.keys() and fa, stage
        for name, p in fa.items():
            if name.endswith(".npz"):
                ma, mb = load_maps(p), load_maps(fb[name])
                assert np.array_equal(ma["maps"], mb["maps"]) and np.array_equal(ma["classes"], mb["classes"]), name
                # the classifier's logits can differ in the last bit between a process torchrun started and this one
                # (OpenMP threads set up differently): not yet explained, see the report of issue 15, item 4
                assert np.allclose(ma["scores"], mb["scores"], rtol=0, atol=1e-6), name
            else:
                assert np.array_equal(np.array(Image.open(p)), np.array(Image.open(fb[name]))), name
        record = json.loads((b / stage / "stage.json").read_text())
        assert record["complete"] and record["processes"] == 2
        assert record["entries"] == json.loads((a / stage / "stage.json").read_text())["entries"]
        assert not [p for p in (b / stage).rglob(".*")]  # no temporary file left behind
    maps_info = json.loads((b / "maps" / "stage.json").read_text())["splits"]["train"]
    assert maps_info["computed"] == maps_info["images"] == 8  # the counts are both processes'
    assert json.loads((b / "pseudo" / "stage.json").read_text())["images"] == 8
    metrics_two = json.loads((b / "metrics.json").read_text())
    assert metrics_two["splits"] == metrics_one["splits"]


RELABEL_SCRIPT = """
import os, sys
from pathlib import Path
from wsss.config import load_config
from wsss.stages import seg
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

predicted = []
predict_tensor = seg.predict_tensor
def counting(model, x, *args, **kwargs):
    predicted.append(len(x))
    return predict_tensor(model, x, *args, **kwargs)
seg.predict_tensor = counting
run_stage(RunContext(load_config(None, sys.argv[2:])), "relabel_r2")
Path(sys.argv[1], os.environ["RANK"]).write_text(str(sum(predicted)))
"""


def test_two_processes_relabel_as_one(toy_root, tmp_path):
    """A self-training relabelling under torchrun: each process predicts its share, and the masks, the confidence
    files (of the training split and of val, on which the quantile is chosen) and the record equal one process's."""
    runs = tmp_path / "runs"
    extra = {"train.epochs": 1, "pseudo.refiners": "[crf]", "crf.workers": 0, "maps.batch_size": 2,
             "self_train.rounds": 2, "self_train.confidence": "quantile", "self_train.candidates": "[0.0, 0.2, 0.5]",
             "self_train.scales": "[1.0]"}
    one = RunContext(load_config(None, fast_overrides(toy_root, runs, name="one", **extra)))
    run_stage(one, "relabel_r2")  # classifier ... round 1's network, then its relabelling, in this process
    a, b = runs / "one", runs / "two"
    b.mkdir()
    for stage in ("cls", "maps", "pseudo", "seg"):  # the same round-1 network; the relabelling anew, by 2 processes
        _link_stage(a, b, stage)
    script = tmp_path / "relabel.py"
    script.write_text(RELABEL_SCRIPT)
    counts = tmp_path / "counts"
    counts.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(counts), *fast_overrides(toy_root, runs, name="two", **extra)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as in the test above
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    fa, fb = _files(a / "relabel_r2"), _files(b / "relabel_r2")
    assert fa.keys() == fb.keys()
    assert {n.split("/")[0] for n in fa} == {"train", "confidence"}
    assert {n.split("/")[1] for n in fa if n.startswith("confidence/")} == {"train", "val"}
    for name, p in fa.items():
        if name.endswith(".npz"):
            with np.load(p) as za, np.load(fb[name]) as zb:
                assert np.array_equal(za["label"], zb["label"]), name
                np.testing.assert_allclose(za["conf"].astype(np.float32), zb["conf"].astype(np.float32), atol=2e-3,
                                           err_msg=name)
        else:
            assert np.array_equal(np.array(Image.open(p)), np.array(Image.open(fb[name]))), name
    ra = json.loads((a / "relabel_r2" / "stage.json").read_text())
    rb = json.loads((b / "relabel_r2" / "stage.json").read_text())
    assert rb["complete"] and rb["processes"] == 2
    for key in ("images", "computed", "rule_value", "chosen_on", "kept_fraction", "train_scores",
                "previous_round_scores"):
        assert rb.get(key) == ra.get(key), key
    assert rb["images"] == 8 and rb["computed"] == 8  # both processes' counts
    # the work was split: the images predicted (train, and val for the choice) add up to one process's, each did some
    val = len(one.reader.samples(one.split_name("val")))
    shares = [int((counts / r).read_text()) for r in ("0", "1")]
    assert sum(shares) == 8 + val and min(shares) > 0, shares


REGIONS_SCRIPT = """
import os, sys
from pathlib import Path
from wsss.config import load_config
from wsss.engine import shard
from wsss.refine import relations
from wsss.refine.base import build_chain
from wsss.stages.context import RunContext

done = []
job = relations.confident_job
def counting(args):
    done.append(1)
    return job(args)
relations.confident_job = counting
shard.init()
ctx = RunContext(load_config(None, sys.argv[3:]))
split = ctx.split_name(ctx.cfg.pseudo.split)
n = relations.write_confident_regions(build_chain(ctx.cfg)[0], ctx.reader.samples(split), Path(sys.argv[1]) / split,
                                      Path(sys.argv[2]), ctx.spec, 0, False)
Path(sys.argv[2]).with_name(os.environ["RANK"]).write_text(f"{n} {len(done)}")
"""


def test_two_processes_write_the_confident_regions_of_one(toy_root, tmp_path):
    """The affinity refiners' relation labels (the per-image part of the irn / psa stage) under torchrun: each process
    computes its share; the files equal one process's."""
    from wsss.refine.base import build_chain
    from wsss.refine.relations import write_confident_regions

    runs = tmp_path / "runs"
    extra = {"train.epochs": 1, "pseudo.refiners": "[irn]", "crf.workers": 0}
    args = fast_overrides(toy_root, runs, name="one", **extra)
    ctx = RunContext(load_config(None, args))
    run_stage(ctx, "maps")
    maps_dir = runs / "one" / "maps"
    split = ctx.split_name(ctx.cfg.pseudo.split)
    samples = ctx.reader.samples(split)
    assert write_confident_regions(build_chain(ctx.cfg)[0], samples, maps_dir / split, tmp_path / "one", ctx.spec, 0,
                                   False) == len(samples) == 8
    script = tmp_path / "regions.py"
    script.write_text(REGIONS_SCRIPT)
    out = tmp_path / "two" / "labels"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(maps_dir), str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fa, fb = _files(tmp_path / "one"), _files(out)
    assert fa.keys() == fb.keys() and len(fa) == 8
    for name, p in fa.items():
        assert np.array_equal(np.array(Image.open(p)), np.array(Image.open(fb[name]))), name
    reports = [(out.parent / r).read_text().split() for r in ("0", "1")]
    assert [int(r[0]) for r in reports] == [8, 8]  # both say how many were computed in all
    assert sorted(int(r[1]) for r in reports) == [4, 4]  # each computed its share
