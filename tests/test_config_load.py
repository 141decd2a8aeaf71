"""Everything a config alone can tell is checked when it is loaded, before any data is read or any run folder made:
ranges, numeric strings, registered names, method options (filled in with every default), combinations that cannot
run, and which source (the YAML file or an override) a bad value came from."""

from __future__ import annotations

import dataclasses
import pickle
import re
import typing
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from wsss.cli import main
from wsss.config import config_hash, dump_config, load_config, schema
from wsss.config.load import MOVED_KEYS, to_dict
from wsss.errors import ConfigError, DataError
from wsss.models import build_backbone
from wsss.models.backbones import check_weights

REPO = Path(__file__).resolve().parents[1]
MSRC_YAML = str(REPO / "configs" / "msrc21.yaml")


# -- through the CLI: exit status 2, the key and the choices named, nothing read, no run folder -----------------------
@pytest.fixture
def run_cli(tmp_path, capsys):
    """``wsss run configs/msrc21.yaml <overrides>`` with a data root that does not exist (a config error must come
    before the data is looked at) and runs under tmp_path; returns (exit status, stderr)."""

    def run(*overrides: str) -> tuple[int, str]:
        rc = main(["run", MSRC_YAML, f"runs_dir={tmp_path / 'runs'}", "name=t", f"data.root={tmp_path / 'nowhere'}",
                   *overrides])
        err = capsys.readouterr().err
        assert not (tmp_path / "runs").exists(), "a run folder was created before the config was checked"
        assert "dataset root" not in err, "the data was looked at before the config was checked"
        assert "Traceback" not in err
        return rc, err

    return run


def test_cli_batch_size_zero_names_the_override_and_the_range(run_cli):
    rc, err = run_cli("train.batch_size=0")
    assert rc == 2
    assert "override 'train.batch_size=0'" in err and "train.batch_size: must be >= 1, got 0" in err
    assert "msrc21.yaml" not in err  # the file is not blamed for an override's value


def test_cli_unknown_backbone_suggests_the_nearest(run_cli):
    rc, err = run_cli("model.backbone=resnet5")
    assert rc == 2
    assert "override 'model.backbone=resnet5'" in err and "model.backbone" in err
    assert "Did you mean 'resnet50'" in err and "mobilenet_v2" in err  # the registered backbones are listed


def test_cli_misspelt_method_option_suggests_the_method_own_option(run_cli):
    rc, err = run_cli("method.name=adv_erase", "method.options.erase_treshold=0.5")
    assert rc == 2
    assert "override 'method.options.erase_treshold=0.5'" in err
    assert "Did you mean 'erase_threshold'" in err and "rounds, erase_threshold, max_erased_fraction" in err


def test_exponent_notation_is_a_number_in_overrides_and_files(tmp_path):
    assert load_config(MSRC_YAML, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\nseg:\n  train:\n    lr: 2.5e-4\n")
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.seg.train.lr) == (1e-3, 5e-4, 2.5e-4)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override", ["model.pretrained=1e-3", 'model.freeze_bn="1"', "train.hflip=0"])
def test_numeric_strings_never_make_bools(override):
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.lr=abc", "train.lr=.nan", "train.momentum=.inf", "train.epochs=1e1"])
def test_non_numbers_and_non_finite_numbers_refused(override):
    with pytest.raises(ConfigError, match="train.(lr|momentum|epochs): expected"):
        load_config(None, [override])


