import pytest

from wsss.cli import main
from wsss.config import config_hash, load_config
from wsss.errors import ConfigError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "maps.scales=[0.5, 1]", "train.scale_range=[0.5, 2]",
                             "runtime.precision=fp32", "model.pretrained=false"])
    assert cfg.train.epochs == 3
    assert cfg.maps.scales == [0.5, 1.0] and all(isinstance(s, float) for s in cfg.maps.scales)
    assert cfg.train.scale_range == (0.5, 2.0)
    assert cfg.model.pretrained is False


def test_unknown_key_suggests_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.epoch" in msg and "Did you mean 'epochs'" in msg


def test_unknown_section_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'maps'"):
        load_config(None, ["mapps.scales=[1]"])


@pytest.mark.parametrize("override", ["model.pretrained='False'", "model.pretrained=0", "train.epochs=2.5",
                                      "runtime.precision=fp16", "train.scale_range=[1, 2, 3]", "maps.scales=1"])
def test_bad_values_rejected(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_string_false_is_never_true():
    # the argparse trap: "False" must not silently enable anything
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, ["model.freeze_bn=\"False\""])


def test_hash_changes_with_settings():
    a, b = load_config(None), load_config(None, ["maps.scales=[1.0]"])
    assert config_hash(a.train) == config_hash(b.train)
    assert config_hash(a.maps) != config_hash(b.maps)


def test_runtime_settings_in_the_stage_keys():
    """runtime.precision changes map values (the maps key has it); progress bars change nothing (in no key)."""
    from wsss.stages.pipeline import STAGES

    decls = {d.name: d for d in STAGES if d.name in ("cls", "maps", "seg", "pred")}

    def keys(*overrides):
        cfg = load_config(None, list(overrides))
        return {n: config_hash(d.settings(cfg)) for n, d in decls.items()}

    base = keys()
    assert keys("runtime.progress=false") == base
    # explicit precisions: the default (auto) resolves at load to the machine's own, fp32 on a CPU without bf16 units
    fp32, bf16 = keys("runtime.precision=fp32"), keys("runtime.precision=bf16")
    assert fp32["maps"] != bf16["maps"] and fp32["cls"] != bf16["cls"] and fp32["seg"] != bf16["seg"]
    assert base in (fp32, bf16)
    assert keys("runtime.accelerator=cpu")["cls"] != base["cls"]
    for override in ("seg.train.lr=0.01", "seg.model.freeze_bn=false", "seg.model.weights_file=w.pth"):
        seg = keys(override)
        assert seg["seg"] != base["seg"] and seg["cls"] == base["cls"] and seg["maps"] == base["maps"], override


def test_cli_reports_config_typo_cleanly(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbon: resnet50\n")
    assert main(["train-cls", str(p)]) == 2
    err = capsys.readouterr().err
    assert "model.backbon" in err and "backbone" in err and "Traceback" not in err


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(p)
