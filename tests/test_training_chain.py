"""split -> train -> infer r0 -> pseudo -> retrain -> infer r1 -> ablation on a tiny dataset, real tensors and files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipelines import ablation, audit, infer, pseudo, split, train
from segpipe.config import (AblationParams, AuditParams, DataParams, InferParams, ModelSpec, PseudoParams,
                            SplitParams, SubmitParams, TrainParams)
from segpipe.engine import LoopConfig, train_model
from segpipe.datasets import ArrayDataset, load_index
from segpipe.losses import SegLoss
from segpipe.models import build_model

CLASSES = ("Background", "A", "B")


def make_tiny(root: Path, n_train: int = 16, n_test: int = 4, size: int = 32) -> Path:
    """Squares of class A (red) and discs of class B (blue) on grey noise; an index.json as validate writes it."""
    rng = np.random.default_rng(0)
    vdir = root / "validate"
    (vdir / "masks").mkdir(parents=True)
    (root / "data").mkdir()
    rows, test = [], []
    for i in range(n_train + n_test):
        img = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        x, y = rng.integers(2, size - 14, 2)
        img[y:y + 12, x:x + 12] = (220, 40, 40)
        mask[y:y + 12, x:x + 12] = 1
        cx, cy = rng.integers(6, size - 6, 2)
        cv2.circle(img, (int(cx), int(cy)), 5, (40, 40, 220), -1)
        cv2.circle(mask, (int(cx), int(cy)), 5, 2, -1)
        name = f"batch_0{i % 4 + 1}_vt/{i:04d}.jpg"
        (root / "data" / name).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(root / "data" / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if i < n_train:
            mp = Path("masks") / f"{i:04d}.png"
            cv2.imwrite(str(vdir / mp), mask)
            rows.append({"file_name": name, "image": name, "mask": str(mp), "batch": name.split("/")[0],
                         "classes": sorted(set(np.unique(mask).tolist()))})
        else:
            test.append({"file_name": name, "image": name})
    (vdir / "eda").mkdir()
    (vdir / "eda" / "eda_metrics.json").write_text(json.dumps({"class_weights": {"Background": 0.1, "A": 1.0, "B": 2.0}}))
    (vdir / "index.json").write_text(json.dumps({"data_root": str(root / "data"), "classes": list(CLASSES),
                                                 "train": rows, "test": test}))
    return vdir


def tiny_train_params(**kw) -> TrainParams:
    base = dict(models={"unet_r18": ModelSpec(arch="unet", encoder="resnet18")}, seeds=(0,), folds=(0, 1), epochs=2,
                batch_size=4, input_size=32, lr=3e-3, weight_decay=0.0, warmup_epochs=0, amp=True,
                channels_last=True, num_workers=0, loss="ce+dice", threads=1)
    base.update(kw)
    return TrainParams(**base)


DATA = DataParams(root="unused", classes=CLASSES)


def test_chain_split_train_pseudo_retrain_infer(tmp_path):
    vdir = make_tiny(tmp_path)
    sres = split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), vdir, tmp_path / "split")
    assert sorted(sres.sizes) == [8, 8]
    folds = json.loads((tmp_path / "split" / "folds.json").read_text())["folds"]
    # grouping: a batch folder never straddles folds
    assert all(len({f for n, f in folds.items() if n.startswith(b)}) == 1 for b in ("batch_01", "batch_02"))

    params = tiny_train_params()
    for fold in (0, 1):
        r = train.run(DATA, params, "unet_r18", 0, fold, vdir, tmp_path / "split", tmp_path / "train" / f"unet_r18-s0-f{fold}")
        assert 0.0 <= r.best_miou <= 1.0
    out = tmp_path / "train" / "unet_r18-s0-f0"
    oof = np.load(out / "oof.npz")
    assert oof["probs"].dtype == np.uint8 and oof["probs"].shape == (8, 3, 32, 32)   # segpipe.probstore: q = p x 255
    np.testing.assert_allclose(oof["probs"].astype(np.float32).sum(1) / 255, 1.0, atol=2e-2)
    assert not (tmp_path / "train" / ".resume" / "unet_r18-s0-f0").exists()   # resume state cleaned after success

    # round 0: every member's TTA probabilities on its OOF images and the test set, weights, ablation rows
    iparams = InferParams(tta=("hflip", "vflip"), scales=(1.0, 2.0), batch_size=4)
    r0 = infer.run(DATA, iparams, vdir, tmp_path / "train", tmp_path / "infer" / "r0", round_=0)
    for m in ("unet_r18-s0-f0", "unet_r18-s0-f1"):
        mdir = tmp_path / "infer" / "r0" / "members" / m
        assert np.load(mdir / "oof.npy").shape == (8, 3, 32, 32) and np.load(mdir / "test.npy").dtype == np.uint8
    rows = json.loads((tmp_path / "infer" / "r0" / "ablation.json").read_text())
    assert [r["step"] for r in rows] == ["single", "flip_tta", "multiscale_tta", "fold_ensemble", "model_ensemble"]
    assert rows[-1]["oof_miou"] == r0.oof_miou and rows[3]["oof_miou"] == pytest.approx(rows[2]["oof_miou"], abs=1e-6)
    assert all(np.load(tmp_path / "infer" / "r0" / r["masks"]).shape == (4, 256, 256) for r in rows)

    pres = pseudo.run(DATA, PseudoParams(threshold=0.34, min_confident_fraction=0.0), vdir, tmp_path / "infer" / "r0",
                      tmp_path / "pseudo" / "r1")
    assert pres.n_kept == 4
    # fold-safe teachers (the default): fold k's student gets labels voted by fold k's members only
    pidx = json.loads((tmp_path / "pseudo" / "r1" / "index.json").read_text())
    assert pidx["teacher"] == "fold" and sorted(pidx["folds"]) == ["0", "1"] and "samples" not in pidx
    prov = json.loads((tmp_path / "pseudo" / "r1" / "provenance.json").read_text())
    assert prov["teachers"] == {"f0": ["unet_r18-s0-f0"], "f1": ["unet_r18-s0-f1"]}
    for label_set, voters in prov["teachers"].items():      # by provenance: fold k's set from fold k's members only
        assert all(prov["ensemble"]["members"][m]["fold"] == int(label_set[1:]) for m in voters)
    assert set(prov["ensemble"]["members"]) == {"unet_r18-s0-f0", "unet_r18-s0-f1"}
    test_names = json.loads((tmp_path / "infer" / "r0" / "test_index.json").read_text())["file_names"]
    for fold in (0, 1):
        own = np.load(tmp_path / "infer" / "r0" / "members" / f"unet_r18-s0-f{fold}" / "test.npy")
        sets = {r["file_name"]: r["mask"] for r in pidx["folds"][str(fold)]}
        assert len(sets) == 4 and all(m.startswith(f"masks/f{fold}/") for m in sets.values())
        for i, name in enumerate(test_names):
            label = cv2.imread(str(tmp_path / "pseudo" / "r1" / sets[name]), cv2.IMREAD_UNCHANGED)
            want = cv2.resize(own[i].transpose(1, 2, 0), (256, 256), interpolation=cv2.INTER_LINEAR).argmax(-1)
            sure = label != 255
            assert (label[sure] == want[sure]).mean() > 0.97      # resampling moves only near-ties at edges
    # relabel by the same rule: an image of fold 1 is relabelled for fold 0's student by fold 0's member
    ares = audit.run(DATA, AuditParams(show=0, action="relabel", n=3), vdir, tmp_path / "infer" / "r0",
                     tmp_path / "audit", members_dir=tmp_path / "train")
    affected = json.loads((tmp_path / "audit" / "affected.json").read_text())
    assert affected["teacher"] == "fold" and len(ares.affected) == 3
    # by provenance: no label a student trains on was voted by a member that trained on the student's fold
    for student, voters in affected["teachers"].items():
        assert voters and all(affected["member_folds"][m] == int(student) for m in voters)
    train_samples = load_index(vdir / "index.json")[0]
    for entry in affected["images"]:
        own = folds[entry["file_name"]]
        assert sorted(entry["masks"]) == [str(1 - own)]        # only the student that trains on it gets a label
        assert entry["masks"][str(1 - own)].startswith(f"masks/f{1 - own}/")
    entry = affected["images"][0]
    student = 1 - folds[entry["file_name"]]
    theirs = [s for s in train_samples if folds[s.file_name] != student]
    relabelled = {s.file_name: s.mask for s in train.apply_audit(theirs, tmp_path / "audit", student)}
    assert relabelled[entry["file_name"]] == tmp_path / "audit" / entry["masks"][str(student)]
    with pytest.raises(KeyError, match=f"for fold {1 - student}'s student"):
        train.apply_audit(theirs, tmp_path / "audit", 1 - student)
    with pytest.raises(ValueError, match="pass the members folder"):
        audit.run(DATA, AuditParams(action="relabel", n=1), vdir, tmp_path / "infer" / "r0", tmp_path / "audit-x")

    # the all-folds teacher stays as an option, and says so
    everyone = pseudo.run(DATA, PseudoParams(threshold=0.34, min_confident_fraction=0.0, teacher="all"), vdir,
                          tmp_path / "infer" / "r0", tmp_path / "pseudo-all")
    aidx = json.loads((tmp_path / "pseudo-all" / "index.json").read_text())
    assert everyone.n_kept == 4 and aidx["teacher"] == "all" and len(aidx["samples"]) == 4
    assert json.loads((tmp_path / "pseudo-all" / "provenance.json").read_text())["teachers"] == {
        "all": ["unet_r18-s0-f0", "unet_r18-s0-f1"]}

    for fold in (0, 1):
        train.run(DATA, tiny_train_params(class_weights="eda"), "unet_r18", 0, fold, vdir, tmp_path / "split",
                  tmp_path / "retrain" / "r1" / f"unet_r18-s0-f{fold}", epochs=1, pseudo_dir=tmp_path / "pseudo" / "r1")
    meta = torch.load(tmp_path / "retrain" / "r1" / "unet_r18-s0-f0" / "best.pt", weights_only=False)["config"]
    assert meta["pseudo"] and meta["n_train"] == 8 + 4 and meta["n_val"] == 8   # pseudo images never validate
    assert meta["class_weights"] == pytest.approx([0.1, 1.0, 2.0])   # EDA's weights, in class-index order

    ires = infer.run(DATA, iparams, vdir, tmp_path / "retrain" / "r1", tmp_path / "infer" / "r1", round_=1)
    masks = np.load(tmp_path / "infer" / "r1" / "test_masks.npy")
    assert masks.shape == (4, 256, 256) and masks.max() < 3
    report = json.loads((tmp_path / "infer" / "r1" / "report.json").read_text())
    assert set(report["members"]) == {"unet_r18-s0-f0", "unet_r18-s0-f1"} and report["n_oof_images"] == 16
    assert ires.oof_miou == report["ensemble_oof_miou"]

    abl = ablation.run(AblationParams(), SubmitParams(base_url="http://127.0.0.1:9", competition_id=1), DATA,
                       tmp_path / "infer", tmp_path / "ablation", key=None, dry_run=True)
    assert [r["step"] for r in abl.rows][-1] == "pseudo_r1" and len(abl.rows) == 6
    assert abl.rows[-1]["oof_miou"] == ires.oof_miou and all(r["public_miou"] is None for r in abl.rows)
    assert all(Path(r["csv"]).is_file() for r in abl.rows)
    metrics = json.loads((tmp_path / "ablation" / "metrics.json").read_text())
    assert metrics["oof/single"] == rows[0]["oof_miou"] and "public/single" not in metrics
    assert "+ pseudo-label round 1" in (tmp_path / "ablation" / "ablation.md").read_text()


def test_training_lowers_loss_and_resume_is_exact(tmp_path):
    """A run killed after epoch 1 and resumed ends with the same weights as an unbroken run."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    masks = (imgs[..., 0] > 128).astype(np.uint8)
    cfg = LoopConfig(epochs=3, batch_size=4, lr=1e-2, weight_decay=0, warmup_epochs=0, amp=False,
                     channels_last=False, num_workers=0, seed=0)

    def run(ckpt: Path, epochs: int):
        torch.manual_seed(0)
        net = build_model("unet", "resnet18", 2)
        c = LoopConfig(**{**cfg.__dict__, "epochs": epochs})
        res = train_model(net, SegLoss("ce", 255), ArrayDataset(imgs, masks), imgs, masks, c, ["bg", "fg"], 255,
                          ckpt, {"cfg": "same"})
        return net, res

    full, res = run(tmp_path / "a", 3)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # interrupted: only epoch 1 done; then the rerun (same config) resumes at epoch 2
    cfg1 = LoopConfig(**{**cfg.__dict__})
    torch.manual_seed(0)
    part = build_model("unet", "resnet18", 2)

    class Stop(Exception):
        pass

    def stop_after_first(row):
        raise Stop

    with pytest.raises(Stop):
        train_model(part, SegLoss("ce", 255), ArrayDataset(imgs, masks), imgs, masks, cfg1, ["bg", "fg"], 255,
                    tmp_path / "b", {"cfg": "same"}, on_epoch=stop_after_first)
    resumed, res2 = run(tmp_path / "b", 3)
    assert res2.resumed_from == 1
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"weights differ at {k}")
