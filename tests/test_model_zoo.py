"""Every registry architecture through the same engine on tiny CPU inputs: shapes, channels_last, autocast, a
backward pass, a few optimiser steps that lower the loss, eval output a plain tensor, rebuilt from its
checkpoint's config; U-Net 3+'s deep supervision and CGM losses; the class-presence head and its suppression."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from pipelines import train
from segpipe.config import ModelSpec, ParamsError, TrainParams, parse_section
from segpipe.engine import LoopConfig, predict_probs, train_model
from segpipe.datasets import ArrayDataset
from segpipe.ensemble import load_member
from segpipe.losses import SegLoss, presence_targets
from segpipe.models import ARCHITECTURES, DEEP_SUPERVISION, build_from_spec, build_model
from segpipe.outputs import SegOutput, suppress_absent
from tests.test_training_chain import DATA, make_tiny, tiny_train_params

C = 4
# one small configuration per registry entry (tiny widths where the constructor allows); (arch, encoder, kwargs, size)
ZOO = {
    "unet": ("resnet18", {}, 64),
    "unetplusplus": ("mobilenet_v2", {"decoder_channels": [32, 16, 16, 8, 8]}, 64),
    "fpn": ("tu-hrnet_w18_small", {}, 64),          # a timm encoder through smp's `tu-` prefix
    "pspnet": ("resnet18", {}, 64),
    "deeplabv3": ("mobilenet_v2", {"decoder_channels": 32}, 64),
    "deeplabv3plus": ("mobilenet_v2", {"decoder_channels": 32}, 64),
    "linknet": ("resnet18", {}, 64),
    "manet": ("resnet18", {"decoder_channels": [32, 16, 16, 8, 8]}, 64),
    "pan": ("mobilenet_v2", {"decoder_channels": 16}, 128),  # its attention module needs >= 128 px
    "upernet": ("mobilenet_v2", {"decoder_channels": 32}, 64),
    "segformer": ("mit_b0", {"decoder_segmentation_channels": 32}, 64),
    "dpt": ("tu-vit_tiny_patch16_224", {"decoder_intermediate_channels": [16, 32, 64, 64],
                                        "decoder_fusion_channels": 16}, 64),
    "unet3plus": ("resnet18", {"cat_channels": 8}, 64),
    "fcn": ("resnet50", {}, 64),
    "segnet": ("vgg16_bn", {"base_width": 8}, 64),
    "deconvnet": ("vgg16_bn", {"base_width": 8, "fc_channels": 64, "fc_kernel": 2}, 64),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning OpenMP threads run these tiny models 5-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registry_entry_is_covered():
    assert sorted(ZOO) == sorted(ARCHITECTURES)
    for name in ("unet", "unetplusplus", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "fcn", "segnet",
                 "deconvnet", "unet3plus"):
        assert name in ARCHITECTURES and name == name.lower()


def spec_for(arch: str, heads: bool = True) -> ModelSpec:
    encoder, kwargs, _ = ZOO[arch]
    return ModelSpec(arch=arch, encoder=encoder, kwargs=kwargs, aux_weight=0.5 if heads else 0.0,
                     side_weight=1.0 if heads and arch in DEEP_SUPERVISION else 0.0)


def batch(size: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable fixed batch: the class is a function of the image's colour."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0.8).long()
    return x.contiguous(memory_format=torch.channels_last), y


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_model_trains_predicts_and_rebuilds(arch, tmp_path):
    spec = spec_for(arch)
    size = ZOO[arch][2]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # timm/smp construction chatter
        model = build_from_spec(spec, C).to(memory_format=torch.channels_last)
    loss_fn = SegLoss("ce+dice", 255, side_weight=spec.side_weight, aux_weight=spec.aux_weight)
    x, y = batch(size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    model.train()
    losses = []
    for _ in range(6):
        out = model(x)                        # what the engine does: loss_fn(net(images), masks)
        assert isinstance(out, SegOutput) and out.logits.shape == (2, C, size, size)
        assert out.presence is not None and out.presence.shape == (2, C)
        assert len(out.side) == (0 if arch not in DEEP_SUPERVISION else 1 if arch == "fcn" else 4)
        loss = loss_fn(out, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{arch}: loss did not go down on a fixed batch: {losses}"

    model.eval()
    with torch.no_grad():
        logits = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert type(logits) is torch.Tensor and logits.shape == (2, C, size, size)
    assert low.shape == logits.shape and torch.isfinite(low.float()).all()

    # the checkpoint's resolved config (as JSON, as pipelines.train writes it) rebuilds the same model
    config = json.loads(json.dumps({"model": spec.model_dump(mode="json"), "num_classes": C}))
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "best.pt")
    rebuilt, _ = load_member(tmp_path / "best.pt", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x.contiguous()), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch, size, message", [
    ("unetplusplus", 72, "divisible by 32"), ("unet3plus", 72, "divisible by 32"), ("dpt", 72, "divisible by 16"),
    ("pan", 64, "at least 128"), ("segnet", 16, "at least 32"), ("deconvnet", 32, "at least 64"),
])
def test_wrong_input_sizes_say_which_sizes_work(arch, size, message):
    encoder, kwargs, _ = ZOO[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(arch, encoder, C, **kwargs).eval()
    with pytest.raises((RuntimeError, ValueError), match=message), torch.no_grad():
        model(torch.zeros(1, 3, size, size))


def test_odd_sizes_where_the_architecture_allows_them():
    """smp's Unet, SegNet (unpools to the exact pre-pooling size) and FCN (upsamples to the input size)."""
    x = torch.randn(1, 3, 72, 88)
    for arch in ("unet", "segnet", "fcn"):
        encoder, kwargs, _ = ZOO[arch]
        with torch.no_grad():
            assert build_model(arch, encoder, C, **kwargs).eval()(x).shape == (1, C, 72, 88)


