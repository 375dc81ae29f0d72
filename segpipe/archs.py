"""Architectures smp lacks: SegNet, DeconvNet and U-Net 3+ written here from their papers; FCN from torchvision.

Every model here follows segpipe.outputs: logits (N, C, H, W) in eval mode; in training, a `SegOutput` when
it has deep-supervision side outputs or a class-presence head. None of them downloads anything: SegNet and
DeconvNet have no pretrained weights of their own (their VGG encoder can start from torchvision's ImageNet
VGG-BN weights, only when that file is already in the local torch hub cache); U-Net 3+ takes any smp encoder,
whose weights come through segpipe.weights like the smp models'.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from segpipe.outputs import SegOutput, finish

__all__ = ["SegNet", "DeconvNet", "UNet3Plus", "FCN", "PresenceHead", "SegOutput"]


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, transpose: bool = False) -> nn.Sequential:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, kernel, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PresenceHead(nn.Sequential):
    """Image-level "which classes are present" logits (N, C) from a feature map: pool, dropout, linear."""

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.2):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, classes))


def check_min_size(x: torch.Tensor, minimum: int, name: str, why: str) -> None:
    h, w = x.shape[-2:]
    if h < minimum or w < minimum:
        raise ValueError(f"Wrong input shape height={h}, width={w}: {name} needs height and width of at least "
                         f"{minimum} ({why}); raise train.input_size")


def check_divisible(x: torch.Tensor, stride: int, name: str) -> None:
    h, w = x.shape[-2:]
    if h % stride or w % stride:
        up = lambda n: -(-n // stride) * stride  # noqa: E731
        raise ValueError(f"Wrong input shape height={h}, width={w}: {name} needs height and width divisible by "
                         f"{stride}; pad or resize to ({up(h)}, {up(w)})")


def local_torchvision_weights(weights):  # a torchvision WeightsEnum member
    """`weights` if its file is already in the local torch hub cache; never downloads (nightly runs are offline)."""
    from segpipe.weights import WeightsUnavailable
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise WeightsUnavailable(
            f"torchvision's {weights} is not in the local torch hub cache ({path}); segpipe never downloads at run "
            f"time: copy that file there (from {weights.url} on a machine with internet), or use encoder_weights: null")
    return weights


# ----------------------------------------------------------------------------------------------- VGG-BN encoder

# convolutions per stage of the VGG configurations (Simonyan & Zisserman, table 1), each stage ends in a 2x2 pool
VGG_STAGES = {"vgg11_bn": (1, 1, 2, 2, 2), "vgg13_bn": (2, 2, 2, 2, 2), "vgg16_bn": (2, 2, 3, 3, 3),
              "vgg19_bn": (2, 2, 4, 4, 4)}


class VGGEncoder(nn.Module):
    """VGG with BatchNorm, five stages of 3x3 conv-BN-ReLU, each followed by 2x2 max-pooling that keeps its indices.

    Widths are (w, 2w, 4w, 8w, 8w) with w = `base_width` (64 in VGG); a smaller w gives a tiny model for tests.
    """

    def __init__(self, name: str, in_channels: int = 3, base_width: int = 64):
        super().__init__()
        if name not in VGG_STAGES:
            raise KeyError(f"Wrong encoder name `{name}`, supported encoders: {sorted(VGG_STAGES)}")
        self.name = name
        self.widths = tuple(base_width * m for m in (1, 2, 4, 8, 8))
        stages, cin = [], in_channels
        for n, cout in zip(VGG_STAGES[name], self.widths):
            stages.append(nn.Sequential(*[conv_bn_relu(cin if i == 0 else cout, cout) for i in range(n)]))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        """Pool-5 features (N, 8w, H/32, W/32), and per stage the pooling indices and the size before pooling."""
        switches = []
        for stage in self.stages:
            x = stage(x)
            size = x.shape[-2:]
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            switches.append((idx, size))
        return x, switches

    def load_torchvision(self) -> None:
        """ImageNet weights of torchvision's VGG-BN of the same name, from the local cache only (see module doc)."""
        import torchvision.models as tvm
        if self.widths[0] != 64:
            raise ValueError(f"ImageNet weights need the VGG widths (base_width 64), got base_width {self.widths[0]}")
        weights = local_torchvision_weights(tvm.get_model_weights(self.name).IMAGENET1K_V1)
        state = weights.get_state_dict(progress=False)
        # torchvision's `features` is one flat Sequential (conv, bn, relu, ..., pool) saved as features.<i>.<param>;
        # ours groups it by stage, and the two hold the same convolutions and batch norms in the same order
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            if k.startswith("features."):
                i, param = k.removeprefix("features.").split(".", 1)
                layers.setdefault(int(i), {})[param] = v
        ours = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        pending_bias = None
        for mod, (_, params) in zip(ours, sorted(layers.items()), strict=True):
            if isinstance(mod, nn.Conv2d):
                mod.weight.data.copy_(params["weight"])
                # our convolutions feed a BatchNorm and carry no bias: fold VGG's bias into the BN statistics
                pending_bias = params["bias"]
            else:
                mod.load_state_dict(params)
                mod.running_mean.sub_(pending_bias)


