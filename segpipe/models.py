"""Model factory: one plain-dict registry over smp, torchvision's FCN and segpipe's own SegNet, DeconvNet and U-Net 3+
(losses live in segpipe.losses; what a model returns is in segpipe.outputs)."""

from __future__ import annotations

from typing import Any, Mapping

import segmentation_models_pytorch as smp
from torch import nn

from segpipe.archs import FCN, VGG_STAGES, DeconvNet, SegNet, UNet3Plus, check_min_size
from segpipe.config import ModelSpec
from segpipe.outputs import SegOutput, finish

__all__ = ["ARCHITECTURES", "DEEP_SUPERVISION", "build_model", "build_from_spec", "SegOutput"]


class SmpHeads:
    """Mixin for an smp model: with aux_params its forward returns (masks, labels) in every mode; this one returns
    logits in eval mode (ruling out classes below `presence_threshold`) and a SegOutput in training."""

    presence_threshold = 0.0
    min_size = 0            # smallest input side beyond smp's divisibility check, and why
    min_size_why = ""

    def forward(self, x):
        if self.min_size:
            check_min_size(x, self.min_size, type(self).__name__.lower(), self.min_size_why)
        out = super().forward(x)
        if isinstance(out, tuple):
            masks, labels = out
            return finish(self, masks, (), labels)
        return out


# same class names and state-dict keys as smp's, so checkpoints from plain smp models load unchanged
class Unet(SmpHeads, smp.Unet): pass                    # noqa: E701
class UnetPlusPlus(SmpHeads, smp.UnetPlusPlus): pass    # noqa: E701
class FPN(SmpHeads, smp.FPN): pass                      # noqa: E701
class PSPNet(SmpHeads, smp.PSPNet): pass                # noqa: E701
class DeepLabV3(SmpHeads, smp.DeepLabV3): pass          # noqa: E701
class DeepLabV3Plus(SmpHeads, smp.DeepLabV3Plus): pass  # noqa: E701
class Linknet(SmpHeads, smp.Linknet): pass              # noqa: E701
class MAnet(SmpHeads, smp.MAnet): pass                  # noqa: E701


class PAN(SmpHeads, smp.PAN):
    # its Feature Pyramid Attention pools the stride-16 map three more times: 1/128 of the input must be >= 1 px
    min_size, min_size_why = 128, "its attention module pools the 1/16 map down to 1/128"


class UPerNet(SmpHeads, smp.UPerNet): pass              # noqa: E701
class Segformer(SmpHeads, smp.Segformer): pass          # noqa: E701
class DPT(SmpHeads, smp.DPT): pass                      # noqa: E701


# lower-case name -> class. smp classes (and UNet3Plus) take any smp encoder, timm `tu-` ones included;
# fcn takes resnet50 / resnet101; segnet and deconvnet take a VGG-BN (vgg16_bn in their papers).
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": Unet,
    "unetplusplus": UnetPlusPlus,
    "fpn": FPN,
    "pspnet": PSPNet,
    "deeplabv3": DeepLabV3,
    "deeplabv3plus": DeepLabV3Plus,
    "linknet": Linknet,
    "manet": MAnet,
    "pan": PAN,
    "upernet": UPerNet,
    "segformer": Segformer,
    "dpt": DPT,                 # ViT encoders only (`tu-vit_*`); inputs divisible by the patch size
    "unet3plus": UNet3Plus,
    "fcn": FCN,
    "segnet": SegNet,
    "deconvnet": DeconvNet,
}

# the architectures with deep-supervision side outputs (ModelSpec.side_weight > 0)
DEEP_SUPERVISION = ("fcn", "unet3plus")
SMP_ENCODER_ARCHS = tuple(k for k, v in ARCHITECTURES.items() if issubclass(v, SmpHeads)) + ("unet3plus",)
# constructor defaults segpipe sets where smp's would fail on segpipe's inputs
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "dpt": {"dynamic_img_size": True},   # timm ViTs are fixed to 224 px otherwise
}


