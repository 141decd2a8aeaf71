"""The CAM baseline (Zhou et al., CVPR 2016): multi-label soft-margin loss on globally pooled class maps.

Everything is the default of :class:`wsss.methods.base.Method`; this module only registers it by name.
"""

from wsss.methods.base import METHODS, Method


@METHODS.register("cam")
class CAM(Method):
    name = "cam"
