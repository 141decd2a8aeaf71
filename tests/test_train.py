"""The shared training loop: resume after a kill equals an uninterrupted run; DDP on 2 CPU processes; checkpoints
know their model."""

import json
import logging

import pytest
import torch

from wsss.config import load_config
from wsss.data.readers import open_dataset
from wsss.engine.checkpoint import load_checkpoint, save_checkpoint
from wsss.engine.train import ClassifierTask, LoopSettings, TrainTask, fit, fit_classifier
from wsss.errors import CheckpointError
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage
from wsss.stages.seg import SegTask

from conftest import Killed, fast_overrides, kill_after_first_epoch, make_voc_dataset


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_killed_stage_resumes_where_it_stopped(fast_cfg):
    # the weights of a resumed job: test_resume_after_kills_equals_uninterrupted_bit_for_bit
    ctx = RunContext(fast_cfg(name="killed", **{"train.epochs": 3}), after_epoch=kill_after_first_epoch)
    with pytest.raises(Killed):
        run_stage(ctx, "cls")
    assert (ctx.run_dir / "cls" / "last.ckpt").exists() and not (ctx.run_dir / "cls" / "model.pt").exists()
    stage = run_stage(RunContext(fast_cfg(name="killed", **{"train.epochs": 3})), "cls")
    assert stage.complete and (ctx.run_dir / "cls" / "model.pt").exists()
    log = [json.loads(line) for line in (ctx.run_dir / "cls" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def _tiny_task(kind, tmp_path, workers):
    """A 3-epoch fp32 job of 2 steps per epoch on four 64x64 images; pretrained, so that every step moves the weights
    (an untrained mobilenet's features vanish and its logits stay at 0: any resume would look exact)."""
    root = tmp_path / "tiny"
    if not root.exists():
        make_voc_dataset(root, splits=(("train", 4), ("val", 1), ("test", 1)), h=64, w=64)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{
        "data.workers": workers, "model.pretrained": True, "train.epochs": 3, "train.batch_size": 2,
        "train.crop_size": 64, "seg.model.pretrained": True, "seg.train.epochs": 3, "seg.train.batch_size": 2,
        "seg.train.crop_size": 64}))
    reader = open_dataset(cfg.data)
    samples = reader.samples("train")
    if kind == "classifier":
        return ClassifierTask(cfg, samples, reader.spec)
    return SegTask(cfg, samples, reader.spec, reader.load_mask)  # DeepLabV3's head has dropout


def _killed_at_loss_call(task, call):
    """``task`` whose ``call``-th loss (counted from 1 in this job) raises: a kill in the middle of an epoch."""
    calls = iter(range(1, 10**6))
    loss = task.loss

    def dying_loss(out, batch):
        if next(calls) == call:
            raise Killed
        return loss(out, batch)

    task.loss = dying_loss
    return task


def _fit_done(result, out):
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
    return out / "model.pt"


@pytest.mark.parametrize("kind", ["classifier", "seg"])
def test_resume_after_kills_equals_uninterrupted_bit_for_bit(kind, tmp_path):
    # every fit() is a new Fabric and a new loader, as in a rerun process: counters Fabric keeps (its loader's count
    # of epochs) restart at 0 there, while the uninterrupted job counts on
    reference = _weights(_fit_done(fit(_tiny_task(kind, tmp_path, 0), tmp_path / "full"), tmp_path / "full"))
    for workers in (0, 2):  # batches must not depend on loader workers either
        out = tmp_path / f"killed_w{workers}"
        with pytest.raises(Killed):  # between epochs 1 and 2
            fit(_tiny_task(kind, tmp_path, workers), out, after_epoch=kill_after_first_epoch)
        after_one = _weights(out / "last.ckpt")
        with pytest.raises(Killed):  # resumed at epoch 2, killed after the first of the 2 steps of epoch 3
            fit(_killed_at_loss_call(_tiny_task(kind, tmp_path, workers), 4), out)
        assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 2
        got = _weights(_fit_done(fit(_tiny_task(kind, tmp_path, workers), out), out))
        assert got.keys() == reference.keys()
        differ = {k: float((got[k].double() - reference[k].double()).abs().max()) for k in reference
                  if not torch.equal(got[k], reference[k])}
        assert not differ, f"workers={workers}: {len(differ)}/{len(reference)} tensors differ, e.g. " \
                           f"{dict(list(differ.items())[:3])}"
        moved = max(float((reference[k].double() - after_one[k].double()).abs().max()) for k in reference)
        assert moved > 1e-3  # epochs 2-3 changed the weights: replaying other batches could not go unseen


class _NoisyItems(torch.utils.data.Dataset):
    """Items that draw from the global RNG of the process that loads them (a loader worker when workers > 0)."""

    def __len__(self):
        return 4

    def __getitem__(self, item):
        index, _ = item
        return {"image": torch.full((3, 2, 2), float(index)), "noise": torch.rand(())}


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return {"logits": x.mean((1, 2, 3)) * self.w + self.b}

    def param_groups(self, lr, head_lr_mult):
        return [{"params": [self.w, self.b], "lr": lr, "base_lr": lr}]