# -- ranges -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "train.epochs: must be >= 1, got 0"),
    ("train.epochs=-1", "train.epochs: must be >= 1, got -1"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.lr=0", "train.lr: must be > 0"),
    ("train.momentum=1", "train.momentum: must be in [0, 1), got 1.0"),
    ("train.weight_decay=-1e-4", "train.weight_decay: must be >= 0"),
    ("train.crop_size=8", "train.crop_size: must be >= 16"),
    ("train.scale_range=[1.3, 0.7]", "train.scale_range: the low value must not exceed the high one"),
    ("train.scale_range=[0, 1]", "train.scale_range[0]: every value must be > 0"),
    ("runtime.devices=0", "runtime.devices: must be >= 1"),
    ("data.limit=-1", "data.limit: must be >= 1 (or null), got -1"),
    ("data.limit=0", "data.limit: must be >= 1 (or null)"),
    ("data.workers=-1", "data.workers: must be >= 0"),
    ("maps.scales=[]", "maps.scales: needs at least one value"),
    ("maps.scales=[1.0, -0.5]", "maps.scales[1]: every value must be > 0, got -0.5"),
    ("maps.pred_threshold=1.5", "maps.pred_threshold: must be in [0, 1]"),
    ("maps.batch_size=0", "maps.batch_size: must be >= 1"),
    ("maps.splits=[]", "maps.splits: needs at least one value"),
    ("eval.sweep=[0.0, 0.5]", "eval.sweep[0]: every value must be in (0, 1), got 0.0"),
    ("eval.sweep=[]", "eval.sweep: needs at least one value"),
    ("seg.model.atrous_rates=[0, 6]", "seg.model.atrous_rates[0]: every value must be >= 1"),
    ("seg.train.epochs=0", "seg.train.epochs: must be >= 1"),
    ("seg.train.batch_size=0", "seg.train.batch_size: must be >= 1"),
    ("seg.train.lr=0", "seg.train.lr: must be > 0"),
    ("seg.train.momentum=1", "seg.train.momentum: must be in [0, 1), got 1.0"),
    ("seg.train.crop_size=8", "seg.train.crop_size: must be >= 16"),
    ("seg.train.scale_range=[1.3, 0.7]", "seg.train.scale_range: the low value must not exceed the high one"),
    ("seg.scales=[]", "seg.scales: needs at least one value"),
    ("seg.sec.fg_decay=1.5", "seg.sec.fg_decay: must be in [0, 1]"),
    ("seg.sec.loss_stride=0", "seg.sec.loss_stride: must be >= 1"),
    ("seed=-1", "seed: must be in [0, 4.29497e+09]"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and f"override '{override}'" in str(e.value)


def _numeric(tp) -> bool:
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis and typing.get_origin(tp) is not
               typing.Literal)


#: sections whose fields are being reworked by their owner (pseudo refiners); their ranges are checked by
#: wsss.refine at load
_OTHERS = {schema.PseudoConfig, schema.CrfConfig, schema.SaliencyConfig}


def _sections(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if tp not in _OTHERS:
                yield from _sections(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def test_every_numeric_setting_declares_its_range():
    missing = [key for key, tp, f in _sections(schema.Config) if _numeric(tp) and "bounds" not in f.metadata]
    assert missing == []


def test_defaults_and_shipped_configs_are_within_range():
    load_config(None)
    for p in sorted((REPO / "configs").glob("*.yaml")):
        load_config(p)


def test_a_section_set_in_part_keeps_the_defaults_of_its_place(tmp_path):
    """seg.train is the classifier's schedule type with the segmentation network's own defaults: a config that sets
    some of its keys (one key, the whole section, the file) keeps the others at seg's defaults, not the classifier's."""
    default = load_config(None)
    assert (default.train.lr, default.train.batch_size, default.seg.train.lr, default.seg.train.batch_size) == (
        0.01, 16, 0.001, 8)
    # what seg borrowed from train before it had its own schedule
    shared = ("momentum", "weight_decay", "poly_power", "epochs", "head_lr_mult", "crop_size", "scale_range", "hflip")
    assert [getattr(default.seg.train, k) for k in shared] == [getattr(default.train, k) for k in shared]
    p = tmp_path / "c.yaml"
    p.write_text("seg:\n  train:\n    epochs: 3\n")
    for path, overrides in ((None, ["seg.train.epochs=3"]), (None, ["seg.train={epochs: 3}"]),
                            (None, ["seg={train: {epochs: 3}}"]), (p, [])):
        cfg = load_config(path, overrides)
        assert cfg.seg.train == dataclasses.replace(default.seg.train, epochs=3), overrides
        assert cfg.seg.model == default.seg.model and cfg.train == default.train


# -- keys of older configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,moved", [
    ("train.precision=fp32", "runtime.precision"),
    ("train.progress=false", "runtime.progress"),
    ("train.devices=2", "runtime.devices"),
    ("maps.precision=fp32", "runtime.precision"),
    ("seg.backbone=resnet18", "seg.model.backbone"),
    ("seg.pretrained=false", "seg.model.pretrained"),
    ("seg.epochs=3", "seg.train.epochs"),
    ("seg.lr=0.01", "seg.train.lr"),
    ("seg.sec.output_stride=4", "seg.sec.loss_stride"),
])
def test_a_moved_key_fails_as_unknown_and_says_where_it_went(override, moved):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override '{override}': unknown config key '{key}': it moved to '{moved}'."


def test_an_older_config_file_is_refused_naming_the_moved_key(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("train:\n  epochs: 5\n  precision: fp32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: unknown config key 'train.precision': it moved to 'runtime.precision'."
    p.write_text("seg:\n  enabled: true\n  output_stride: 16\n")
    with pytest.raises(ConfigError, match=re.escape("'seg.output_stride': it moved to 'seg.model.output_stride'")):
        load_config(p)


def test_every_moved_key_is_unknown_and_names_a_setting():
    settings = to_dict(schema.Config())
    for old, new in MOVED_KEYS.items():
        with pytest.raises(ConfigError, match=f"unknown config key '{re.escape(old)}': it moved to '{re.escape(new)}'"):
            load_config(None, [f"{old}=1"])
        node = settings
        for part in new.split("."):
            assert isinstance(node, dict) and part in node, (old, new)
            node = node[part]


# -- where a bad value came from ------------------------------------------------------------------------------------
def test_a_file_value_is_blamed_on_the_file_and_an_override_on_the_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.epochs=3"])
    assert str(e.value).startswith(f"{p}: train.batch_size: must be >= 1") and "override" not in str(e.value)
    assert load_config(p, ["train.batch_size=4"]).train.batch_size == 4  # an override fixes the file's value
    p.write_text("train:\n  batch_size: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.batch_size=0"])
    assert str(e.value).startswith("override 'train.batch_size=0': train.batch_size") and str(p) not in str(e.value)
    with pytest.raises(ConfigError, match=r"^override 'train=\{batch_size: 0\}': train.batch_size"):
        load_config(p, ["train={batch_size: 0}"])  # an override of the whole section


def test_a_combination_names_each_source(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("maps:\n  normalize: minmax\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["method.name=adv_erase"])
    msg = str(e.value)
    assert "override 'method.name=adv_erase'" in msg and str(p) in msg and "maps.normalize=max" in msg


def test_malformed_overrides_are_named():
    with pytest.raises(ConfigError, match="override 'maps.scales=\\[1,': the value is not valid YAML"):
        load_config(None, ["maps.scales=[1,"])
    with pytest.raises(ConfigError, match="override 'train..lr=1'"):
        load_config(None, ["train..lr=1"])


# -- registered names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,hint", [
    ("method.name=adv_erse", "Did you mean 'adv_erase'"),
    ("model.backbone=resnet5", "Did you mean 'resnet50'"),
    ("seg.model.backbone=mobilenetv2", "Did you mean 'mobilenet_v2'"),
    ("maps.localizer=gradcam", "Did you mean 'grad_cam'"),
    ("saliency.source=spectral_residul", "Did you mean 'spectral_residual'"),
])
def test_registered_names_checked_at_load_with_the_nearest(override, hint):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"{key}: unknown" in str(e.value) and hint in str(e.value) and "Registered:" in str(e.value)


# -- method options -------------------------------------------------------------------------------------------------
def test_method_options_are_filled_with_every_default_and_hash_like_the_spelled_out_defaults(tmp_path):
    empty = load_config(None, ["method.name=adv_erase"])
    assert empty.method.options == {"rounds": 3, "erase_threshold": 0.8, "max_erased_fraction": 0.9}
    spelled = load_config(None, ["method.name=adv_erase", "method.options.rounds=3",
                                 "method.options.erase_threshold=0.8", "method.options.max_erased_fraction=0.9"])
    assert config_hash(empty.method) == config_hash(spelled.method)
    assert config_hash(empty) == config_hash(spelled)
    # the written config lists every default, and reads back as the same config
    dump_config(empty, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["method"]["options"] == {"rounds": 3, "erase_threshold": 0.8, "max_erased_fraction": 0.9}
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(empty)


def test_method_options_of_tuples_and_dataset_defaults_round_trip(tmp_path):
    cfg = load_config(None, ["method.name=seam"])
    assert cfg.method.options["background"] is None  # resolved from the dataset when the method is built
    assert cfg.method.options["pcm_stages"] == []
    mdc = load_config(None, ["method.name=mdc"])
    assert mdc.method.options == {"dilations": [1, 3, 6, 9]}
    dump_config(mdc, tmp_path / "c.yaml")
    assert config_hash(load_config(tmp_path / "c.yaml")) == config_hash(mdc)


def test_method_option_errors_at_load():
    with pytest.raises(ConfigError, match="method.options.rounds: must be at least 1"):
        load_config(None, ["method.name=adv_erase", "method.options.rounds=0"])
    with pytest.raises(ConfigError, match="It takes no keys.*method 'cam' takes: no options"):
        load_config(None, ["method.options.rounds=2"])
    with pytest.raises(ConfigError, match="method.options: expected a mapping"):
        load_config(None, ["method.options=3"])


# -- combinations that cannot run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["maps.localizer=attention"], "maps.localizer 'attention' reads a vision transformer's attention"),
    (["maps.localizer=rollout", "model.backbone=resnet18"], "has none (a CNN)"),
    (["maps.localizer=cam", "maps.target_layer=layer3"], "maps.target_layer applies to grad_cam / grad_cam_pp only"),
    (["model.backbone=vit_small", "maps.localizer=grad_cam", "maps.target_layer=vit.blocks.0"],
     "gradient localizers need a spatial (B, C, h, w) activation"),
    (["model.backbone=vit_small", "model.output_stride=32"], "model.output_stride=32 does not apply"),
    (["seg.model.backbone=vit_test", "seg.model.output_stride=32"], "seg.model.output_stride=32 does not apply"),
    (["method.name=adv_erase", "maps.normalize=minmax"], "needs maps.normalize=max"),
    (["seg.loss=sec", "seg.masks=gt"], "it needs seg.masks=pseudo"),
])
def test_incompatible_combinations_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match="override '") as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_compatible_combinations_load():
    load_config(None, ["model.backbone=vit_small", "maps.localizer=attention"])
    load_config(None, ["model.backbone=vit_small", "maps.localizer=cam"])
    load_config(None, ["maps.localizer=grad_cam", "maps.target_layer=layer3", "model.backbone=resnet18"])
    load_config(None, ["method.name=adv_erase", "maps.normalize=max"])