def check_encoder(arch: str, encoder: str) -> None:
    """KeyError naming the valid encoders when `encoder` does not fit `arch`."""
    if arch in SMP_ENCODER_ARCHS:
        if encoder.startswith("tu-"):
            import timm
            if not timm.is_model(encoder.removeprefix("tu-")):
                raise KeyError(f"Wrong timm encoder `{encoder}`: `{encoder.removeprefix('tu-')}` is not a timm model "
                               f"(list them with timm.list_models('pattern*'))")
            return
        if arch == "dpt":
            raise KeyError(f"Wrong encoder name `{encoder}` for dpt: it takes timm ViT encoders, e.g. "
                           "`tu-vit_base_patch16_224.augreg_in21k`, `tu-vit_small_patch16_224`")
        if encoder not in smp.encoders.get_encoder_names():
            raise KeyError(f"Wrong encoder name `{encoder}`, supported encoders: {smp.encoders.get_encoder_names()} "
                           "or a timm encoder as `tu-<timm name>`")
    elif arch == "fcn" and encoder not in FCN.ENCODERS:
        raise KeyError(f"Wrong encoder name `{encoder}` for fcn, supported encoders: {list(FCN.ENCODERS)}")
    elif arch in ("segnet", "deconvnet") and encoder not in VGG_STAGES:
        raise KeyError(f"Wrong encoder name `{encoder}` for {arch}, supported encoders: {sorted(VGG_STAGES)}")


def build_model(arch: str, encoder: str, num_classes: int, encoder_weights: str | None = None, *,
                presence_head: bool = False, deep_supervision: bool = False, presence_threshold: float = 0.0,
                **kwargs: Any) -> nn.Module:
    """Build a registry model; `encoder_weights='imagenet'` comes from segpipe.weights (cache, S3, hub) for smp
    encoders, from the local torch hub cache for torchvision backbones (fcn, segnet, deconvnet), never downloaded.

    presence_head: an image-level class-presence head (smp aux_params; U-Net 3+'s CGM); deep_supervision: side
    outputs (fcn, unet3plus); presence_threshold: at inference, classes the head puts below it get no pixels.
    `kwargs` go to the architecture's constructor (smp decoder options, segnet `base_width`, ...).
    """
    key = arch.lower()
    if key not in ARCHITECTURES:
        raise KeyError(f"Wrong architecture `{arch}`, supported architectures: {sorted(ARCHITECTURES)}")
    check_encoder(key, encoder)
    if deep_supervision and key not in DEEP_SUPERVISION:
        raise ValueError(f"`{key}` has no deep-supervision outputs (side_weight must be 0); "
                         f"architectures with them: {list(DEEP_SUPERVISION)}")
    if presence_threshold > 0 and not presence_head:
        raise ValueError("presence_threshold needs the class-presence head: set aux_weight > 0 on the model")
    cls = ARCHITECTURES[key]
    kwargs = {**DEFAULT_KWARGS.get(key, {}), **kwargs}
    # smp encoders are built bare and loaded from the local cache / S3 store: a nightly run needs no internet;
    # timm encoders load their own weights (HF cache), torchvision backbones check the local hub cache
    via_store = encoder_weights is not None and key in SMP_ENCODER_ARCHS and not encoder.startswith("tu-")
    weights = None if via_store else encoder_weights
    try:
        if issubclass(cls, SmpHeads):
            aux = {"aux_params": {"classes": num_classes}} if presence_head else {}
            model = cls(encoder_name=encoder, encoder_weights=weights, in_channels=3, classes=num_classes,
                        **aux, **kwargs)
        else:
            heads = {"deep_supervision": deep_supervision} if key in DEEP_SUPERVISION else {}
            model = cls(encoder_name=encoder, classes=num_classes, in_channels=3, encoder_weights=weights,
                        presence=presence_head, **heads, **kwargs)
    except TypeError as e:
        e.add_note(f"while building `{key}` with kwargs {kwargs} (train.models.<name>.kwargs in params.yaml)")
        raise
    model.presence_threshold = presence_threshold
    if via_store:
        from segpipe.weights import load_encoder_weights
        load_encoder_weights(model, encoder, encoder_weights)
    return model


def build_from_spec(spec: ModelSpec | Mapping[str, Any], num_classes: int, pretrained: bool = True) -> nn.Module:
    """The model a ModelSpec describes, or its dump in a checkpoint's resolved config (older dumps lack the newer
    keys; their defaults rebuild the same model). pretrained=False skips encoder weights: a state dict follows."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(dict(spec))
    return build_model(spec.arch, spec.encoder, num_classes, spec.encoder_weights if pretrained else None,
                       presence_head=spec.aux_weight > 0, deep_supervision=spec.side_weight > 0,
                       presence_threshold=spec.presence_threshold, **spec.kwargs)
