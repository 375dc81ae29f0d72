"""The audit's actions on a known ensemble: the image whose OOF prediction disagrees with its label ranks worst,
`relabel` writes the ensemble's confident pseudo-label as its mask (unsure pixels ignored) and the next round's
training side reads it; `drop` leaves it out. No training: the OOF probabilities are built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from pipelines import audit, train
from segpipe.config import AuditParams, DataParams
from segpipe.datasets import load_index, read_mask
from tests.test_training_chain import CLASSES, make_tiny

SIZE = 32        # make_tiny's masks; the audit scores at its own 256 px


def fake_infer(root: Path, vdir: Path, wrong: str) -> Path:
    """One member holding every training image: one-hot of the truth (p = 0.9), except `wrong`, predicted class 2
    everywhere with p = 0.9 on its left half and 0.4 on its right (the unsure half must become ignore)."""
    samples = load_index(vdir / "index.json")[0]
    nc = len(CLASSES)
    probs = np.zeros((len(samples), nc, SIZE, SIZE), np.float16)
    for i, s in enumerate(samples):
        truth = read_mask(s.mask)
        if s.file_name == wrong:
            p = np.full((nc, SIZE, SIZE), 0.3, np.float32)
            p[2, :, : SIZE // 2], p[2, :, SIZE // 2:] = 0.9, 0.4
        else:
            p = np.full((nc, SIZE, SIZE), 0.05, np.float32)
            np.put_along_axis(p, truth[None].astype(np.int64), 0.9, axis=0)
        probs[i] = p
    idir = root / "infer"
    (idir / "members" / "m-s0-f0").mkdir(parents=True)
    np.save(idir / "members" / "m-s0-f0" / "oof.npy", probs)
    (idir / "members" / "m-s0-f0" / "index.json").write_text(json.dumps(
        {"oof_file_names": [s.file_name for s in samples]}))
    (idir / "report.json").write_text(json.dumps({"round": 0, "weights": {"m": 1.0},
                                                  "member_details": {"m-s0-f0": {"model": "m", "epoch": "best"}}}))
    return idir


DATA = DataParams(root="unused", classes=CLASSES)


def tiny_with_one_wrong(root: Path, wrong_at: int) -> tuple[Path, list, str, Path]:
    """make_tiny's validated data, its samples, the image the ensemble disagrees with, and the infer folder."""
    vdir = make_tiny(root)
    samples = load_index(vdir / "index.json")[0]
    wrong = samples[wrong_at].file_name
    return vdir, samples, wrong, fake_infer(root, vdir, wrong)


def test_relabel_writes_the_confident_ensemble_label_and_the_next_round_trains_on_it(tmp_path):
    vdir, samples, wrong, idir = tiny_with_one_wrong(tmp_path, 5)

    res = audit.run(DATA, AuditParams(show=3, action="relabel", n=1, relabel_threshold=0.5, teacher="all"), vdir,
                    idir, tmp_path / "audit")
    assert res.rows[0]["file_name"] == wrong and res.affected == [wrong]
    assert all(r["miou"] > 0.9 for r in res.rows[1:])    # the others agree with their labels (up to resampled edges)
    affected = json.loads((tmp_path / "audit" / "affected.json").read_text())
    assert affected["action"] == "relabel" and affected["images"][0]["file_name"] == wrong
    mask = read_mask(tmp_path / "audit" / affected["images"][0]["mask"])
    assert mask.shape == (SIZE, SIZE)                                  # the original mask's size
    assert (mask[:, : SIZE // 2 - 1] == 2).all()                       # confident: the ensemble's class
    assert (mask[:, SIZE // 2 + 1:] == DATA.ignore_index).all()        # unsure: ignored, not guessed

    after = train.apply_audit(samples, tmp_path / "audit")
    assert [s.file_name for s in after] == [s.file_name for s in samples]
    changed = {s.file_name: s.mask for s, t in zip(after, samples) if s.mask != t.mask}
    assert list(changed) == [wrong] and np.array_equal(read_mask(changed[wrong]), mask)


def test_drop_leaves_the_worst_out_and_none_changes_nothing(tmp_path):
    vdir, samples, wrong, idir = tiny_with_one_wrong(tmp_path, 3)

    audit.run(DATA, AuditParams(show=0, action="drop", n=1), vdir, idir, tmp_path / "drop")
    assert [s.file_name for s in train.apply_audit(samples, tmp_path / "drop")] == \
        [s.file_name for s in samples if s.file_name != wrong]
    assert not (tmp_path / "drop" / "masks").exists()

    res = audit.run(DATA, AuditParams(show=0, action="relabel", n=0), vdir, idir, tmp_path / "none")
    assert res.action == "none" and res.affected == []
    assert train.apply_audit(samples, tmp_path / "none") == samples
    assert cv2.imread(str(tmp_path / "none" / "worst.png")) is None    # show=0: no grid drawn