# -- pretrained weights -----------------------------------------------------------------------------------------------
@pytest.fixture
def empty_hub(tmp_path):
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub" / "checkpoints"
    finally:
        torch.hub.set_dir(str(tmp_path / "unused"))


def test_check_weights_offline_names_the_hub_file(empty_hub):
    cfg = schema.ModelConfig(backbone="resnet18", pretrained=True)
    with pytest.raises(ConfigError) as e:
        check_weights(cfg, online=False)
    msg = str(e.value)
    assert str(empty_hub / "resnet18-f37072fd.pth") in msg and "model.weights_file" in msg
    check_weights(cfg, online=True)  # with network, torchvision downloads it
    with pytest.raises(ConfigError, match="seg.model.pretrained=false"):
        check_weights(schema.SegModelConfig(backbone="resnet18"), section="seg.model", online=False)
    # present in the hub cache: fine offline
    empty_hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), empty_hub / "resnet18-f37072fd.pth")
    check_weights(cfg, online=False)


def test_check_weights_mobilenet_from_the_offline_package_and_pretrained_off(empty_hub):
    check_weights(schema.ModelConfig(backbone="mobilenet_v2"), online=False)
    assert not empty_hub.exists()  # a check writes nothing
    check_weights(schema.ModelConfig(backbone="resnet50", pretrained=False), online=False)
    with pytest.raises(ConfigError, match="vit_test' has no pretrained weights"):
        check_weights(schema.ModelConfig(backbone="vit_test"), online=False)