def test_registry_errors_list_the_valid_options():
    with pytest.raises(KeyError, match="supported architectures: .*deconvnet"):
        build_model("unet4", "resnet18", C)
    with pytest.raises(KeyError, match=r"supported encoders: \['resnet50', 'resnet101'\]"):
        build_model("fcn", "resnet18", C)
    with pytest.raises(KeyError, match="supported encoders: .*vgg16_bn"):
        build_model("segnet", "resnet18", C)
    with pytest.raises(KeyError, match="not a timm model"):
        build_model("unet", "tu-resnet_nonexistent", C)
    with pytest.raises(KeyError, match="timm ViT encoders"):
        build_model("dpt", "resnet18", C)
    with pytest.raises(ValueError, match="no deep-supervision outputs.*fcn.*unet3plus"):
        build_model("unet", "resnet18", C, deep_supervision=True)
    with pytest.raises(TypeError) as e:
        build_model("segnet", "vgg16_bn", C, base_widht=8)
    assert "kwargs" in "".join(e.value.__notes__)
    raw = {"train": {**tiny_train_params().model_dump(mode="json"),
                     "models": {"m": {"arch": "unet", "encoder": "resnet18", "presence_threshold": 0.5}}}}
    with pytest.raises(ParamsError, match="needs the class-presence head"):
        parse_section(raw, "train", TrainParams)


def test_no_pretrained_download_for_torchvision_backbones(tmp_path, monkeypatch):
    """SegNet/DeconvNet/FCN take ImageNet weights only from the local torch hub cache, never the network."""
    from segpipe.weights import WeightsUnavailable
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for arch, encoder in (("segnet", "vgg16_bn"), ("fcn", "resnet50")):
        with pytest.raises(WeightsUnavailable, match="never downloads"):
            build_model(arch, encoder, C, encoder_weights="imagenet")


def test_vgg_encoder_loads_torchvision_weights_from_the_local_cache(tmp_path, monkeypatch):
    """A VGG16-BN file in the hub cache (random weights here) gives the same pool-5 features as torchvision's VGG."""
    import torchvision
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(0)
    # torchvision's VGG16-BN feature extractor alone (its classifier would add 120M parameters to initialise)
    ref = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    for m in ref.modules():   # non-trivial BN statistics, so the bias folding is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    url = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in ref.state_dict().items()},
               tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = build_model("segnet", "vgg16_bn", C, encoder_weights="imagenet").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x)[0], ref.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="base_width 64"):
        build_model("segnet", "vgg16_bn", C, encoder_weights="imagenet", base_width=8)


def test_unet3plus_deep_supervision_and_cgm_losses():
    torch.manual_seed(0)
    model = build_model("unet3plus", "resnet18", C, presence_head=True, deep_supervision=True, cat_channels=8)
    x, y = batch(64)
    out = model.train()(x)
    # side outputs: decoder stages at strides 4, 8, 16 and the deepest encoder map at 32 (the loss upsamples them)
    assert [s.shape[-1] for s in out.side] == [16, 8, 4, 2]
    loss_fn = SegLoss("ce+dice", 255, side_weight=0.7, aux_weight=0.3)
    terms = loss_fn.terms(out, y)
    assert set(terms) == {"ce", "dice", "side", "presence"} and all(torch.isfinite(v) for v in terms.values())
    total = loss_fn(out, y)
    assert total.item() == pytest.approx(terms["ce"].item() + terms["dice"].item() + 0.7 * terms["side"].item()
                                         + 0.3 * terms["presence"].item(), rel=1e-5)
    total.backward()
    for head in (*model.side_heads, model.cgm[1]):      # every extra head learns from its own loss
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="side_weight=0"):
        SegLoss("ce", 255, aux_weight=1.0)(model(x), y)
    with pytest.raises(ValueError, match="aux_weight=0"):
        SegLoss("ce", 255, side_weight=1.0)(model(x), y)


