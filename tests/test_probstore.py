"""How probabilities are stored (segpipe.probstore): the format round-trips, quantised members score as the float
ones do, and a member trained at 512 px stores exactly C x 256 x 256 bytes per image."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from segpipe.ensemble import score_probs
from segpipe.probstore import (STORE_SIZE, Rows, bytes_per_image, dequantise, npy_writer, npz_writer, stored_size,
                               to_stored)


def test_rows_written_in_chunks_read_back_as_written(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 5)).astype(np.uint8)
    names = np.array([f"img{i}.jpg" for i in range(7)])
    with npz_writer(tmp_path / "oof.npz", "probs", a.shape, file_names=names) as w:
        w.write(a[:3])
        w.write(a[3:])
    z = np.load(tmp_path / "oof.npz")                        # what np.savez wrote before: read the same way
    assert np.array_equal(z["probs"], a) and z["file_names"].tolist() == names.tolist()
    rows = Rows(tmp_path / "oof.npz", "probs")
    assert rows.shape == a.shape and rows.dtype == np.uint8 and len(rows) == 7
    assert np.array_equal(rows[2:5], a[2:5]) and np.array_equal(rows[-1], a[-1])
    assert np.array_equal(rows.read([6, 0, 1, 2, 4]), a[[6, 0, 1, 2, 4]])
    with npy_writer(tmp_path / "t.npy", a.shape, np.float16) as w:
        for start in range(0, 7, 2):
            w.write(a[start:start + 2])
    assert np.array_equal(np.load(tmp_path / "t.npy"), a.astype(np.float16))
    assert np.array_equal(Rows(tmp_path / "t.npy").read([5, 3]), a[[5, 3]].astype(np.float16))
    # a writer stopped early leaves no file behind, and no file that claims more rows than it has
    with pytest.raises(ValueError, match="4 rows written of the 7"):
        with npy_writer(tmp_path / "short.npy", a.shape) as w:
            w.write(a[:4])
    assert list(tmp_path.glob("*short*")) == []
    with pytest.raises(ValueError, match="do not fit"):
        with npy_writer(tmp_path / "wrong.npy", a.shape) as w:
            w.write(a[:, :2])
    np.savez_compressed(tmp_path / "c.npz", probs=a)
    with pytest.raises(ValueError, match="compressed"):
        Rows(tmp_path / "c.npz", "probs")
    with pytest.raises(KeyError, match="no array 'nope'"):
        Rows(tmp_path / "oof.npz", "nope")
    with zipfile.ZipFile(tmp_path / "oof.npz") as zf:
        assert zf.getinfo("probs.npy").compress_type == zipfile.ZIP_STORED


def test_quantised_probabilities_keep_the_bound_and_the_resolution_rule():
    assert [stored_size(s) for s in (64, 128, 256, 384, 512, 1024)] == [64, 128, 256, 256, 256, 256]
    assert bytes_per_image(11, 512) == 11 * 256 * 256 == 720_896 and bytes_per_image(3, 128) == 3 * 128 * 128
    p = torch.rand(2, 4, 64, 64).softmax(1)
    q = to_stored(p, 64)
    assert q.dtype == np.uint8 and q.shape == (2, 4, 64, 64)
    assert np.abs(dequantise(q) - p.numpy()).max() <= 0.5 / 255 + 1e-7          # round(p * 255) / 255
    big = to_stored(torch.rand(1, 4, 512, 512).softmax(1), 512)
    assert big.shape == (1, 4, STORE_SIZE, STORE_SIZE)
    f16 = np.full((1, 2, 3, 3), 0.25, np.float16)
    assert dequantise(f16).dtype == np.float32 and np.allclose(dequantise(f16), 0.25)   # older float files


def _smooth_probs(rng, n: int, c: int, size: int, truth: np.ndarray) -> np.ndarray:
    """Probabilities a member might give: the true class favoured, smooth noise fields per class (object-sized
    blobs, the model's mistakes) so that many pixels are contested between two classes."""
    coarse = torch.from_numpy(rng.normal(0, 1.5, (n, c, size // 16, size // 16)).astype(np.float32))
    noise = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    logits = noise + 3.0 * torch.from_numpy(np.eye(c, dtype=np.float32)[truth].transpose(0, 3, 1, 2))
    return logits.softmax(1).numpy()


@pytest.mark.parametrize("size", [128, 512])
def test_a_stored_member_scores_as_the_float_one(size):
    """The OOF mIoU at 256 (the figure every report shows) of a member stored and read back is within 1e-3 of its
    float probabilities' (float16 at its own size, as members were kept before)."""
    rng = np.random.default_rng(0)
    n, c = 6, 11
    truth = np.kron(rng.integers(0, c, (n, 8, 8)), np.ones((size // 8, size // 8), np.int64))
    probs = _smooth_probs(rng, n, c, size, truth).astype(np.float16)
    masks = np.stack([t[:: size // 256, :: size // 256] if size >= 256 else
                      np.kron(t, np.ones((256 // size, 256 // size), np.int64)) for t in truth]).astype(np.uint8)
    as_float = score_probs(probs, masks, c, 255).value
    stored = to_stored(probs, size)
    assert stored.shape[-1] == stored_size(size)
    as_stored = score_probs(dequantise(stored), masks, c, 255).value
    contested = np.mean(np.sort(probs.astype(np.float32), 1)[:, -1] - np.sort(probs.astype(np.float32), 1)[:, -2]
                        < 0.05)
    assert contested > 0.05                                    # the case is not trivially confident
    assert 0.3 < as_float < 0.95 and abs(as_stored - as_float) < 1e-3


@pytest.mark.slow
def test_members_trained_at_512_px_store_c_x_256_x_256_bytes_per_image(tmp_path):
    """The real train and infer stages on 4 photos of 512 px (a 3-layer U-Net, one epoch): every stored file holds
    exactly the formula's bytes per image, plus its header; the reloaded member scores as the float one."""
    from pipelines import infer, split, train
    from segpipe.config import InferParams, ModelSpec, SplitParams
    from segpipe.datasets import decode_all, load_index
    from segpipe.engine import predict_probs
    from segpipe.ensemble import load_member
    from tests.test_training_chain import CLASSES, DATA, make_tiny, tiny_train_params

    vdir = make_tiny(tmp_path, n_train=4, n_test=2, size=512)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    spec = ModelSpec(arch="unet", encoder="resnet18", kwargs={"encoder_depth": 3, "decoder_channels": [16, 8, 8]})
    params = tiny_train_params(models={"u": spec}, epochs=1, batch_size=2, input_size=512, amp=False,
                               augment=())
    for fold in (0, 1):
        train.run(DATA, params, "u", 0, fold, vdir, tmp_path / "split", tmp_path / "train" / f"u-s0-f{fold}")
    infer.run(DATA, InferParams(tta=(), batch_size=2, ablation=False), vdir, tmp_path / "train",
              tmp_path / "infer", round_=0)

    c, per_image = len(CLASSES), bytes_per_image(len(CLASSES), 512)
    assert per_image == c * 256 * 256
    train_samples, test_samples, _ = load_index(vdir / "index.json")
    for fold in (0, 1):
        mdir = tmp_path / "infer" / "members" / f"u-s0-f{fold}"
        n_oof = len(json.loads((mdir / "index.json").read_text())["oof_file_names"])
        for path, n in ((mdir / "oof.npy", n_oof), (mdir / "test.npy", len(test_samples))):
            rows = Rows(path)
            assert rows.shape == (n, c, 256, 256) and rows.dtype == np.uint8
            assert path.stat().st_size == rows.offset + n * per_image          # the data, plus a 128 B header
        oof = Rows(tmp_path / "train" / f"u-s0-f{fold}" / "oof.npz", "probs")
        assert oof.shape == (n_oof, c, 256, 256) and oof.dtype == np.uint8
    details = json.loads((tmp_path / "infer" / "report.json").read_text())["member_details"]
    assert {d["stored_size"] for d in details.values()} == {256}
    probs = Rows(tmp_path / "infer" / "test_probs.npy")
    assert probs.shape == (len(test_samples), c, 256, 256) and probs.dtype == np.uint8

    # the member as stored, read back, against its float16 probabilities at 512 px: the same OOF mIoU at 256
    mdir = tmp_path / "infer" / "members" / "u-s0-f0"
    names = json.loads((mdir / "index.json").read_text())["oof_file_names"]
    by_name = {s.file_name: s for s in train_samples}
    images, _ = decode_all([by_name[n] for n in names], 512)
    masks = infer.read_masks([by_name[n] for n in names], 256)
    model, _ = load_member(tmp_path / "train" / "u-s0-f0" / "best.pt", torch.device("cpu"))
    float_probs = predict_probs(model, images, 2, torch.device("cpu"))
    stored = score_probs(dequantise(Rows(mdir / "oof.npy")[:]), masks, c, 255).value
    assert stored == pytest.approx(details["u-s0-f0"]["oof_miou"])             # what the report says
    assert abs(stored - score_probs(float_probs, masks, c, 255).value) < 1e-3