def test_check_weights_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    check_weights(schema.ModelConfig(backbone="resnet18", weights_file=str(good)), online=False)
    with pytest.raises(ConfigError, match=f"model.weights_file {tmp_path / 'none.pth'} does not exist"):
        check_weights(schema.ModelConfig(backbone="resnet18", weights_file=str(tmp_path / "none.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match=f"model.weights_file {garbage}: not a readable state dict"):
        check_weights(schema.ModelConfig(backbone="resnet18", weights_file=str(garbage)))
    # the segmentation network's block, as seg.check_train hands it over
    seg = load_config(None, [f"seg.model.weights_file={garbage}", "seg.model.backbone=resnet18"]).seg.model
    with pytest.raises(DataError, match=f"seg.model.weights_file {garbage}: not a readable state dict"):
        check_weights(seg, section="seg.model")
    check_weights(dataclasses.replace(seg, weights_file=str(good)), section="seg.model", online=False)
    pickled = tmp_path / "pickled.pth"
    pickled.write_bytes(pickle.dumps({"weights": Path("x")}, protocol=2))  # a pickle weights_only refuses to run
    with pytest.raises(DataError, match="pickled.pth: not a readable state dict"):
        check_weights(schema.ModelConfig(backbone="resnet18", weights_file=str(pickled)))
    other = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], other)
    with pytest.raises(DataError, match="holds a list, not a state dict"):
        check_weights(schema.ModelConfig(backbone="resnet18", weights_file=str(other)))


def test_building_without_network_or_with_garbage_names_the_file(empty_hub, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ConfigError) as e:
        build_backbone(schema.ModelConfig(backbone="resnet18", pretrained=True))
    assert str(empty_hub / "resnet18-f37072fd.pth") in str(e.value) and "URLError" in str(e.value)
    empty_hub.mkdir(parents=True, exist_ok=True)
    (empty_hub / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(DataError, match="resnet18-f37072fd.pth: torchvision's cached ImageNet weights"):
        build_backbone(schema.ModelConfig(backbone="resnet18", pretrained=True))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage, not a pickle")
    with pytest.raises(DataError, match=f"{garbage}: not a readable state dict"):
        build_backbone(schema.ModelConfig(backbone="resnet18", pretrained=False, weights_file=str(garbage)))
