"""``wsss bench methods``: one subprocess run per (method, seed), a table of mean ± std read back from the runs' files,
failures reported per run, finished runs reused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from wsss.bench import bench_methods, load_method_overrides, markdown_table
from wsss.bench.methods import COLUMNS, mean_std, plan_runs, run_rounds, run_values, summarize
from wsss.cli import main
from wsss.config import load_config
from wsss.errors import ConfigError
from wsss.methods import METHODS

from conftest import fast_overrides, make_voc_dataset

# a second method when one is registered (cheap batch-only ones first); with cam alone, cam over two seeds
_CHEAP = ("hide_and_seek", "mixup", "cutmix")
_OTHER = next((m for m in _CHEAP if m in METHODS), next((m for m in METHODS.names() if m != "cam"), None))
UNDER_TEST = ["cam", _OTHER] if _OTHER else ["cam"]
SEEDS = [0, 1]


class Bench:
    def __init__(self, base: Path):
        self.root = make_voc_dataset(base / "toy")
        self.runs = base / "runs"
        self.config = base / "toy.yaml"
        self.config.write_text(yaml.safe_dump({"name": "ignored"}))
        self.overrides = [o for o in fast_overrides(self.root, self.runs, **{"train.epochs": 1, "crf.workers": 0})
                          if not o.startswith("name=")]
        self.lines: list[str] = []

    def __call__(self, **kw):
        args = {"methods": UNDER_TEST, "seeds": SEEDS, "overrides": self.overrides, "prefix": "b",
                "echo": self.lines.append, **kw}
        return bench_methods(self.config, **args)

    def run_dir(self, method: str, seed: int, prefix: str = "b") -> Path:
        return self.runs / f"{prefix}-{method}-s{seed}"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    b = Bench(tmp_path_factory.mktemp("bench"))
    b.first = b()
    return b


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_one_row_per_method_with_every_column_and_runs_made_as_ordinary_runs(bench):
    res = bench.first
    assert [r["method"] for r in res["rows"]] == UNDER_TEST
    for row in res["rows"]:
        assert row["status"] == "ok" and row["seeds_ok"] == SEEDS
        assert row["supervision"] == "I"  # no method under test reads a saliency network
        assert set(row["columns"]) == {c.key for c in COLUMNS}
        assert all(row["columns"][c.key]["n"] == 2 for c in COLUMNS)
        for r in row["runs"]:
            assert r["source"] == "ran" and r["returncode"] == 0
    for method in UNDER_TEST:
        for seed in SEEDS:
            d = bench.run_dir(method, seed)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            assert cfg["method"]["name"] == method and cfg["seed"] == seed
            assert cfg["seg"]["enabled"] is False and cfg["pseudo"]["refiners"] == ["crf"]
            assert not (d / "seg").exists()
            assert json.loads((d / "pseudo" / "stage.json").read_text())["refiners"] == ["crf"]  # CRF masks
    cam = res["rows"][0]
    assert cam["epoch_ratio_to_cam"] == pytest.approx(1.0)
    # written files: the JSON is the returned result, the Markdown has a line per method
    out = bench.runs / "b"
    assert json.loads((out / "table.json").read_text()) == json.loads(json.dumps(res))
    md = (out / "table.md").read_text()
    for method in UNDER_TEST:
        assert f"| {method} | ok | 0,1 |" in md
    assert any("[1/" in line for line in bench.lines) and md.splitlines()[-1] in bench.lines[-2]


def test_mean_and_std_are_those_of_the_runs_metrics(bench):
    rows = {r["method"]: r for r in bench.first["rows"]}
    for method in UNDER_TEST:
        ms = [_metrics(bench.run_dir(method, s)) for s in SEEDS]
        # the classifier's record in metrics.json: its training time (over the epochs of summary.json) and epochs
        cls = [m["stages"]["cls"] for m in ms]
        assert all(r["epochs"] == len(json.loads((bench.run_dir(method, s) / "cls" / "summary.json").read_text())
                                      ["history"]) for r, s in zip(cls, SEEDS))
        expected = {
            "cls_map_test": [m["splits"]["test"]["classifier"]["mAP"] for m in ms],
            "map_miou_train": [m["splits"]["train"]["maps"]["miou"] for m in ms],
            "pseudo_miou_train": [m["pseudo"]["miou"] for m in ms],
            "map_miou_test": [m["splits"]["test"]["maps"]["miou"] for m in ms],
            "wall_seconds": [r["train_seconds"] + sum(v["seconds"] for v in m["timing"]["maps"].values())
                             for m, r in zip(ms, cls)],
            "epoch_seconds": [r["train_seconds"] / r["epochs"] for r in cls],
        }
        assert all(m["pseudo"]["split"] == "train" for m in ms)
        for key, (a, b) in expected.items():
            got = rows[method]["columns"][key]
            assert got["mean"] == pytest.approx((a + b) / 2), key
            assert got["std"] == pytest.approx(abs(a - b) / math.sqrt(2), abs=1e-9), key  # sample std of two
        rss = [json.loads((bench.run_dir(method, s) / "bench.json").read_text())["peak_rss_mb"] for s in SEEDS]
        assert all(100 < v < 64_000 for v in rss)  # a process with torch loaded, in MB
        assert rows[method]["columns"]["peak_rss_mb"]["mean"] == pytest.approx(sum(rss) / 2)
    if len(UNDER_TEST) > 1:
        cam, other = (rows[m]["columns"]["epoch_seconds"]["mean"] for m in UNDER_TEST)
        assert rows[UNDER_TEST[1]]["epoch_ratio_to_cam"] == pytest.approx(other / cam)


def test_rerun_through_the_cli_reuses_finished_runs(bench, capsys):
    models = {(m, s): bench.run_dir(m, s) / "cls" / "model.pt" for m in UNDER_TEST for s in SEEDS}
    mtimes = {k: p.stat().st_mtime_ns for k, p in models.items()}
    argv = ["bench", "methods", "--config", str(bench.config), "--methods", ",".join(UNDER_TEST),
            "--seeds", ",".join(map(str, SEEDS)), "--prefix", "b", *bench.overrides]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert {k: p.stat().st_mtime_ns for k, p in models.items()} == mtimes
    assert "files reused" in out and f"| {UNDER_TEST[-1]} | ok | 0,1 |" in out
    again = json.loads((bench.runs / "b" / "table.json").read_text())
    for new, old in zip(again["rows"], bench.first["rows"], strict=True):
        assert all(r["source"] == "reused" and r["run_seconds"] is None for r in new["runs"])
        assert new["columns"] == old["columns"]  # peak RSS read back from each run's bench.json


def test_a_crashing_run_is_reported_and_the_others_finish(bench):
    # a file where seed 7's stage store must go: that run's process crashes (an OSError) in its first stage
    blocked = bench.run_dir("cam", 7)
    blocked.mkdir(parents=True)
    (blocked / "store").write_text("not a folder")  # the stage store cannot be made: an OSError, not a wsss error
    res = bench(seeds=[0, 7], out=bench.runs / "crash")
    rows = {r["method"]: r for r in res["rows"]}
    cam = rows["cam"]
    assert cam["status"] == "1/2 ok" and cam["seeds_ok"] == [0]
    failed = next(r for r in cam["runs"] if r["seed"] == 7)
    assert failed["status"] == "failed" and failed["returncode"] not in (0, None)
    assert "NotADirectoryError" in failed["error"] and Path(failed["log"]).exists()
    # the mean over the seed that finished is that seed's number, with no spread
    assert cam["columns"]["map_miou_train"]["mean"] == _metrics(bench.run_dir("cam", 0))["splits"]["train"]["maps"]["miou"]
    assert cam["columns"]["map_miou_train"]["std"] is None
    for other in UNDER_TEST[1:]:
        assert rows[other]["status"] == "ok" and rows[other]["seeds_ok"] == [0, 7]
    md = (bench.runs / "crash" / "table.md").read_text()
    assert "| cam | 1/2 ok | 0 |" in md and "cam seed 7: exit code" in md


def test_the_cli_exits_nonzero_when_a_run_failed_but_still_writes_the_table(bench, tmp_path, capsys):
    per_method = tmp_path / "methods.yaml"
    per_method.write_text(yaml.safe_dump({"cam": ["method.options.no_such_option=1"]}))
    out = tmp_path / "failing"
    argv = ["bench", "methods", "--config", str(bench.config), "--methods", "cam", "--seeds", "0",
            "--prefix", "clifail", "--out", str(out), "--method-overrides", str(per_method), *bench.overrides]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 benchmark run(s) failed: cam seed 0" in err
    assert "| cam | failed |" in (out / "table.md").read_text()


def test_a_bad_method_option_fails_that_method_with_its_option_list(bench):
    res = bench(methods=["cam"], seeds=[0], prefix="opt", out=bench.runs / "opt",
                method_overrides={"cam": ["method.options.no_such_option=1"]})
    row = res["rows"][0]
    assert row["status"] == "failed" and row["seeds_ok"] == []
    assert all(c["mean"] is None for c in row["columns"].values())
    err = row["runs"][0]["error"]
    assert "no_such_option" in err and "method 'cam' takes" in err
    assert "| cam | failed | – |" in markdown_table(res["rows"])


def test_multi_round_runs_count_every_round_and_carry_the_round_report(tmp_path):
    """A run laid out as Adversarial Erasing writes it (constructed metrics.json): the time of every round's
    classifier and of the mining between rounds is counted, and the round records are carried."""
    d = tmp_path / "run"
    d.mkdir()
    stages = {"cls": {"role": "classifier", "round": 1, "epochs": 2, "train_seconds": 22.0, "key": "a"},
              "mined_r1": {"role": "mining", "round": 1, "stage_seconds": 1.5},
              "cls_r2": {"role": "classifier", "round": 2, "epochs": 2, "train_seconds": 30.0},
              "mined_r2": {"role": "mining", "round": 2, "stage_seconds": 2.5},
              "maps": {"splits": {}}, "pseudo": {"seconds": 4.0}}
    (d / "metrics.json").write_text(json.dumps({
        "splits": {"train": {"maps": {"miou": 40.0}}, "test": {"classifier": {"mAP": 80.0}}},
        "pseudo": {"split": "train", "miou": 45.0},
        "timing": {"maps": {"train": {"seconds": 3.0}, "test": {"seconds": 2.0}}}, "stages": stages}))
    v = run_values(d, load_config(None, []))
    assert v["train_seconds"] == 52.0 and v["epochs"] == 4 and v["classifiers"] == 2
    assert v["epoch_seconds"] == 13.0
    assert v["wall_seconds"] == 52.0 + 4.0 + 5.0 and v["crf_seconds"] == 4.0
    assert (v["map_miou_train"], v["cls_map_test"], v["pseudo_miou_train"], v["map_miou_test"]) == (40, 80, 45, None)
    assert [r["stage"] for r in run_rounds(d)] == ["cls", "mined_r1", "cls_r2", "mined_r2"]
    assert "key" not in run_rounds(d)[0]
    assert run_rounds(tmp_path) == []


def test_a_run_whose_config_does_not_load_fails_alone_without_a_process(bench):
    res = bench(seeds=[0], out=bench.runs / "badkey", method_overrides={"cam": ["train.no_such_key=1"]})
    rows = {r["method"]: r for r in res["rows"]}
    failed = rows["cam"]["runs"][0]
    assert rows["cam"]["status"] == "failed" and failed["returncode"] is None
    assert "unknown config key 'train.no_such_key'" in failed["error"]
    for other in UNDER_TEST[1:]:
        assert rows[other]["status"] == "ok" and rows[other]["runs"][0]["source"] == "reused"


# -- pure parts: overrides, planning, statistics -------------------------------------------------------------------

def test_method_overrides_file_lists_mappings_and_forced_keys(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump({"cam": ["train.lr=0.02"],
                                 "acol": {"method": {"options": {"threshold": 0.6, "name": "x"}}, "train.epochs": 3}},
                                sort_keys=False))
    assert load_method_overrides(f) == {"cam": ["train.lr=0.02"],
                                        "acol": ['method.options.threshold=0.6', 'method.options.name="x"',
                                                 "train.epochs=3"]}
    f.write_text(yaml.safe_dump({"cam": {"seed": 3}}))
    with pytest.raises(ConfigError, match="'seed' is set by the benchmark"):
        load_method_overrides(f)
    f.write_text(yaml.safe_dump({"cam": ["seg={}"]}))
    with pytest.raises(ConfigError, match="'seg' is set by the benchmark"):
        load_method_overrides(f)
    f.write_text(yaml.safe_dump({"cam": "train.lr=0.02"}))
    with pytest.raises(ConfigError, match="list of key=value"):
        load_method_overrides(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_method_overrides(tmp_path / "missing.yaml")


def test_unknown_method_in_list_or_overrides_is_rejected_before_any_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    with pytest.raises(ConfigError, match="unknown method 'camm'.*Did you mean 'cam'"):
        bench_methods(cfg, ["camm"], echo=None, out=tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        bench_methods(cfg, ["cam"], method_overrides={"nope": ["train.lr=1"]}, echo=None, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_planned_runs_differ_only_in_method_seed_and_the_methods_own_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": {"name": "cam", "options": {"from_file": 1}}, "train": {"epochs": 3}}))
    plan = plan_runs(["cam"], [0, 5], "p", ["train.epochs=2"], {"cam": ["train.lr=0.5"]})
    assert [(r.name, r.seed) for r in plan] == [("p-cam-s0", 0), ("p-cam-s5", 5)]
    c = load_config(cfg, list(plan[1].overrides))
    assert (c.name, c.seed, c.method.name, c.method.options) == ("p-cam-s5", 5, "cam", {})  # file options dropped
    assert (c.train.epochs, c.train.lr, c.seg.enabled, c.pseudo.refiners, c.runtime.progress) == (2, 0.5, False, ["crf"], False)


def test_mean_std_summary_and_ratio_on_constructed_records():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2, "values": [1.0, 3.0]}
    assert mean_std([4.0, None]) == {"mean": 4.0, "std": None, "n": 1, "values": [4.0, None]}

    def rec(method, seed, epoch, miou, ok=True):
        r = {"method": method, "seed": seed, "status": "ok" if ok else "failed", "error": "boom", "log": None,
             "supervision": "I+S" if method == "x" else "I"}
        if ok:
            r["values"] = {"epoch_seconds": epoch, "map_miou_train": miou}
        return r

    rows = summarize(["cam", "x", "y"], [rec("cam", 0, 10.0, 50.0), rec("cam", 1, 12.0, 54.0),
                                         rec("x", 0, 22.0, 60.0), rec("x", 1, 0, 0, ok=False),
                                         rec("y", 0, 0, 0, ok=False)])
    cam, x, y = rows
    assert cam["status"] == "ok" and x["status"] == "1/2 ok" and y["status"] == "failed"
    assert cam["columns"]["map_miou_train"]["mean"] == 52.0
    assert cam["columns"]["map_miou_train"]["std"] == pytest.approx(math.sqrt(8))
    assert x["epoch_ratio_to_cam"] == pytest.approx(2.0) and y["epoch_ratio_to_cam"] is None
    md = markdown_table(rows)
    assert "| cam | ok | 0,1 | – | 52.0 ± 2.8 |" in md
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert lines["| cam"].endswith("| I |") and lines["| x"].endswith("| I+S |")
    assert "- x seed 1: boom" in md and "- y seed 0: boom" in md
