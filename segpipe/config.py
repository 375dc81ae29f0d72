"""Typed params: one frozen model per `params.yaml` section, rejecting unknown and missing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segpipe.profiles import PROFILE_KEY, PROFILES_KEY, ProfileError, apply_profile

DEFAULT_PARAMS = Path("params.yaml")

TRASH_CLASSES = (
    "Background", "General trash", "Paper", "Paper pack", "Metal", "Glass",
    "Plastic", "Styrofoam", "Plastic bag", "Battery", "Clothing",
)


class ParamsError(ValueError):
    """A params file or section is missing, malformed or has unknown/missing keys."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    layout: Literal["coco", "mask_png"] = "coco"
    root: str                      # dataset folder (COCO layout of DESIGN.md, or mask-PNG layout)
    classes: tuple[str, ...]       # index = pixel value; index 0 is the background
    overlap: Literal["max", "last", "first"] = "max"   # rasterising overlaps: max class index wins (baseline)
    unknown: Literal["background", "class", "ignore"] = "background"  # what an UNKNOWN category becomes
    ignore_index: int = 255        # label value excluded from loss and metric
    hidden_labels: str = ""        # leaderboard-only labels of the test split (emulator); empty for real data
    # JPEG EXIF orientation, the same in validation, rasterisation, training and inference (segpipe.photos): apply
    # (photos as the camera showed them; COCO width/height checked against that size), ignore (pixels as stored),
    # reject (a photo with an orientation fails validation, named)
    exif_orientation: Literal["apply", "ignore", "reject"] = "apply"


class GenerateParams(Section):
    # demo | competition: the generator's numbers and folder layout (segpipe.synth.SHAPES, a dep of the stage);
    # each key below left out (None) takes the shape's value, a key given overrides it
    shape: Literal["demo", "competition"] = "demo"
    n_train: int | None = Field(default=None, gt=0)     # images in train_all.json
    n_test: int | None = Field(default=None, gt=0)      # images in test.json (labels go to the leaderboard only)
    image_size: int | None = Field(default=None, ge=32)
    n_batches: int | None = Field(default=None, ge=1)   # batch folders (the competition shape has its three)
    val_fraction: float | None = Field(default=None, gt=0, lt=1)   # train.json / val.json split of train_all.json
    seed: int = 0
    objects_per_image: float | None = Field(default=None, gt=0)    # mean objects per photo; the competition's ~7.9
    unknown_fraction: float | None = Field(default=None, ge=0, lt=1)   # annotations labelled UNKNOWN (> 0 adds it)
    colours: Literal["overlapping", "distinct"] | None = None   # distinct: a hue band per class (learnable fast)
    class_balance: float | None = Field(default=None, ge=0, le=1)   # 0: real class frequencies; 1: all equal
    min_object: float | None = Field(default=None, ge=0, lt=0.5)    # smallest object radius, fraction of the side


class ValidateParams(Section):
    max_empty_images: int = Field(ge=0)     # images with no annotation tolerated before failing
    grayscale: Literal["convert", "fail"] = "convert"
    max_bad_records: int = Field(ge=0, default=0)
    sample_grid: int = Field(ge=0, default=12)   # images in the EDA overlay grid


class SplitParams(Section):
    n_folds: int = Field(ge=2)
    seed: int = 0
    # auto: keep each batch folder in one fold (near-duplicates) only when there are >= n_folds folders and the
    # grouped folds stay balanced, else per image; batch: always group (fails with too few folders); none: per image
    group_by: Literal["auto", "batch", "none"] = "auto"
    subset: int = Field(ge=0, default=0)   # > 0: only this many training images, picked by rare-class coverage


