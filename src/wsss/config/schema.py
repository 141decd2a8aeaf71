"""Typed configuration of a wsss run.

Every setting of every stage lives in one tree of dataclasses. A YAML file plus ``key=value`` overrides is
validated against it at load time (see :mod:`wsss.config.load`): unknown keys are rejected with the nearest valid
name, values are type-checked (no ``"False"``-is-true surprises), and the fully resolved tree is written into the
run directory so a run can always be reproduced from its own folder.

Method-specific options are validated by the method plugin itself (``method.options``), because only the method
knows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    #: dataset root (VOC layout, COCO root, or a folder of images with a labels CSV)
    root: str = "../shared/data/msrc21"
    #: reader: voc (also MSRC-21, VOC + SBD), coco, folder
    format: Literal["voc", "coco", "folder"] = "voc"
    #: dataset spec (class names, palette, background, ignore index); default ``<root>/dataset.json``,
    #: else the built-in spec of the format (VOC / COCO)
    spec: str | None = None
    #: class names mapped to background (e.g. MSRC-21's stuff classes for an object/background task)
    to_background: list[str] = field(default_factory=list)
    train_split: str = "train"
    val_split: str | None = "val"
    test_split: str | None = "test"
    #: CSV of image-level labels for the folder reader (columns: image, labels separated by ';')
    labels_csv: str | None = None
    #: data-loader worker processes (0 = load in the main process)
    workers: int = 2
    #: use only the first N images of each split (quick experiments and tests)
    limit: int | None = None


@dataclass
class ModelConfig:
    #: backbone registered in wsss.models.backbones (mobilenet_v2, resnet50, ...)
    backbone: str = "mobilenet_v2"
    output_stride: Literal[16, 32] = 16
    #: ImageNet initialisation through torchvision's weights API (offline: the hub cache, see README)
    pretrained: bool = True
    #: a local state-dict file to initialise the backbone from instead (any torchvision-compatible file)
    weights_file: str | None = None
    #: keep BatchNorm in eval mode with frozen statistics and affine parameters (batches of 16 are too small)
    freeze_bn: bool = True


@dataclass
class MethodConfig:
    #: classifier-training recipe registered in wsss.methods (``wsss methods`` lists them)
    name: str = "cam"
    #: options of that method, validated by the method
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    #: learning rate of the backbone; the new head uses lr * head_lr_mult
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: polynomial learning-rate decay power (0 = constant)
    poly_power: float = 0.9
    crop_size: int = 320
    #: random rescale range before cropping
    scale_range: tuple[float, float] = (0.7, 1.3)
    hflip: bool = True
    #: fp32 (deterministic tests) or bf16 (autocast; 2.5-3.5x faster on CPUs with bf16 units and on GPUs)
    precision: Literal["fp32", "bf16"] = "bf16"
    channels_last: bool = True
    #: cpu, cuda, gpu or auto
    accelerator: str = "auto"
    #: processes (DDP when > 1; on CPU through gloo)
    devices: int = 1
    #: show a progress bar
    progress: bool = True


@dataclass
class MapsConfig:
    #: cam, grad_cam, grad_cam_pp (wsss.localize registry)
    localizer: str = "cam"
    #: backbone module whose activations Grad-CAM uses; "" = the backbone's output (the layer CAM reads)
    target_layer: str = ""
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    flip: bool = True
    #: how the views (scales x flips) are combined
    aggregate: Literal["sum", "mean", "max"] = "sum"
    #: per-class normalisation after aggregation and ReLU. max: divide by the class maximum (the WSSS
    #: convention: a fixed background threshold keeps its meaning); minmax: (m - min) / (max - min); none
    normalize: Literal["max", "minmax", "none"] = "max"
    #: which classes get maps: gt = the image-level labels; pred = classifier scores above pred_threshold
    labels: Literal["gt", "pred"] = "gt"
    pred_threshold: float = 0.5
    #: splits to extract maps for (names of data.*_split)
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    batch_size: int = 8
    precision: Literal["fp32", "bf16"] = "bf16"


@dataclass
class PseudoConfig:
    #: cam: the maps alone decide object extent (background threshold); saliency: a saliency map decides extent and
    #: the maps decide the class (Oh et al., CVPR 2017; settings in the ``saliency`` section, see wsss.saliency)
    method: Literal["cam", "saliency"] = "cam"
    #: background score for datasets with a background class; null = the value chosen on val by the sweep
    bg_threshold: float | None = None
    #: pixels whose winning normalised score is below this become ignore (255); null = no ignore band
    ignore_below: float | None = None
    #: split whose pseudo masks are written (the segmentation network trains on them)
    split: str = "train"


@dataclass
class CrfConfig:
    """Dense CRF (Kraehenbuehl & Koltun, NIPS 2011) as used by DeepLab / PSA / IRN; see wsss.refine.crf."""

    #: refine pseudo masks with the CRF
    enabled: bool = False
    #: unary = softmax(maps / temperature) over the image's classes (+ background)
    temperature: float = 0.1
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    #: datasets with background: PSA/IRN confident regions -- CRF at a low and a high background threshold, pixels
    #: where the two disagree become ignore (255). null = one CRF at the chosen threshold
    confident_bg_low: float | None = None
    confident_bg_high: float | None = None
    #: worker processes over images
    workers: int = 2


@dataclass
class SaliencyConfig:
    """Saliency-guided pseudo masks (Oh et al., CVPR 2017), used with ``pseudo.method: saliency``; see wsss.saliency."""

    #: saliency source registered in wsss.saliency: spectral_residual (Hou & Zhang, CVPR 2007; needs no file),
    #: frequency_tuned (Achanta et al., CVPR 2009), onnx (a salient-object model file), folder (precomputed PNGs)
    source: str = "spectral_residual"
    #: a pixel is object where its saliency (in [0, 1]) is above this; null = chosen on eval.select_on by a sweep
    #: over eval.sweep (each source has its own scale, so a fixed value rarely transfers between sources)
    threshold: float | None = None
    #: pixels whose saliency is within this distance of the threshold become ignore (255); null = no band
    ignore_band: float | None = None
    #: salient pixels whose best normalised map score among the image's classes is below this become ignore (255)
    #: (salient, but no labelled class claims them); null = off
    min_cam: float | None = None
    #: with crf.enabled: probability of the fused label in the CRF unary, the rest spread evenly (IRN's gt_prob)
    crf_gt_prob: float = 0.7
    #: spectral_residual: width the grey image is resized to (Hou & Zhang: 64) and the Gaussian smoothing sigma at
    #: that width (their code: 2.5)
    sr_width: int = 64
    sr_blur_sigma: float = 2.5
    #: onnx: model file; input (height, width), null = the model's own fixed input size; per-channel mean and std of
    #: the [0, 1] RGB input; how the output becomes [0, 1] (probability: clipped; logit: sigmoid; minmax: per image,
    #: as U2-Net's normPRED); which output (null = the first)
    onnx_path: str | None = None
    onnx_size: tuple[int, int] | None = None
    onnx_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    onnx_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    onnx_output: Literal["probability", "logit", "minmax"] = "probability"
    onnx_output_name: str | None = None
    #: folder: precomputed saliency maps ``<folder>/<id>.png`` (8-bit grey, 0-255, image-sized; as WSSS-BED ships them)
    folder: str | None = None


@dataclass
class SecConfig:
    """SEC losses (Kolesnikov & Lampert, ECCV 2016) for ``seg.loss: sec``; see wsss.seg.sec."""

    #: the three losses, each switchable for ablation
    seed: bool = True
    expand: bool = True
    constrain: bool = True
    #: localization cue: pixels whose best normalised class map is at least this (one label per pixel; the
    #: paper keeps pixels above 20 % of the class maximum)
    seed_threshold: float = 0.2
    #: datasets with background: background cue where every class map is below this
    bg_cue_threshold: float = 0.05
    #: GWRP decays: present foreground classes, background (absent classes use 0 = max pooling)
    fg_decay: float = 0.996
    bg_decay: float = 0.999
    #: the losses are computed on logits resized to 1/output_stride of the crop (8: the paper's 41x41 for 321x321)
    output_stride: int = 8


@dataclass
class SegConfig:
    """Segmentation network trained on pseudo masks (stage 4); see wsss.seg."""

    #: `wsss run` trains and evaluates the segmentation network (false: stop after pseudo masks)
    enabled: bool = True
    #: backbone registered in wsss.models.backbones, with torchvision's DeepLabV3 (ASPP) head
    backbone: str = "mobilenet_v2"
    output_stride: Literal[16, 32] = 16
    #: ASPP dilation rates (DeepLabV3 at output stride 16: 6, 12, 18)
    atrous_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    pretrained: bool = True
    #: pseudo = the pseudo masks of this run; gt = ground-truth masks (the fully supervised upper bound)
    masks: Literal["pseudo", "gt"] = "pseudo"
    #: ce = cross-entropy on the masks (ignoring 255); sec = SEC's seed/expand/constrain losses on localization cues
    #: from the maps (seg.sec.*; seg.masks must be pseudo)
    loss: Literal["ce", "sec"] = "ce"
    sec: SecConfig = field(default_factory=SecConfig)
    epochs: int = 20
    batch_size: int = 8
    #: 0.01 (the classifier's rate) leaves the pixel-wise CE stuck near 2.7 on MSRC-21; 0.001 fits in a few epochs
    lr: float = 0.001
    head_lr_mult: float = 10.0
    crop_size: int = 320
    scale_range: tuple[float, float] = (0.7, 1.3)
    #: inference views
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = True
    #: refine predictions with the dense CRF (crf.* kernel settings) on the image before the arg-max
    crf_postprocess: bool = False
    #: split predicted and scored (never trained on)
    predict_split: str = "test"


@dataclass
class EvalConfig:
    #: thresholds scored by the sweep (background threshold, or confidence threshold without background)
    sweep: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    #: split on which thresholds are chosen (never the reported one)
    select_on: str = "val"


@dataclass
class Config:
    name: str = "default"
    #: parent folder of run directories
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
