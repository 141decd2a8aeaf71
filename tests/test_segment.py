"""Applying a finished run to new images (issue 15): ``wsss segment``, ``wsss.load_run`` (and the README's example),
``wsss export --format onnx`` against torch, and ``benchmarks/gpu_check.sh``. One tiny run is trained per module."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import wsss
from wsss.cli import main
from wsss.config import load_config
from wsss.errors import DataError
from wsss.stages import seg as seg_stage
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

from conftest import REPO, fast_overrides, make_voc_dataset


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run with a classifier and a segmentation network (ImageNet-initialised, one epoch each) on the toy data,
    whose classes carry the names the README example uses."""
    root = make_voc_dataset(tmp_path_factory.mktemp("data") / "toy")
    spec = json.loads((root / "dataset.json").read_text())
    spec["classes"] = ["ground", "cow", "sheep", "sky"]
    (root / "dataset.json").write_text(json.dumps(spec))
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, fast_overrides(root, runs, **{"train.epochs": 1, "model.pretrained": True,
                                                           "seg.model.pretrained": True}))
    run_stage(RunContext(cfg), "seg")
    return runs / "t"


def _image(path: Path, size_hw, mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size_hw
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    Image.fromarray(a[..., 0] if mode == "L" else a, mode).save(path)
    return path


def test_segment_masks_good_images_names_bad_ones_and_a_rerun_skips_finished_files(tiny_run, tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr(seg_stage, "MAX_PREDICT_PIXELS", 160 * 120)  # the 6000x4000 photo's path, at a test's cost
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    _image(folder / "grey.png", (40, 50), "L")
    _image(folder / "sub" / "rgba.png", (30, 70), "RGBA")
    big = np.zeros((4000, 6000, 3), np.uint8)
    big[:, :3000] = (220, 30, 30)
    Image.fromarray(big).save(folder / "big.jpg", quality=80)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG" * 20)
    good = _image(tmp_path / "x.jpg", (48, 64))
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "notes.txt").write_text("not an image: not an input")
    out = tmp_path / "out"

    assert main(["segment", str(tiny_run), str(folder), "--out", str(out)]) == 1
    std = capsys.readouterr()
    assert "2 input(s) could not be segmented" in std.err
    assert str(folder / "corrupt.jpg") in std.err and str(folder / "truncated.jpg") in std.err
    assert "3 written" in std.out and "1 large image(s) predicted downscaled" in std.out
    run = wsss.load_run(tiny_run)
    expected = {"grey": (40, 50), "sub/rgba": (30, 70), "big": (4000, 6000)}
    for name, hw in expected.items():
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P" and (png.height, png.width) == hw
            assert png.getpalette()[:12] == [v for rgb in run.spec.palette[:4] for v in rgb]
            assert np.asarray(png).max() < len(run.classes)
    assert sorted(p.name for p in out.rglob("*.png")) == ["big.png", "grey.png", "rgba.png"]

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    (out / "grey.png").unlink()
    assert main(["segment", str(tiny_run), str(folder), "--out", str(out)]) == 1  # the bad files are still there
    std = capsys.readouterr()
    assert "1 written, 2 already there, 2 failed" in std.out
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != "grey.png")
    assert (out / "grey.png").is_file()


def test_segment_outputs_agree_with_the_python_api(tiny_run, tmp_path, capsys):
    root = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["root"])
    images = sorted((root / "JPEGImages").glob("*.jpg"))[:3]
    out = tmp_path / "out"
    args = [str(images[0]), str(root / "JPEGImages" / "img00[12].jpg"), "--out", str(out), "--overlay", "--probs"]
    assert main(["segment", str(tiny_run), *args, "--precision", "fp32", "--no-progress"]) == 0
    run = wsss.load_run(tiny_run, precision="fp32")
    assert run.classes == ("ground", "cow", "sheep", "sky")
    for path in images:
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        with np.load(out / f"{path.stem}.probs.npz", allow_pickle=False) as z:
            probs, classes = z["probs"], z["classes"]
        assert probs.dtype == np.float16 and probs.shape == (4, *mask.shape)
        assert list(classes) == list(run.classes)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
        with Image.open(out / f"{path.stem}.overlay.jpg") as jpg:
            assert jpg.size == (mask.shape[1], mask.shape[0])
        rgb = np.asarray(Image.open(path).convert("RGB"))
        for image in (path, str(path), Image.open(path), rgb):
            np.testing.assert_array_equal(run.segment(image), mask)
        heat = run.cam(rgb, 1)
        assert heat.shape == mask.shape and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1

    # two images with one output name are refused before anything is written
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        _image(tmp_path / d / "same.png", (20, 20))
    assert main(["segment", str(tiny_run), str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png"),
                 "--out", str(tmp_path / "clash")]) == 2
    assert "same" in capsys.readouterr().err and not (tmp_path / "clash" / "same.png").exists()


def test_the_python_api_turns_a_pil_photo_by_its_exif_orientation_as_the_file_loader_does(tiny_run, tmp_path):
    root = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["root"])
    stored = Image.open(sorted((root / "JPEGImages").glob("*.jpg"))[0]).convert("RGB")
    exif = stored.getexif()
    exif[0x0112] = 6  # a phone's portrait photo: stored sideways, shown turned clockwise
    stored.save(tmp_path / "portrait.jpg", exif=exif.tobytes(), quality=95)
    run = wsss.load_run(tiny_run, precision="fp32")
    from_file = run.segment(tmp_path / "portrait.jpg")
    assert from_file.shape == (stored.width, stored.height)  # the shown photo's size, not the stored one
    with Image.open(tmp_path / "portrait.jpg") as opened:
        np.testing.assert_array_equal(run.segment(opened), from_file)
        shown = ImageOps.exif_transpose(opened)  # already turned: its tag is gone, so it is not turned twice
    np.testing.assert_array_equal(run.segment(shown), from_file)
    np.testing.assert_array_equal(run.segment(np.asarray(shown)), from_file)