class ModelSpec(Section):
    """One model of the zoo; its dump in a checkpoint's resolved config is all segpipe.ensemble needs to rebuild it."""

    arch: str                       # a name in segpipe.models.ARCHITECTURES
    encoder: str                    # an smp encoder (or `tu-<timm name>`); resnet50/101 for fcn; vgg16_bn for segnet
    encoder_weights: str | None = None   # "imagenet" when available (see README); None for tests/offline
    # image-level "which classes are present" head (smp aux_params, U-Net 3+'s CGM), trained with BCE at this
    # weight beside the segmentation loss; 0 = no head
    aux_weight: float = Field(ge=0, default=0.0)
    # deep supervision (unet3plus decoder stages, fcn's aux head): each side output trained with the segmentation
    # loss at this weight (U-Net 3+ paper: 1, torchvision's FCN recipe: 0.5); 0 = no side heads
    side_weight: float = Field(ge=0, default=0.0)
    # inference: classes whose presence probability is below this get no pixels (needs aux_weight > 0); 0 = off
    presence_threshold: float = Field(ge=0, lt=1, default=0.0)
    kwargs: dict[str, Any] = Field(default_factory=dict)   # extra constructor arguments, e.g. {decoder_channels: [..]}

    @model_validator(mode="after")
    def _threshold_needs_head(self) -> "ModelSpec":
        if self.presence_threshold > 0 and self.aux_weight == 0:
            raise ValueError("presence_threshold > 0 needs the class-presence head: set aux_weight > 0")
        return self


LOSS_NAMES = ("ce", "dice", "focal", "lovasz")