def _mirror_widths(widths: tuple[int, ...], convs: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """Decoder (cin, cout) per layer, deepest stage first: each stage keeps its width, its last layer narrows to the
    next finer stage's (as in SegNet and DeconvNet: the 512-wide stage 4 decoder ends in 256 channels)."""
    stages = []
    for s in reversed(range(len(widths))):
        out = widths[s - 1] if s > 0 else widths[0]
        stages.append([(widths[s], widths[s] if i < convs[s] - 1 else out) for i in range(convs[s])])
    return stages


class SegNet(nn.Module):
    """SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017), written from the paper.

    Encoder: the 13 convolutional layers of VGG16 with BatchNorm, 2x2 max-pooling whose indices (the "pooling
    switches") are stored. Decoder: for each encoder stage, deepest first, max-unpooling by that stage's indices
    (sparse maps, no learned upsampling) and then as many trainable 3x3 conv-BN-ReLU layers to densify them;
    a per-pixel (1x1) classifier on the last decoder output. Unpooling restores the exact pre-pooling size, so any
    input of at least 32x32 works. No pretrained weights of its own.
    """

    def __init__(self, encoder_name: str = "vgg16_bn", classes: int = 1, in_channels: int = 3,
                 presence: bool = False, encoder_weights: str | None = None, base_width: int = 64):
        super().__init__()
        self.encoder = VGGEncoder(encoder_name, in_channels, base_width)
        if encoder_weights is not None:
            _imagenet_only(encoder_weights, encoder_name)
            self.encoder.load_torchvision()
        convs = VGG_STAGES[encoder_name]
        self.decoder = nn.ModuleList(
            nn.Sequential(*[conv_bn_relu(i, o) for i, o in stage])
            for stage in _mirror_widths(self.encoder.widths, convs))
        self.classifier = nn.Conv2d(self.encoder.widths[0], classes, 1)
        self.presence_head = PresenceHead(self.encoder.widths[-1], classes) if presence else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegOutput:
        check_min_size(x, 32, "segnet", "five 2x2 poolings")
        deepest, switches = self.encoder(x)
        y = deepest
        for stage, (idx, size) in zip(self.decoder, reversed(switches)):
            y = stage(F.max_unpool2d(y, idx, 2, 2, output_size=size))
        presence = self.presence_head(deepest) if self.presence_head is not None else None
        return finish(self, self.classifier(y), (), presence)


class DeconvNet(nn.Module):
    """DeconvNet (Noh, Hong & Han, ICCV 2015), written from the paper.

    Encoder: VGG16's 13 conv layers, BatchNorm after each, max-pooling with stored switches; then fc6 and fc7 as
    convolutions (a `fc_kernel` x `fc_kernel` valid conv, 7 in the paper, then 1x1; 4096 channels), which on a
    224 px input collapse the 7x7 pool-5 map to 1x1. The decoder mirrors it: a `fc_kernel` deconvolution back to
    the pool-5 size, then per stage, deepest first, unpooling by the stored switches and 3x3 deconvolution
    (transposed convolution) layers with BatchNorm and ReLU, and a 1x1 score layer. Inputs need at least
    32 x fc_kernel px per side (224 with the paper's 7). No pretrained weights of its own.
    """

    def __init__(self, encoder_name: str = "vgg16_bn", classes: int = 1, in_channels: int = 3,
                 presence: bool = False, encoder_weights: str | None = None, base_width: int = 64,
                 fc_channels: int = 4096, fc_kernel: int = 7):
        super().__init__()
        self.encoder = VGGEncoder(encoder_name, in_channels, base_width)
        if encoder_weights is not None:
            _imagenet_only(encoder_weights, encoder_name)
            self.encoder.load_torchvision()
        self.fc_kernel = fc_kernel
        w5 = self.encoder.widths[-1]
        self.fc = nn.Sequential(   # fc6, fc7 as convolutions
            nn.Conv2d(w5, fc_channels, fc_kernel, bias=False), nn.BatchNorm2d(fc_channels), nn.ReLU(inplace=True),
            nn.Conv2d(fc_channels, fc_channels, 1, bias=False), nn.BatchNorm2d(fc_channels), nn.ReLU(inplace=True))
        self.defc = nn.Sequential(  # deconv-fc6: back to the pool-5 size
            nn.ConvTranspose2d(fc_channels, w5, fc_kernel, bias=False), nn.BatchNorm2d(w5), nn.ReLU(inplace=True))
        self.decoder = nn.ModuleList(
            nn.Sequential(*[conv_bn_relu(i, o, transpose=True) for i, o in stage])
            for stage in _mirror_widths(self.encoder.widths, VGG_STAGES[encoder_name]))
        self.score = nn.Conv2d(self.encoder.widths[0], classes, 1)
        self.presence_head = PresenceHead(fc_channels, classes) if presence else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegOutput:
        check_min_size(x, 32 * self.fc_kernel, "deconvnet", f"fc6 is a {self.fc_kernel}x{self.fc_kernel} conv on "
                       f"the 1/32 map; kwargs fc_kernel sets it")
        deepest, switches = self.encoder(x)
        fc = self.fc(deepest)
        y = self.defc(fc)
        for stage, (idx, size) in zip(self.decoder, reversed(switches)):
            y = stage(F.max_unpool2d(y, idx, 2, 2, output_size=size))
        presence = self.presence_head(fc) if self.presence_head is not None else None
        return finish(self, self.score(y), (), presence)


def _imagenet_only(weights: str, encoder: str) -> None:
    if weights != "imagenet":
        raise KeyError(f"Wrong pretrained weights `{weights}` for encoder `{encoder}`, available: ['imagenet']")


# ------------------------------------------------------------------------------------------------------ U-Net 3+

class UNet3Plus(nn.Module):
    """U-Net 3+ (Huang et al., ICASSP 2020), written from the paper, over any smp encoder (timm `tu-` included).

    Full-scale skip connections: every decoder stage sees every scale: the finer encoder maps max-pooled down,
    the same-scale encoder map, the coarser decoder maps (the deepest encoder map included) bilinearly upsampled,
    each through a 3x3 conv to `cat_channels` (64 in the paper), concatenated and fused by a 3x3 conv-BN-ReLU.
    The encoder's five stages sit at strides 2..32 here (the paper's plain encoder is at 1..16), so the main
    head's output is upsampled 2x to the input size.

    Full-scale deep supervision (`deep_supervision`): a 3x3 conv head on each decoder stage below the top one and on the
    deepest encoder map; in training they come back as `SegOutput.side` and the loss upsamples each to the mask.
    Classification-guided module (`presence`): dropout, 1x1 conv, global max-pool on the deepest map -> per-class
    presence logits, trained with BCE. The paper multiplies the side outputs by its argmax decision; with a
    softmax over many classes a hard zero gives an infinite loss wherever the CGM errs, so here the decision
    acts at inference only, through the model's presence threshold (classes ruled out get no pixels).
    The paper's ablation maps to: neither option (U-Net 3+), deep_supervision (w/ DS), both (w/ DS + CGM).
    """

    def __init__(self, encoder_name: str = "resnet34", classes: int = 1, in_channels: int = 3,
                 presence: bool = False, deep_supervision: bool = False, encoder_weights: str | None = None,
                 encoder_depth: int = 5, cat_channels: int = 64, cgm_dropout: float = 0.5):
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                                weights=encoder_weights)
        # skip the input itself (stride 1) and any empty level (mix-transformers have none at stride 2)
        self.levels = [i for i, c in enumerate(self.encoder.out_channels) if i > 0 and c > 0]
        enc = [self.encoder.out_channels[i] for i in self.levels]
        n, fused = len(enc), cat_channels * len(enc)
        if n < 2:
            raise ValueError(f"unet3plus needs an encoder with at least 2 feature levels, `{encoder_name}` has {n}")

        def src_channels(src: int, dst: int) -> int:   # encoder maps at or below dst's scale, decoder maps above
            return enc[src] if src <= dst or src == n - 1 else fused
        self.to_cat = nn.ModuleList(
            nn.ModuleList(conv_bn_relu(src_channels(s, d), cat_channels) for s in range(n)) for d in range(n - 1))
        self.fuse = nn.ModuleList(conv_bn_relu(fused, fused) for _ in range(n - 1))
        self.head = nn.Conv2d(fused, classes, 3, padding=1)
        side_in = [fused] * (n - 2) + [enc[-1]]       # decoder stages 1..n-2, then the deepest encoder map
        self.side_heads = nn.ModuleList(
            nn.Conv2d(c, classes, 3, padding=1) for c in side_in) if deep_supervision else None
        self.cgm = nn.Sequential(nn.Dropout(cgm_dropout), nn.Conv2d(enc[-1], classes, 1), nn.AdaptiveMaxPool2d(1),
                                 nn.Flatten()) if presence else None

    @staticmethod
    def _resample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        h, w = like.shape[-2:]
        if x.shape[-2] > h:     # finer map: non-overlapping max-pooling by the scale ratio
            return F.max_pool2d(x, x.shape[-2] // h)
        if x.shape[-2] < h:
            return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegOutput:
        check_divisible(x, self.encoder.output_stride, "unet3plus")
        feats = self.encoder(x)
        enc = [feats[i] for i in self.levels]
        n = len(enc)
        dec: list[torch.Tensor | None] = [None] * (n - 1) + [enc[-1]]   # the deepest encoder map is decoder n-1
        for d in reversed(range(n - 1)):
            sources = enc[:d + 1] + dec[d + 1:]
            parts = [conv(self._resample(src, enc[d])) for src, conv in zip(sources, self.to_cat[d])]
            dec[d] = self.fuse[d](torch.cat(parts, 1))
        logits = F.interpolate(self.head(dec[0]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        side: tuple[torch.Tensor, ...] = ()
        if self.side_heads is not None and self.training:   # only the loss reads them
            side = tuple(head(m) for head, m in zip(self.side_heads, dec[1:]))
        presence = self.cgm(enc[-1]) if self.cgm is not None else None
        return finish(self, logits, side, presence)


# ------------------------------------------------------------------------------------------------- FCN (torchvision)

class FCN(nn.Module):
    """FCN (Long, Shelhamer & Darrell, CVPR 2015) as torchvision builds it: a dilated ResNet-50/101 (output
    stride 8) and an FCN head, bilinear upsampling to the input size; any input size works.

    torchvision's forward returns a dict; this one returns logits (segpipe.outputs). Its auxiliary FCN head on
    layer3 (`deep_supervision`) is a side output trained through the loss's side_weight (torchvision's reference
    recipe weights it 0.5). State-dict keys are torchvision's (backbone., classifier., aux_classifier.).
    """

    ENCODERS = ("resnet50", "resnet101")

    def __init__(self, encoder_name: str = "resnet50", classes: int = 1, in_channels: int = 3,
                 presence: bool = False, deep_supervision: bool = False, encoder_weights: str | None = None):
        super().__init__()
        import torchvision.models as tvm
        from torchvision.models import segmentation as tvseg
        if encoder_name not in self.ENCODERS:
            raise KeyError(f"Wrong encoder name `{encoder_name}` for fcn, supported encoders: {list(self.ENCODERS)}")
        if in_channels != 3:
            raise ValueError(f"fcn takes 3-channel images, got in_channels={in_channels}")
        backbone_weights = None
        if encoder_weights is not None:
            _imagenet_only(encoder_weights, encoder_name)
            backbone_weights = local_torchvision_weights(tvm.get_model_weights(encoder_name).IMAGENET1K_V1)
        net = getattr(tvseg, f"fcn_{encoder_name}")(weights=None, weights_backbone=backbone_weights,
                                                    num_classes=classes, aux_loss=deep_supervision)
        self.backbone, self.classifier, self.aux_classifier = net.backbone, net.classifier, net.aux_classifier
        self.presence_head = PresenceHead(2048, classes) if presence else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | SegOutput:
        feats = self.backbone(x)
        logits = F.interpolate(self.classifier(feats["out"]), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        side = (self.aux_classifier(feats["aux"]),) if self.aux_classifier is not None and self.training else ()
        presence = self.presence_head(feats["out"]) if self.presence_head is not None else None
        return finish(self, logits, side, presence)
