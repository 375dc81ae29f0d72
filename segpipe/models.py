"""Model factory: a plain-dict registry over segmentation-models-pytorch (losses live in segpipe.losses)."""

from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import nn

# lower-case name -> smp class; every entry takes encoder_name / encoder_weights / in_channels / classes
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "pspnet": smp.PSPNet,
    "deeplabv3": smp.DeepLabV3,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "linknet": smp.Linknet,
    "manet": smp.MAnet,
    "pan": smp.PAN,
    "upernet": smp.UPerNet,
    "segformer": smp.Segformer,
}


def build_model(arch: str, encoder: str, num_classes: int, encoder_weights: str | None = None) -> nn.Module:
    """Build an smp model by registry name; `encoder_weights='imagenet'` comes from segpipe.weights (cache, S3, hub)."""
    key = arch.lower()
    if key not in ARCHITECTURES:
        raise KeyError(f"Wrong architecture `{arch}`, supported architectures: {sorted(ARCHITECTURES)}")
    if encoder not in smp.encoders.get_encoder_names() and not encoder.startswith("tu-"):
        raise KeyError(f"Wrong encoder name `{encoder}`, supported encoders: {smp.encoders.get_encoder_names()}")
    if encoder_weights is None or encoder.startswith("tu-"):   # timm encoders load their own weights
        return ARCHITECTURES[key](encoder_name=encoder, encoder_weights=encoder_weights, in_channels=3,
                                  classes=num_classes)
    from segpipe.weights import load_encoder_weights
    # built bare, then the encoder loaded from the local cache / S3 store: a nightly run needs no internet
    model = ARCHITECTURES[key](encoder_name=encoder, encoder_weights=None, in_channels=3, classes=num_classes)
    load_encoder_weights(model, encoder, encoder_weights)
    return model
