"""What the config alone can tell beyond types and ranges, checked at load by the plugins themselves: registered
names (method, backbones, localizer, saliency source, refiners) with the nearest valid one, the method's and the
refiners' options filled in with every default, and combinations that cannot run. Imports the registries (hence
torch); the registries' modules import only :mod:`wsss.config.typed` and :mod:`wsss.config.schema`, never this one.
"""

from __future__ import annotations

from wsss.config.schema import Config
from wsss.config.typed import _about, _error, _keys_of
from wsss.errors import ConfigError


def check_config(cfg: Config) -> Config:
    """What the config alone can tell beyond types and ranges: registered names (with the nearest valid one), the
    method's options, and combinations that cannot run. Raises :class:`ConfigError` naming the keys. Fills
    ``method.options`` (and, through ``wsss.refine.resolve_refiners``, the refiners' options) with every default.
    Imports the registries, hence torch."""
    from wsss import refine
    from wsss.localize import LOCALIZERS, build_localizer
    from wsss.localize.localizers import _GradientCAM
    from wsss.methods import METHODS
    from wsss.models.backbones import BACKBONES, check_backbone_config, is_transformer
    from wsss.saliency import SALIENCY_SOURCES

    with _about("method.name"):
        method = METHODS.get(cfg.method.name, key="method.name")
    try:
        cfg.method.options = method.resolve_options(cfg.method.options)
    except ConfigError as e:  # about the option keys its message names (an unknown one, one out of range)
        e.keys = _keys_of(e) or ("method.options",)  # type: ignore[attr-defined]
        raise
    with _about():
        check_backbone_config(cfg.model.backbone, cfg.model.output_stride, "model")
        check_backbone_config(cfg.seg.model.backbone, cfg.seg.model.output_stride, "seg.model")

    loc = cfg.maps.localizer
    with _about("maps.localizer"):
        loc_cls = LOCALIZERS.get(loc, key="maps.localizer")
    with _about("maps.target_layer", "maps.localizer"):
        build_localizer(loc, cfg.maps.target_layer)  # a localizer checks its own settings when built
    # the rules the localizers apply to the model at run time, told from the names alone
    if getattr(loc_cls, "needs_attention", False) and not is_transformer(cfg.model.backbone):
        others = [n for n in LOCALIZERS.names() if not getattr(LOCALIZERS.get(n), "needs_attention", False)]
        vits = [n for n in BACKBONES.names() if is_transformer(n)]
        raise _error(
            ("maps.localizer", "model.backbone"),
            f"maps.localizer '{loc}' reads a vision transformer's attention, but the model's backbone "
            f"(model.backbone={cfg.model.backbone}) has none (a CNN); localizers that apply to it: {', '.join(others)}. "
            f"Transformer backbones: {', '.join(vits)}")
    if cfg.maps.target_layer and is_transformer(cfg.model.backbone):
        others = [n for n in LOCALIZERS.names() if not issubclass(LOCALIZERS.get(n), _GradientCAM)]
        raise _error(
            ("maps.target_layer", "model.backbone"),
            f"gradient localizers need a spatial (B, C, h, w) activation, but maps.target_layer "
            f"'{cfg.maps.target_layer}' of the transformer backbone '{cfg.model.backbone}' outputs tokens; use "
            f"maps.target_layer '' (the backbone's feature map) or one of: {', '.join(others)}")
    try:
        method.check_config(cfg)  # what the method needs of the other settings
    except ConfigError as e:  # about the method and the settings its message names
        e.keys = ("method.name", *_keys_of(e))  # type: ignore[attr-defined]
        raise
    if cfg.seg.loss == "sec" and cfg.seg.masks != "pseudo":
        raise _error(("seg.loss", "seg.masks"),
                     "seg.loss=sec trains on localization cues from the maps; it needs seg.masks=pseudo")

    saliency = getattr(cfg, "saliency", None)
    if saliency is not None:
        with _about("saliency.source"):
            SALIENCY_SOURCES.get(saliency.source, key="saliency.source")
    with _about():
        refine.check_crf_config(cfg.crf)
        refine.resolve_refiners(cfg)
    return cfg