def _copy_run(src: Path, dst: Path, stages: list[str], **config_changes) -> Path:
    """A run directory holding only ``stages`` of ``src`` (as a run where the others were never run)."""
    dst.mkdir()
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    for key, value in config_changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for stage in stages:
        target = Path(os.readlink(src / stage))
        shutil.copytree(src / target, dst / target)
        os.symlink(target, dst / stage)
    return dst


def test_a_run_without_a_network_or_a_classifier_says_which_command_trains_it(tiny_run, tmp_path):
    no_seg = _copy_run(tiny_run, tmp_path / "no-seg", ["cls"], **{"seg.enabled": False})
    with pytest.raises(DataError) as e:
        wsss.load_run(no_seg)
    msg = str(e.value)
    assert "no segmentation network" in msg and "stage 'seg' was never run" in msg
    # the run's own config, with what enables the stage, and where the run now is (it was moved here)
    assert f"wsss train-seg {no_seg / 'config.yaml'} seg.enabled=true runs_dir={tmp_path} name=no-seg" in msg

    seg_only = _copy_run(tiny_run, tmp_path / "seg-only", ["seg"])
    run = wsss.load_run(seg_only)
    assert run.segment(np.zeros((20, 30, 3), np.uint8)).shape == (20, 30)
    with pytest.raises(DataError) as e:
        run.cam(np.zeros((20, 30, 3), np.uint8), "cow")
    assert "no classifier" in str(e.value) and "wsss train-cls" in str(e.value)

    with pytest.raises(DataError, match="not a wsss run directory"):
        wsss.load_run(tmp_path)


def test_readme_example_runs(tiny_run, tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "wsss.load_run(" in b]
    assert len(blocks) == 1
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_run, tmp_path / "runs" / "demo")  # the run the example names
    root = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["root"])
    with_cow = next(p for p in sorted((root / "SegmentationClass").glob("*.png")) if 1 in np.asarray(Image.open(p)))
    shutil.copy(root / "JPEGImages" / f"{with_cow.stem}.jpg", tmp_path / "photo.jpg")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[0] in ("ground", "cow", "sheep", "sky") and 0 <= float(printed[1]) <= 1


def test_onnx_export_matches_torch_at_two_sizes(tiny_run, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "max abs diff" in capsys.readouterr().out
    meta = json.loads((out / "export.json").read_text())
    assert meta["classes"] == ["ground", "cow", "sheep", "sky"] and set(meta["files"]) == {"segmenter.onnx",
                                                                                          "classifier.onnx"}
    run = wsss.Run(tiny_run, precision="fp32", device="cpu")
    models = {"segmenter.onnx": lambda x: [run.segmenter(x)["logits"]],
              "classifier.onnx": lambda x: [run.classifier(x)["logits"], run.classifier(x)["cams"]]}
    g = torch.Generator().manual_seed(1)
    for name, forward in models.items():
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        for h, w in ((96, 128), (72, 100)):  # dynamic height and width, neither the traced size
            x = torch.randn(2, 3, h, w, generator=g)
            with torch.no_grad():
                want = [t.float().numpy() for t in forward(x)]
            got = session.run(None, {"image": x.numpy()})
            for a, b in zip(want, got, strict=True):
                assert a.shape == b.shape
                diff, scale = float(np.abs(a - b).max()), float(np.abs(a).max())
                print(f"{name} {h}x{w}: max abs diff {diff:.2e}, largest output {scale:.3g}")
                assert scale > 1e-3 and diff <= 1e-4 * scale


def test_import_wsss_does_not_import_torch():
    code = "import sys, wsss; assert 'torch' not in sys.modules; assert 'load_run' in dir(wsss)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpu_check_script_parses_and_refuses_without_cuda():
    script = REPO / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is not testable")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode != 0 and "CUDA" in res.stderr


def test_a_bf16_run_on_a_machine_without_native_bf16_predicts_in_fp32(tiny_run, tmp_path, monkeypatch, caplog):
    from wsss.config.runtime import cpu_bf16_flags

    run_dir = _copy_run(tiny_run, tmp_path / "bf16run", ["seg"], **{"runtime.precision": "bf16",
                                                                    "runtime.accelerator": "cpu"})
    if cpu_bf16_flags():  # this CPU has bf16 units: the run's bf16 stays
        assert wsss.load_run(run_dir).cfg.runtime.precision == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # as a CPU without them
    with caplog.at_level(logging.WARNING):
        run = wsss.load_run(run_dir)
    assert run.cfg.runtime.precision == "fp32"
    assert any("predicting in fp32" in r.message for r in caplog.records)
    assert wsss.load_run(run_dir, precision="bf16").cfg.runtime.precision == "bf16"  # asked for explicitly


def test_files_written_atomically_get_the_usual_permissions(tmp_path):
    from wsss.runs import atomic_path, atomic_write_bytes

    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_path(tmp_path / "b.png") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o644
