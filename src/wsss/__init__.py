"""wsss: weakly supervised semantic segmentation, from image-level tags to pixel masks.

The package tree follows the pipeline: ``data`` -> ``models`` -> ``methods`` -> ``engine`` (training) ->
``localize`` (maps) -> ``pseudo`` (pseudo masks) -> ``evaluation``; ``stages`` wires them into cached run-directory
stages and ``cli`` exposes them as ``wsss <stage>``; ``wsss.load_run(run_dir)`` (:mod:`wsss.api`) applies a
finished run to new images.
"""

__version__ = "0.1.0"

#: names importable from ``wsss`` itself, loaded on first use: ``import wsss`` stays light (no torch)
_LAZY = {"load_run": "wsss.api", "Run": "wsss.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wsss' has no attribute '{name}'")


def __dir__():
    return sorted([*globals(), *_LAZY])