DEFAULT_AUGMENT = ({"HorizontalFlip": {"p": 0.5}}, {"VerticalFlip": {"p": 0.5}},
                   {"ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02, "p": 0.3}})


class TrainParams(Section):
    models: dict[str, ModelSpec]    # name -> spec; the matrix key
    seeds: tuple[int, ...]
    folds: tuple[int, ...]          # which folds to train (subset of range(split.n_folds))
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    input_size: int = Field(ge=32)  # images are resized to this square for training/inference
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(ge=0, lt=1, default=0.9)        # sgd only (Nesterov)
    schedule: Literal["cosine", "poly"] = "cosine"          # after the linear warmup
    poly_power: float = Field(gt=0, default=0.9)
    grad_accum: int = Field(ge=1, default=1)                 # micro-batches per optimiser step
    grad_clip: float = Field(ge=0, default=5.0)              # max grad norm; 0 = off
    amp: bool = True                # bf16 where the GPU supports it, fp16 + GradScaler otherwise; fp32 on CPU
    channels_last: bool = True
    compile: bool = False           # torch.compile the model (pays off on a GPU for runs of more than minutes)
    num_workers: int = Field(ge=0)
    augment: tuple[dict[str, dict], ...] = DEFAULT_AUGMENT   # albumentations: [{Name: {kwargs}}, ...]
    loss: str | dict[str, float] = "ce+dice"   # ce, dice, focal, lovasz: `ce+dice` or {ce: 1.0, lovasz: 0.5}
    label_smoothing: float = Field(ge=0, lt=1, default=0.0)  # cross-entropy term only
    focal_gamma: float = Field(ge=0, default=2.0)
    class_weights: Literal["none", "eda"] = "none"   # eda: CE weights from the validate stage's class statistics
    ema: float = Field(ge=0, lt=1, default=0.0)     # EMA decay per optimiser step (e.g. 0.999); 0 = off
    swa_start: float = Field(gt=0, le=1, default=1.0)   # SWA averages the epochs from this fraction on; 1 = off
    keep_top_k: int = Field(ge=1, default=1)        # best-k checkpoints kept by val mIoU (epoch ensemble)
    threads: int = Field(ge=0, default=0)   # torch CPU threads per task; 0 = cores / parallel tasks

    @field_validator("loss")
    @classmethod
    def _known_losses(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        names = [n.strip() for n in v.split("+")] if isinstance(v, str) else list(v)
        unknown = sorted(set(names) - set(LOSS_NAMES))
        if unknown or not names:
            raise ValueError(f"Wrong loss {unknown}, supported losses: {list(LOSS_NAMES)}")
        return v


class RetrainParams(Section):
    epochs: int = Field(ge=1)       # the retrain round trains from scratch on train + pseudo-labelled test


TTAView = Literal["hflip", "vflip", "hvflip", "rot90", "rot270"]


class SlidingWindowParams(Section):
    enabled: bool = False           # on: images decoded at image_size, predicted in windows of the member's input_size
    image_size: int = Field(ge=0, default=0)        # the square size images are decoded at (> input_size to matter)
    overlap: float = Field(ge=0, lt=1, default=0.5)   # share of a window its neighbour covers again
    blend: Literal["gaussian", "uniform"] = "gaussian"   # gaussian: window centres outweigh edges (no seams)

    @model_validator(mode="after")
    def _size_when_enabled(self) -> "SlidingWindowParams":
        if self.enabled and self.image_size <= 0:
            raise ValueError("image_size must be > 0 when enabled (the size images are decoded at, e.g. 512)")
        return self


class InferParams(Section):
    tta: tuple[TTAView, ...] = ("hflip",)   # views besides identity; inverses are applied to the probabilities
    scales: tuple[float, ...] = (1.0,)      # multi-scale TTA: input resized by each factor, probabilities back
    batch_size: int = Field(ge=1)
    sliding_window: SlidingWindowParams = SlidingWindowParams()
    members: Literal["best", "top_k"] = "best"   # top_k: also every member's kept epochs (train.keep_top_k > 1)
    voting: Literal["soft", "hard"] = "soft"     # soft: weighted mean of probabilities; hard: weighted majority
    weight_search: bool = True      # model-level weights by coordinate ascent on the OOF mIoU; off: equal weights
    weight_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)   # values each model's weight is tried at
    ablation: bool = True           # round 0 also scores single model / +flip / +multi-scale / fold ensemble

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if 1.0 not in v or any(s <= 0 for s in v) or len(set(v)) != len(v):
            raise ValueError(f"scales {list(v)} must be distinct, positive and include 1.0 (the plain prediction)")
        return v

    @field_validator("weight_grid")
    @classmethod
    def _grid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not any(w > 0 for w in v) or any(w < 0 for w in v):
            raise ValueError(f"weight_grid {list(v)} needs non-negative values, at least one > 0")
        return v


class PseudoParams(Section):
    rounds: int = Field(ge=0, default=1)         # pseudo -> retrain rounds in the Prefect flow (dvc.yaml runs one)
    threshold: float = Field(gt=0, lt=1)         # min max-probability for a pixel to be kept
    class_thresholds: dict[str, float] = Field(default_factory=dict)   # class name -> its own threshold
    min_confident_fraction: float = Field(ge=0, le=1)  # images below this kept share are dropped
    unknown: bool = False           # unsure pixels become UNKNOWN (needs UNKNOWN in data.classes), not ignore
    # who labels the test images fold k's student trains on: fold = the members of fold k (they never trained on
    # fold k's images, so its OOF figure stays clean); all = the whole ensemble (its other folds' members trained on
    # fold k: the student's OOF mIoU is then optimistic)
    teacher: Literal["fold", "all"] = "fold"

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: t for k, t in v.items() if not 0 < t < 1}
        if bad:
            raise ValueError(f"thresholds must be in (0, 1), got {bad}")
        return v


class AblationParams(Section):
    submit: bool = True             # one leaderboard submission per row, with the ablation key's own daily limit
    description: str = "segpipe ablation"


class AuditParams(Section):
    show: int = Field(ge=0, default=12)          # the worst images drawn in the grid (photo | truth | prediction)
    action: Literal["none", "drop", "relabel"] = "none"   # what the next training round does with the worst n
    n: int = Field(ge=0, default=0)              # how many of the worst images the action touches
    relabel_threshold: float = Field(gt=0, lt=1, default=0.5)   # relabel: pixels under it become ignore
    # relabel: who draws the new label fold k's student trains on. fold = the members of fold k (never saw fold
    # k's images; run again on the listed images); all = the image's out-of-fold ensemble (its members trained on
    # fold k: the student's OOF mIoU is then optimistic)
    teacher: Literal["fold", "all"] = "fold"


class CompareParams(Section):
    light: str = "quick"            # the profile whose gains should predict the heavy profile's
    heavy: str = "full"
    metric: str = "artifacts/infer/r0/metrics.json:oof_miou"   # DVC metrics file and key an experiment is scored by


SubmitPolicy = Literal["always", "if_better", "never"]


class SubmitParams(Section):
    mode: Literal["submit", "dry-run"] = "submit"
    # which runs may spend a slot on their own: Prefect deployment name -> policy. A deployment not listed
    # never submits (its runs write and lint only): an unattended run spends slots only where someone said so.
    # if_better: only when this run's OOF mIoU beats the best OOF among earlier submissions (the history).
    policy: dict[str, SubmitPolicy] = Field(default_factory=dict)
    manual_policy: SubmitPolicy = "always"   # runs outside any deployment: `python -m pipelines.submit`, a flow call
    description: str = "segpipe"
    base_url: str
    competition_id: int
    wait_seconds: float = Field(ge=0, default=120)
    poll_seconds: float = Field(gt=0, default=2.0)   # score polling interval
    allow_last_slot: bool = False   # the nightly run never spends the day's last slot; keep it for a human
    # slots per UTC day, counted in the ledger, used only when the leaderboard has no limits endpoint (the
    # published protocol has none): a nightly run then still stops before the server refuses it
    daily_limit: int = Field(ge=1, default=10)
    ledger: str = ".segpipe/submissions.json"   # sha256 -> submission; outside the stage's DVC-wiped out dir
    cv_lb_margin: float = Field(ge=0, default=0.05)   # warn when a submission's |public - OOF mIoU| exceeds it
    # (the CV-vs-leaderboard history, submission_history.json, lives beside it for the same reason)


class FanoutParams(Section):
    slots_per_gpu: int = Field(ge=1)   # training tasks sharing one GPU (small models leave it idle otherwise)
    cpu_slots: int = Field(ge=1)       # parallel tasks on a machine with no GPU; threads are split between them
    # where the train tasks run: this machine (device leases above) or a Ray cluster (Ray's own scheduler;
    # the leases are not used there). Same code, same results.
    runner: Literal["local", "ray"] = "local"
    ray_address: str = ""              # e.g. 10.0.0.5:6379; "" = the cluster on this machine (`ray start --head`)
    gpus_per_task: float = Field(default=1.0, ge=0)   # Ray GPUs per member; 0.5 puts two small models on a GPU
    cpus_per_task: float = Field(default=1.0, gt=0)   # Ray CPUs per member (also its torch threads)
    # members forked from a process that has torch and the library imported (flows.warm), not a fresh
    # interpreter each: ~8 s less start-up per member; false if a CUDA library misbehaves after fork
    warm_start: bool = True


PARAM_SECTIONS: dict[str, type[Section]] = {
    "data": DataParams, "generate": GenerateParams, "validate": ValidateParams, "split": SplitParams,
    "train": TrainParams, "retrain": RetrainParams, "infer": InferParams, "pseudo": PseudoParams,
    "submit": SubmitParams, "fanout": FanoutParams, "ablation": AblationParams,
    "audit": AuditParams, "compare": CompareParams,
}

S = TypeVar("S", bound=Section)


def read_params(path: Path = DEFAULT_PARAMS, profile: str | None = None) -> dict:
    """Read the whole params file as a dict, with the active profile's overrides applied (segpipe.profiles)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the repository root or pass --params")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    try:
        return apply_profile(data, profile, str(path))
    except ProfileError as e:
        raise ParamsError(str(e)) from None


def parse_section(raw: dict, section: str, cls: type[S], source: str = "params.yaml") -> S:
    """Validate one section; the error names the file, the section and the offending key."""
    if section not in raw:
        raise ParamsError(f"{source}: section `{section}` is missing (expected keys: {sorted(cls.model_fields)})")
    try:
        return cls.model_validate(raw[section])
    except ValidationError as e:
        problems = "; ".join(
            f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ParamsError(f"{source}: {problems}") from None


def load_params(section: str, cls: type[S] | None = None, path: Path = DEFAULT_PARAMS) -> S:
    """Load and validate one section of `params.yaml`."""
    cls = cls or PARAM_SECTIONS[section]
    return parse_section(read_params(path), section, cls, str(path))


def load_all(path: Path = DEFAULT_PARAMS) -> dict[str, Section]:
    """Load every known section (fails on unknown top-level sections too)."""
    raw = read_params(path)
    unknown = sorted(set(raw) - set(PARAM_SECTIONS) - {PROFILE_KEY, PROFILES_KEY})
    if unknown:
        raise ParamsError(f"{path}: unknown sections {unknown}; valid: {sorted(PARAM_SECTIONS)}")
    return {name: parse_section(raw, name, cls, str(path)) for name, cls in PARAM_SECTIONS.items()}
