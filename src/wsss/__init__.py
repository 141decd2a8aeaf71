"""wsss: weakly supervised semantic segmentation, from image-level tags to pixel masks.

The package tree follows the pipeline: ``data`` -> ``models`` -> ``methods`` -> ``engine`` (training) ->
``localize`` (maps) -> ``pseudo`` (pseudo masks) -> ``evaluation``; ``stages`` wires them into cached run-directory
stages and ``cli`` exposes them as ``wsss <stage>``.
"""

__version__ = "0.1.0"
