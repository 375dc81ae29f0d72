"""The ablation's verdicts: a row pays only beyond the single-model row's seed-to-seed spread, and a figure chosen
on OOF is shown nested with the selected one beside it (dry run: nothing is sent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines import ablation
from segpipe.config import AblationParams, DataParams, SubmitParams

CLASSES = ("Background", "A", "B")


def fake_round(root: Path, rows: list[dict]) -> None:
    """An infer round's ablation.json with a tiny mask file per row, as the infer stage writes them."""
    (root / "ablation").mkdir(parents=True)
    (root / "test_index.json").write_text(json.dumps({"file_names": ["t/0.jpg", "t/1.jpg"]}))
    for r in rows:
        np.save(root / "ablation" / f"{r['step']}.npy", np.zeros((2, 256, 256), np.uint8))
        r.setdefault("masks", f"ablation/{r['step']}.npy")
        r.setdefault("note", "")
    (root / "ablation.json").write_text(json.dumps(rows))


def test_rows_pay_only_beyond_the_seed_spread(tmp_path):
    fake_round(tmp_path / "infer" / "r0", [
        {"step": "single", "name": "single", "oof_miou": 0.40, "seed_spread": 0.02,
         "seed_oof_miou": {"0": 0.40, "1": 0.38}},
        {"step": "flip_tta", "name": "flip", "oof_miou": 0.41},                        # +0.01: within the band
        {"step": "multiscale_tta", "name": "scales", "oof_miou": 0.46},                # +0.05: pays
        {"step": "model_ensemble", "name": "ensemble", "oof_miou": 0.43, "oof_selected": 0.45}])   # -0.03
    fake_round(tmp_path / "infer" / "r1", [{"step": "pseudo_r1", "name": "pseudo", "oof_miou": 0.43,
                                            "oof_selected": 0.44}])
    res = ablation.run(AblationParams(), SubmitParams(base_url="http://127.0.0.1:9", competition_id=1),
                       DataParams(root="unused", classes=CLASSES), tmp_path / "infer", tmp_path / "out", key=None,
                       dry_run=True)
    assert [r["pays"] for r in res.rows] == [None, "noise", "yes", "no", "same"]
    assert res.noise_band == 0.02
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "Noise band: ±0.0200" in md and "| ensemble | 0.4300 | 0.4500 | -0.0300 |" in md
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["noise_band"] == 0.02
    assert res.table()[3]["oof_selected"] == 0.45


def test_without_a_second_seed_the_report_says_there_is_no_band(tmp_path):
    fake_round(tmp_path / "infer" / "r0", [{"step": "single", "name": "single", "oof_miou": 0.40},
                                           {"step": "flip_tta", "name": "flip", "oof_miou": 0.41}])
    res = ablation.run(AblationParams(), SubmitParams(base_url="http://127.0.0.1:9", competition_id=1),
                       DataParams(root="unused", classes=CLASSES), tmp_path / "infer", tmp_path / "out", key=None,
                       dry_run=True)
    assert res.noise_band is None and res.rows[1]["pays"] == "yes"
    assert "No noise band: one seed" in (tmp_path / "out" / "ablation.md").read_text()


def test_verdict():
    assert ablation.verdict(0.01, None, 0.02) == "noise"
    assert ablation.verdict(0.01, 0.05, 0.02) == "noise"          # the public score of one file is no band either
    assert ablation.verdict(0.03, -0.01, 0.02) == "mixed"
    assert ablation.verdict(-0.03, None, 0.02) == "no"
    assert ablation.verdict(0.0, 0.0, 0.02) == "same"
    assert ablation.verdict(0.01, None, None) == "yes"
