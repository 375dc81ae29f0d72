"""Pretrained encoder weights, fetched from the internet once and kept in the S3 store for every later run.

Lookup order for (encoder, weights): the local cache, then `weights/<encoder>/<weights>.safetensors` in the
artifact store (checksum verified), then the Hugging Face Hub repo that segmentation-models-pytorch names
for it (the only step that needs the internet; its file is pushed to the store so nightly runs never do).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import segmentation_models_pytorch as smp
from safetensors.torch import load_file
from torch import nn

from segpipe.storage import ArtifactStore, S3Config, StorageError

log = logging.getLogger(__name__)

CACHE_ENV = "SEGPIPE_WEIGHTS_DIR"


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are in neither the local cache, the S3 store, nor reachable on the hub."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "segpipe" / "weights"))


def store_key(encoder: str, weights: str) -> str:
    return f"weights/{encoder}/{weights}.safetensors"


def _settings(encoder: str, weights: str) -> dict:
    if encoder.startswith("tu-"):
        raise WeightsUnavailable(
            f"`{encoder}` is a timm encoder: timm loads its own pretrained weights from the Hugging Face cache "
            "(HF_HOME); fill that cache once, or use encoder_weights: null")
    encoders = smp.encoders.encoders
    if encoder not in encoders:
        raise KeyError(f"Wrong encoder name `{encoder}`, supported encoders: {sorted(encoders)}")
    available = encoders[encoder]["pretrained_settings"]
    if weights not in available:
        raise KeyError(f"Wrong pretrained weights `{weights}` for encoder `{encoder}`, available: {sorted(available)}")
    return available[weights]


def _default_store() -> ArtifactStore | None:
    try:
        return ArtifactStore(S3Config.from_env())
    except StorageError:        # no S3 configured: local cache and hub only
        return None


def from_hub(encoder: str, weights: str) -> Path:
    """Download smp's weights file for (encoder, weights) from the Hugging Face Hub (needs the internet)."""
    from huggingface_hub import hf_hub_download
    s = _settings(encoder, weights)
    try:
        return Path(hf_hub_download(s["repo_id"], filename="model.safetensors", revision=s["revision"]))
    except Exception as e:      # offline, hub down, repo moved: say what to do instead
        raise WeightsUnavailable(
            f"{encoder}/{weights} is not in the local cache ({cache_dir()}) or the S3 store ({store_key(encoder, weights)}), "
            f"and the hub is unreachable ({type(e).__name__}). On a machine with internet run "
            f"`segpipe weights fetch {encoder} --weights {weights}`, or `segpipe weights push FILE {encoder}`") from e


def resolve(encoder: str, weights: str, store: ArtifactStore | None = None) -> Path:
    """A local path to the weights file, filling the local cache and the store on the way."""
    _settings(encoder, weights)
    local = cache_dir() / encoder / f"{weights}.safetensors"
    if local.is_file():
        return local
    store = store if store is not None else _default_store()
    key = store_key(encoder, weights)
    if store is not None and store.exists(key):
        store.get_file(key, local)
        log.info("encoder weights %s/%s from %s", encoder, weights, store.url(key))
        return local
    src = from_hub(encoder, weights)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, local)
    if store is not None:
        store.put_file(local, key)
        log.info("encoder weights %s/%s kept in %s for later runs", encoder, weights, store.url(key))
    return local


def push(path: Path, encoder: str, weights: str, store: ArtifactStore | None = None) -> str:
    """Put a weights file obtained elsewhere into the store (after checking it fits the encoder)."""
    _settings(encoder, weights)
    enc = smp.encoders.get_encoder(encoder, weights=None)
    enc.load_state_dict(load_file(str(path)))      # a wrong file fails here, not in the nightly run
    store = store or ArtifactStore(S3Config.from_env())
    return store.put_file(path, store_key(encoder, weights))


def load_encoder_weights(model: nn.Module, encoder: str, weights: str, store: ArtifactStore | None = None) -> None:
    """What smp's `encoder_weights=` does, from our cache/store instead of the hub."""
    model.encoder.load_state_dict(load_file(str(resolve(encoder, weights, store))))
