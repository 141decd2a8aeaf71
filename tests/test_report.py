"""``wsss report``: the HTML page of a run, its structure, its escaping, and how it renders in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.config import load_config
from wsss.data.spec import DatasetSpec
from wsss.errors import DataError
from wsss.localize import load_maps
from wsss.report import render_report, write_report
from wsss.report.html import MAX_SIDE, ImageGroup, ImageRow, Tile, jet, overlay
from wsss.stages.context import RunContext
from wsss.stages.pipeline import run_stage

from conftest import fast_overrides, make_voc_dataset

N_IMAGES = 3


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of every element."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, **attrs):
        out = []
        for t, a in self.tags:
            if t != tag:
                continue
            if all((v in a.get(k.rstrip("_"), "").split()) if k.endswith("_") else a.get(k) == v
                   for k, v in attrs.items()):
                out.append(a)
        return out


def parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def _build_run(base: Path, background: bool, **extra) -> Path:
    root = make_voc_dataset(base / "data", background=background)
    cfg = load_config(None, fast_overrides(root, base / "runs", **{"train.epochs": 1, **extra}))
    ctx = RunContext(cfg)
    run_stage(ctx, "eval")
    return ctx.run_dir


def _without_seg() -> dict:
    """Override that skips training a segmentation network, where the config has that switch (saves time)."""
    import dataclasses

    from wsss.config import Config

    seg = next((f for f in dataclasses.fields(Config) if f.name == "seg"), None)
    if seg is not None and any(f.name == "enabled" for f in dataclasses.fields(seg.default_factory())):
        return {"seg.enabled": False}
    return {}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A run on the toy dataset (no background class). Unless the pipeline predicted the train split itself, every
    train image but the second gets a pred/train/<id>.png (a copy of its pseudo mask)."""
    run_dir = _build_run(tmp_path_factory.mktemp("report"), background=False, **_without_seg())
    if not (run_dir / "pred" / "train").exists():
        (run_dir / "pred" / "train").mkdir(parents=True)
        for i, p in enumerate(sorted((run_dir / "pseudo" / "train").glob("*.png"))):
            if i != 1:
                shutil.copy(p, run_dir / "pred" / "train" / p.name)
    return run_dir


def _expected_images(run_dir: Path, split: str, n: int) -> tuple[list[str], int]:
    """Ids of the first n images of a split and how many <img> their rows hold: photo, one CAM per class of the map
    file, pseudo mask, ground truth, and the prediction where its file exists."""
    ids = [line for line in (run_dir.parent.parent / "data" / "ImageSets" / "Segmentation" / f"{split}.txt")
           .read_text().split() if line][:n]
    total = 0
    for i in ids:
        p = len(load_maps(run_dir / "maps" / split / f"{i}.npz")["classes"])
        total += 1 + p + 2 + int((run_dir / "pred" / split / f"{i}.png").is_file())
    return ids, total


