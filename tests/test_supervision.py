"""Which supervision each figure of a run used (metrics.json ``supervision``): I, I+S or F."""

from wsss.config import load_config
from wsss.stages.evaluate import summary_lines, supervision_of


def test_supervision_follows_the_saliency_source_and_the_masks(tmp_path):
    def sup(**o):
        return supervision_of(load_config(None, [f"{k}={v}" for k, v in o.items()]))

    plain = sup()
    assert (plain["maps"], plain["pseudo"], plain["seg"]) == ("I", "I", "I")
    # a classical saliency source learns from no pixel labels
    assert sup(**{"pseudo.refiners": "[saliency, crf]", "saliency.source": "spectral_residual"})["pseudo"] == "I"
    # a trained salient-object network does
    onnx = sup(**{"pseudo.refiners": "[saliency]", "saliency.source": "onnx"})
    assert (onnx["maps"], onnx["pseudo"], onnx["seg"]) == ("I", "I+S", "I+S")
    assert onnx["saliency_source"] == "onnx" and "I+S" in onnx["about"]
    # the configured source does not matter when no refiner reads it
    assert sup(**{"saliency.source": "onnx"})["pseudo"] == "I"
    assert sup(**{"seg.masks": "gt"})["seg"] == "F"
    line = summary_lines({"run": "r", "method": "cam", "backbone": "b", "localizer": "cam", "dataset": "d", "seed": 0,
                          "supervision": onnx, "splits": {}})[1]
    assert "pseudo masks I+S" in line and "segmentation network I+S" in line
