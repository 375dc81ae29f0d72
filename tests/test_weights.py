"""Pretrained encoder weights through the real S3 store: pushed once, then every build loads them offline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import segmentation_models_pytorch as smp
from segpipe import weights
from segpipe.cli import main as cli
from segpipe.models import build_model
from segpipe.storage import ArtifactStore


@pytest.mark.services
def test_weights_pushed_to_s3_load_into_the_encoder_without_internet(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")         # the hub must not be needed
    torch.manual_seed(123)
    donor = smp.encoders.get_encoder("resnet18", weights=None)   # stands in for the published imagenet file
    f = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(f))

    assert cli(["weights", "push", str(f), "resnet18"]) == 0
    assert ArtifactStore(s3_env).exists("weights/resnet18/imagenet.safetensors")

    model = build_model("unet", "resnet18", 3, encoder_weights="imagenet")
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v, msg=k)
    assert (tmp_path / "cache" / "resnet18" / "imagenet.safetensors").is_file()


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(weights.WeightsUnavailable, match="segpipe weights fetch resnet18"):
        build_model("unet", "resnet18", 3, encoder_weights="imagenet")
    with pytest.raises(KeyError, match="available"):
        build_model("unet", "resnet18", 3, encoder_weights="instagram")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    assert cli(["weights", "push", str(bad), "resnet18"]) == 1      # a file that does not fit is refused