def test_presence_targets_skip_ignored_pixels():
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    y[0, 0, 0] = 2
    y[1, 0, 0] = 255
    y[1, 1, 1] = 3
    t = presence_targets(y, 4, 255)
    assert t.tolist() == [[1, 0, 1, 0], [1, 0, 0, 1]]


def test_presence_head_suppresses_ruled_out_classes_at_inference():
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", C, presence_head=True, presence_threshold=0.5)
    linear = model.classification_head[3]
    with torch.no_grad():   # the head says: background absent (never suppressed anyway), 1 present, 2 absent, 3 present
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([-10.0, 10.0, -10.0, 10.0]))
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    probs = predict_probs(model, images, 2, torch.device("cpu"), ("hflip",), channels_last=True)
    assert probs[:, 2].max() == 0                    # ruled out everywhere
    assert probs[:, 0].min() > 0 and probs[:, 1].max() > 0
    model.presence_threshold = 0.0                   # off: the same model predicts class 2 again
    assert predict_probs(model, images, 2, torch.device("cpu"))[:, 2].max() > 0

    logits = torch.zeros(1, 3, 2, 2)
    out = suppress_absent(logits, torch.tensor([[-9.0, -9.0, 9.0]]), 0.5)
    assert out[0, 0].max() == 0 and out[0, 1].max() < -1e3 and out[0, 2].max() == 0


def test_train_stage_wires_heads_into_loss_checkpoint_and_oof(tmp_path):
    """pipelines.train.run with U-Net 3+ (DS + CGM): the engine trains it, OOF probabilities come from the
    eval-mode logits, and load_member rebuilds it from best.pt's resolved config alone."""
    vdir = make_tiny(tmp_path, n_train=8, size=32)
    from pipelines import split
    from segpipe.config import SplitParams
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    spec = ModelSpec(arch="unet3plus", encoder="resnet18", aux_weight=0.5, side_weight=1.0, presence_threshold=0.1,
                     kwargs={"cat_channels": 8})
    params = tiny_train_params(models={"u3p": spec}, folds=(0,), epochs=1)
    out = tmp_path / "train" / "u3p-s0-f0"
    r = train.run(DATA, params, "u3p", 0, 0, vdir, tmp_path / "split", out)
    assert 0.0 <= r.best_miou <= 1.0
    oof = np.load(out / "oof.npz")["probs"]
    assert oof.shape[1:] == (3, 32, 32) and np.isfinite(oof.astype(np.float32)).all()
    model, cfg = load_member(out / "best.pt", torch.device("cpu"))
    assert cfg["model"]["side_weight"] == 1.0 and model.side_heads is not None and model.cgm is not None
    assert model.presence_threshold == pytest.approx(0.1)


def test_engine_trains_a_model_with_heads(tmp_path):
    """train_model drives a SegOutput-returning model (smp aux head) through its own loss call, EMA included."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    masks = (imgs[..., 0] > 128).astype(np.uint8)
    torch.manual_seed(0)
    net = build_model("fpn", "resnet18", 2, presence_head=True)
    cfg = LoopConfig(epochs=1, batch_size=2, lr=1e-3, weight_decay=0, warmup_epochs=0, amp=True, channels_last=True,
                     num_workers=0, seed=0, ema=0.9)
    res = train_model(net, SegLoss("ce", 255, aux_weight=1.0), ArrayDataset(imgs, masks), imgs, masks, cfg,
                      ["bg", "fg"], 255, tmp_path, {"t": 1})
    assert np.isfinite(res.history[0]["train_loss"]) and 0 <= res.best_miou <= 1


def test_unet3plus_takes_smp_encoder_weights_from_segpipe_weights(tmp_path, monkeypatch):
    """U-Net 3+'s smp encoder gets `imagenet` the way the smp models do: local cache / S3 store, no hub."""
    from safetensors.torch import save_file
    import segmentation_models_pytorch as smp
    from segpipe import weights
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    donor = smp.encoders.get_encoder("resnet18", weights=None)
    (tmp_path / "cache" / "resnet18").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()},
              str(tmp_path / "cache" / "resnet18" / "imagenet.safetensors"))
    model = build_model("unet3plus", "resnet18", C, encoder_weights="imagenet", cat_channels=8)
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v, msg=k)