def test_report_page_structure(toy_run, capsys):
    assert main(["report", str(toy_run), "--images", str(N_IMAGES)]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == toy_run / "report" / "index.html" and out.is_file()
    page = out.read_text()
    doc = parse(page)
    metrics = json.loads((toy_run / "metrics.json").read_text())
    classes = json.loads((toy_run.parent.parent / "data" / "dataset.json").read_text())["classes"]

    title = "".join(doc.text)
    for word in ("t", "cam", "mobilenet_v2", "toy"):
        assert word in title

    # headline table: a row per split and the pseudo masks
    rows = doc.find("tr")
    assert {r.get("data-split") for r in rows} >= {"train", "val", "test"}
    assert doc.find("tr", class_="pseudo")
    assert str(metrics["pseudo"]["miou"]) in page

    # per-class IoU: one chart, one bar per class and series (pseudo split and test split)
    bars = doc.find("svg", class_="bars")
    assert len(bars) == 1
    pseudo_bars = doc.find("rect", class_="bar", **{"data-series": "pseudo"})
    assert [b["data-class"] for b in pseudo_bars] == classes
    test_iou = metrics["splits"]["test"]["maps"]["per_class"]
    test_bars = doc.find("rect", class_="bar", **{"data-series": "test"})
    assert [b["data-class"] for b in test_bars] == [c for c in classes if test_iou[c]["iou"] is not None]

    if "seg" in metrics:  # the segmentation network, when the pipeline trained one
        assert doc.find("tr", class_="seg") and doc.find("rect", class_="bar", **{"data-series": "seg"})

    # sweep: mIoU of every scored split, plus coverage (the toy dataset has no background class)
    assert len(doc.find("svg", class_="sweep")) == 1
    for split in ("train", "val", "test"):
        assert doc.find("polyline", class_="miou", **{"data-split": split})
        assert doc.find("polyline", class_="coverage", **{"data-split": split})

    # images: first N of the pseudo split (train), then of the test split
    train_ids, n_train = _expected_images(toy_run, "train", N_IMAGES)
    test_ids, n_test = _expected_images(toy_run, "test", N_IMAGES)
    assert [s["data-split"] for s in doc.find("section")] == ["train", "test"]
    assert [d["data-id"] for d in doc.find("div", class_="row")] == train_ids + test_ids
    imgs = doc.find("img")
    assert len(imgs) == n_train + n_test
    # prediction column: the picture where pred/<split>/<id>.png exists, else a placeholder text
    chosen = {"train": train_ids, "test": test_ids}
    no_folder = sum(len(ids) for split, ids in chosen.items() if not (toy_run / "pred" / split).is_dir())
    no_file = sum(not (toy_run / "pred" / split / f"{i}.png").is_file()
                  for split, ids in chosen.items() if (toy_run / "pred" / split).is_dir() for i in ids)
    assert page.count("no prediction yet") == no_folder
    assert page.count("no prediction for this image") == no_file >= 1  # train image 2
    assert len(doc.find("img", alt="prediction")) == len(train_ids + test_ids) - no_folder - no_file
    assert page.count(">mask from maps<") == N_IMAGES and page.count(">pseudo mask<") == N_IMAGES

    # self-contained: every picture a data URI, nothing fetched, pictures at most MAX_SIDE wide
    for a in imgs:
        assert a["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,"))
        w, h = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).size
        assert w <= MAX_SIDE and (str(w), str(h)) == (a["width"], a["height"])
    for t, a in doc.tags:
        for k in ("src", "href", "action", "srcset", "poster", "data"):
            assert k not in a or a[k].startswith("data:"), (t, k, a[k][:80])
    assert not doc.find("link") and all("src" not in a for a in doc.find("script"))
    assert not re.search(r"url\(\s*['\"]?(?!data:)", page)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\")", page)


def test_report_with_background_marks_the_chosen_threshold(tmp_path):
    run_dir = _build_run(tmp_path, background=True, **{"eval.sweep": "[0.1, 0.3, 0.5]", **_without_seg()})
    sel = json.loads((run_dir / "metrics.json").read_text())["selection"]
    page = write_report(run_dir, n_images=2).read_text()
    doc = parse(page)
    assert f"chosen: {sel['bg_threshold']:g}" in page
    assert "chosen on split <b>val</b>" in page
    assert doc.find("polyline", class_="miou") and not doc.find("polyline", class_="coverage")
    assert "background threshold" in "".join(doc.text)
    # background is a class of the chart and of the masks' legend
    assert "background" in [b["data-class"] for b in doc.find("rect", class_="bar", **{"data-series": "pseudo"})]
    _, n_train = _expected_images(run_dir, "train", 2)
    _, n_test = _expected_images(run_dir, "test", 2)
    assert len(doc.find("img")) == n_train + n_test


def test_render_escapes_every_text():
    spec = DatasetSpec(name="x<y", classes=("a<b", 'c"&d'), background=None)
    per_class = {"a<b": {"iou": 40.0}, 'c"&d': {"iou": None}}
    metrics = {
        "run": "<script>alert(1)</script>", "dataset": "x<y", "method": "m&m", "backbone": "b>1", "localizer": "l",
        "selection": {"reason": "<no background>"},
        "splits": {"te<st": {"images": 1, "classifier": {"mAP": 1.0},
                             "maps": {"miou": 2.0, "class_avg_acc": 3.0, "pixel_acc": 4.0, "per_class": per_class},
                             "sweep": [{"threshold": 0.1, "miou": 2.0, "coverage": 50.0}]}},
        "pseudo": {"split": "tr<ain", "miou": 5.0, "per_class": per_class},
        "seg": {"split": "te<st", "masks": "pseudo", "backbone": "Deep<Lab>", "miou": 6.0, "per_class": per_class},
    }
    row = ImageRow("id<1>", ["a<b"], [Tile("CAM: a<b", note="<none>")])
    page = render_report(metrics, spec, [ImageGroup("tr<ain", "tr<ain", 1, [row])], test_split="te<st",
                         config_text="name: <x>")
    for raw in ("<script>alert", "a<b", 'c"&d', "x<y", "m&m", "b>1", "te<st", "tr<ain", "id<1>", "<none>", "<x>"):
        assert raw not in page
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt;", "a&lt;b", "c&quot;&amp;d", "m&amp;m", "b&gt;1",
                    "te&lt;st", "id&lt;1&gt;", "&lt;none&gt;", "name: &lt;x&gt;"):
        assert escaped in page
    doc = parse(page)
    assert [b["data-class"] for b in doc.find("rect", class_="bar", **{"data-series": "pseudo"})] == ["a<b"]
    assert len(doc.find("script")) == 1
    assert doc.find("tr", class_="seg") and "Deep&lt;Lab&gt;" in page
    assert [b["data-class"] for b in doc.find("rect", class_="bar", **{"data-series": "seg"})] == ["a<b"]