class _NoisyTask(TrainTask):
    """Fits the noise its items drew: the weights say whether a resumed job's loaders drew what the uninterrupted
    job's did."""

    def __init__(self, workers):
        cfg = load_config(None, [f"data.workers={workers}", "runtime.precision=fp32", "runtime.channels_last=false",
                                 "runtime.progress=false", "runtime.accelerator=cpu"])
        super().__init__(cfg, LoopSettings(epochs=3, batch_size=2, lr=0.1, head_lr_mult=1.0), {"task": "noisy"})

    def build_model(self):
        return _Affine()

    def dataset(self):
        return _NoisyItems()

    def loss(self, out, batch):
        loss = ((out["logits"] - batch["noise"]) ** 2).mean()
        return loss, {}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_randomness_of_a_resumed_epoch_equals_uninterrupted(workers, tmp_path):
    fit(_NoisyTask(workers), tmp_path / "full")
    with pytest.raises(Killed):
        fit(_NoisyTask(workers), tmp_path / "killed", after_epoch=kill_after_first_epoch)
    fit(_NoisyTask(workers), tmp_path / "killed")
    a, b = _weights(tmp_path / "full" / "model.pt"), _weights(tmp_path / "killed" / "model.pt")
    assert float(a["w"]) != 0.0 and torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]), (a, b)


class _KeepsInitialWeights(ClassifierTask):
    def build_model(self):
        model = super().build_model()
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.frozen_bn = [f"backbone.{n}." for n, m in model.backbone.named_modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        return model


def test_training_changes_the_head_and_keeps_frozen_bn(fast_cfg, tmp_path):
    cfg = fast_cfg(**{"train.epochs": 1, "model.pretrained": True})
    reader = open_dataset(cfg.data)
    task = _KeepsInitialWeights(cfg, reader.samples("train"), reader.spec)
    fit(task, tmp_path / "cls")
    after = _weights(tmp_path / "cls" / "model.pt")
    moved = {k: float((after[k].double() - v.double()).abs().max()) for k, v in task.initial.items()}
    assert moved["head.weight"] > 1e-3, moved["head.weight"]  # initialised with std 0.01
    bn = {k: d for k, d in moved.items() if k.startswith(tuple(task.frozen_bn))}
    assert len(bn) == 5 * len(task.frozen_bn) and not any(bn.values()), {k: d for k, d in bn.items() if d}
    convs = [d for k, d in moved.items() if k.startswith("backbone.") and k not in bn]
    assert convs and max(convs) > 1e-4  # frozen BatchNorm only: the backbone's convolutions train


def test_ddp_two_cpu_processes_train_as_one(fast_cfg, tmp_path, caplog):
    def train(name, devices):
        cfg = fast_cfg(name=name, **{"runtime.devices": devices, "train.epochs": 2, "runtime.accelerator": "cpu",
                                     "model.pretrained": True})  # an untrained backbone's loss stays at log 2
        reader = open_dataset(cfg.data)
        return fit_classifier(cfg, reader.samples("train"), reader.spec, tmp_path / name)

    one = train("one", 1)
    with caplog.at_level(logging.INFO, logger="wsss"):
        two = train("two", 2)
    assert two["world_size"] == 2 and two["images"] == one["images"]
    first, second = (r["loss"] for r in one["history"])
    assert abs(second - first) > 0.05 * first  # epoch 2 depends on what epoch 1 learnt, far beyond the tolerance
    # each process takes half of every global batch and DDP averages the gradients: the same training as one
    # process, up to float summation order, which this head's large steps amplify (one process on 1 thread instead
    # of 2 moves epoch 2's loss by 4e-5 relative; two processes by 1e-4)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        # the logged loss part is the mean over both processes, like the loss (rank 0's half alone differs)
        assert b["cls"] == pytest.approx(b["loss"], rel=1e-6) and b["cls"] == pytest.approx(a["cls"], rel=1e-3)
    # the spawned rank 0 logs each epoch (once: rank 1 does not)
    lines = [r.getMessage() for r in caplog.records if r.name == "wsss.train"]
    assert [m.split(" loss")[0] for m in lines if " epoch " in m] == ["cam epoch 1/2", "cam epoch 2/2"], lines


def test_checkpoint_from_another_model_is_rejected(tmp_path):
    p = tmp_path / "m.pt"
    save_checkpoint(p, {"meta": {"backbone": "resnet50", "classes": ["a", "b"]}, "model": {}})
    with pytest.raises(CheckpointError, match="resnet50"):
        load_checkpoint(p, {"backbone": "mobilenet_v2", "classes": ["a", "b"]})
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a wsss checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_resume_from_checkpoint_of_another_model_fails_clearly(fast_cfg):
    ctx = RunContext(fast_cfg(name="x", **{"train.epochs": 2}), after_epoch=kill_after_first_epoch)
    with pytest.raises(Killed):
        run_stage(ctx, "cls")
    last = ctx.run_dir / "cls" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    state["meta"]["backbone"] = "resnet50"
    save_checkpoint(last, state)
    with pytest.raises(CheckpointError, match="another model"):
        run_stage(RunContext(ctx.cfg), "cls")