def test_missing_metrics_says_what_to_run(tmp_path, capsys):
    with pytest.raises(DataError, match="wsss run"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "wsss eval" in capsys.readouterr().err


def test_jet_and_overlay():
    cols = jet(np.array([0.0, 0.5, 1.0]))
    assert cols.dtype == np.uint8
    assert cols[0, 2] > 100 and cols[0, :2].max() == 0  # dark blue
    assert cols[1, 1] == 255 and cols[1, 0] < 200 and cols[1, 2] < 200  # green-ish middle
    assert cols[2, 0] > 100 and cols[2, 1:].max() == 0  # dark red
    photo = np.full((4, 5, 3), 200, np.uint8)
    out = overlay(photo, np.zeros((4, 5)), alpha=0.5)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (100, 100, 164)


# -- real browser ------------------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _console_lines(stderr: str) -> list[str]:
    # Chromium logs every console message (log, error, uncaught exception, CSP violation) as "...:CONSOLE..."
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_renders_in_headless_chromium(toy_run, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); the page is not rendered")
    page = write_report(toy_run, n_images=4)
    url = page.resolve().as_uri()

    dom = _run_chromium(exe, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert not _console_lines(dom.stderr), _console_lines(dom.stderr)
    body = re.search(r"<body\b[^>]*>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-ready") == "1", attrs
    assert attrs.get("data-js-errors") == "", attrs
    total = int(attrs["data-images-total"])
    assert total > 0 and int(attrs["data-images-loaded"]) == total
    assert total == page.read_text().count("<img ")

    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1400,1000", url)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not _console_lines(res.stderr), _console_lines(res.stderr)
    assert shot.is_file()
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 1000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) blank"


def test_bar_chart_legend_keeps_long_series_names():
    from wsss.report.html import bar_chart_svg

    long = "pseudo masks (train, CAM + dense CRF, temperature chosen on val)"
    svg = bar_chart_svg(["grass", "sky"], [("a", long, {"grass": 50.0, "sky": 70.0}),
                                          ("b", "maps (test)", {"grass": 40.0, "sky": None})])
    width = float(re.search(r'width="(\d+)"', svg).group(1))
    legend = re.findall(r'<text x="(\d+)" y="(\d+)" class="legend">([^<]*)</text>', svg)
    assert [t for _x, _y, t in legend] == [long, "maps (test)"]
    assert len({y for _x, y, _t in legend}) == 2  # one line each, not side by side
    # the longest label (at ~6.6 px per character) ends inside the chart
    x, _y, text = legend[0]
    assert float(x) + 6.6 * len(text) <= width


def test_self_training_rounds_are_drawn_as_a_curve_with_a_row_per_round():
    from wsss.report.html import render_report

    rounds = [{"round": 1, "masks": {"source": "pseudo", "train_miou": 63.1}, "train_seconds": 10,
               "network": {"val": {"miou": 54.6}, "test": {"miou": 56.1}}},
              {"round": 2, "masks": {"source": "relabelled by round 1", "rule": "threshold", "rule_value": 0.5,
                                     "chosen_on": "val", "kept_fraction": 0.983, "train_miou": 61.9},
               "network": {"val": {"miou": 53.9}, "test": {"miou": 55.7}}}]
    page = render_report({"run": "r", "dataset": "d", "splits": {}, "self_training": {"rounds": rounds}})
    section = page[page.index("Self-training rounds"):]
    assert section.count("<polyline") == 3  # training masks, network on val, network on test
    assert "threshold 0.5 (val)" in section and "98.3%" in section and "<td>55.7</td>" in section
    assert render_report({"run": "r", "dataset": "d", "splits": {}}).count("Self-training rounds") == 0
