"""Submission CSV: exact writer format, linter errors naming the row, round trip."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from segpipe.config import TRASH_CLASSES, DataParams, SubmitParams

from segpipe.submission import (
    HEADER, PIXELS, SubmissionError, SubmissionLintError, lint_submission, read_submission, resize_nearest,
    sha256_file, size_bounds, write_submission,
)

NC = 11


@pytest.fixture
def sub(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"batch_01_vt/{i:04d}.jpg" for i in range(3)]
    masks = rng.integers(0, NC, (3, 128, 128), dtype=np.uint8)
    path = write_submission(tmp_path / "s.csv", names, masks)
    return path, names, masks


def test_writer_format_is_exact(sub):
    path, names, masks = sub
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == HEADER.encode() and lines[-1] == b""          # header first, file ends with one newline
    assert len(lines) == 2 + len(names)
    for line, name, mask in zip(lines[1:], names, masks):
        image_id, pred = line.decode().split(",")
        assert image_id == name
        tokens = pred.split(" ")                                       # single spaces: no empty tokens
        assert len(tokens) == PIXELS and all(t.isdigit() for t in tokens)
        got = np.array(tokens, dtype=np.int64).reshape(256, 256)
        # nearest 128 -> 256 repeats each pixel 2x2, flattened row-major
        assert np.array_equal(got, np.repeat(np.repeat(mask, 2, 0), 2, 1))


def test_resize_nearest_downsample_picks_source_floor():
    m = np.arange(512 * 512, dtype=np.int64).reshape(1, 512, 512)
    out = resize_nearest(m)
    assert out.shape == (1, 256, 256) and out[0, 3, 5] == m[0, 6, 10]
    odd = resize_nearest(np.arange(3 * 3).reshape(1, 3, 3))            # non-integer ratio: floor(i * 3 / 256)
    assert odd[0, 85, 86] == 0 * 3 + 1 and odd[0, 255, 255] == 8


def test_round_trip_and_lint_report(sub):
    path, names, masks = sub
    report = lint_submission(path, names, NC)
    assert report.n_rows == 3 and report.in_order and len(report.sha256) == 64
    assert sum(report.class_pixels.values()) == 3 * PIXELS
    got_names, got = read_submission(path, expected_file_names=names, num_classes=NC)
    assert got_names == names and got.dtype == np.uint8
    assert np.array_equal(got, resize_nearest(masks))
    assert not lint_submission(path, names[::-1], NC).in_order      # order is reported, not fatal


def test_writer_refuses_bad_inputs(tmp_path):
    with pytest.raises(SubmissionError, match="2 file names but 3 masks"):
        write_submission(tmp_path / "x.csv", ["a", "b"], np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(SubmissionError, match="integer class ids"):
        write_submission(tmp_path / "x.csv", ["a"], np.zeros((1, 8, 8), np.float32))
    with pytest.raises(SubmissionError, match="commas"):
        write_submission(tmp_path / "x.csv", ["a,b"], np.zeros((1, 8, 8), np.uint8))
    assert not (tmp_path / "x.csv").exists()


def _rows(path):
    return path.read_text().split("\n")[:-1]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: ["image_id,Prediction"] + r[1:], r"line 1: header must be exactly"),
        (lambda r: r[:2] + r[3:], r"1 test image\(s\) have no row: \['batch_01_vt/0001.jpg'\]"),
        (lambda r: r[:2] + [r[1]] + r[3:], r"line 3 \(image_id 'batch_01_vt/0000.jpg'\): duplicate image_id"),
        (lambda r: r[:2] + ["extra.jpg" + r[2][r[2].index(","):]] + r[3:],
         r"line 3 \(image_id 'extra.jpg'\): .*not in the test set"),
        (lambda r: r[:2] + ["batch_01_vt/0001.jpg,"] + r[3:], r"line 3 .*empty PredictionString"),
        (lambda r: r[:2] + [r[2] + " 0"] + r[3:], r"line 3 .*65537 class ids, expected exactly 65536"),
        (lambda r: r[:2] + [r[2].rsplit(" ", 1)[0]] + r[3:], r"line 3 .*65535 class ids"),
        (lambda r: r[:2] + [r[2].replace(" ", " nan ", 1)[: len(r[2]) + 4].rsplit(" ", 1)[0]] + r[3:],
         r"line 3 .*token 'nan' at position 1"),
        (lambda r: r[:2] + [r[2].replace(" ", "  ", 1)] + r[3:], r"line 3 .*empty token"),
        (lambda r: r[:2] + [r[2].replace(",", ",11 ", 1).rsplit(" ", 1)[0]] + r[3:],
         r"line 3 .*class id 11 at position 0 .* outside \[0, 11\)"),
        (lambda r: r[:2] + [r[2].replace(",", ",-1 ", 1).rsplit(" ", 1)[0]] + r[3:], r"line 3 .*token '-1'"),
        (lambda r: r[:2] + [""] + r[2:], r"line 3: empty line"),
    ],
    ids=["header", "missing", "duplicate", "extra", "empty", "too-many", "too-few", "nan", "double-space",
         "out-of-range", "negative", "blank-line"],
)
def test_lint_names_the_row_and_the_problem(sub, tmp_path, mutate, match):
    path, names, _ = sub
    bad = _write(tmp_path / "bad.csv", mutate(_rows(path)))
    with pytest.raises(SubmissionLintError, match=match):
        lint_submission(bad, names, NC)


def test_lint_size_bounds(sub, tmp_path):
    path, names, _ = sub
    lo, hi = size_bounds(names, NC)
    assert lo <= path.stat().st_size <= hi
    big = tmp_path / "big.csv"
    big.write_bytes(path.read_bytes() + b"0" * (hi - path.stat().st_size + 1))
    with pytest.raises(SubmissionLintError, match=r"bytes; a valid file for 3 images and 11 classes"):
        lint_submission(big, names, NC)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(SubmissionLintError, match="is empty"):
        lint_submission(empty, names, NC)


def _infer_dir(tmp_path, names, masks):
    infer = tmp_path / "infer"
    infer.mkdir()
    np.save(infer / "test_masks.npy", masks)
    (infer / "test_index.json").write_text(json.dumps({"file_names": names}))
    return infer


def test_submit_stage_dry_run_writes_and_lints(sub, tmp_path):
    from pipelines.submit import run

    _, names, masks = sub
    infer = _infer_dir(tmp_path, names, masks)
    params = SubmitParams(mode="dry-run", base_url="http://127.0.0.1:9", competition_id=1,
                          ledger=str(tmp_path / "ledger.json"))
    result = run(params, DataParams(root="x", classes=TRASH_CLASSES), infer, tmp_path / "out", key=None,
                 hyperparameters={})
    assert result.status == "dry-run" and "dry run" in result.summary()
    assert json.loads((tmp_path / "out" / "result.json").read_text())["sha256"] == sha256_file(result.csv)
    assert read_submission(result.csv)[0] == names and not (tmp_path / "ledger.json").exists()


def test_submit_stage_main_needs_key_in_submit_mode(sub, tmp_path, monkeypatch):
    from pipelines.submit import main

    _, names, masks = sub
    infer = _infer_dir(tmp_path, names, masks)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"root": "x", "classes": list(TRASH_CLASSES)},
        "submit": {"mode": "submit", "base_url": "http://127.0.0.1:9", "competition_id": 1},
    }))
    monkeypatch.delenv("SEGPIPE_LEADERBOARD_KEY", raising=False)
    with pytest.raises(SystemExit, match="SEGPIPE_LEADERBOARD_KEY is not set"):
        main(["--params", str(params), "--infer", str(infer), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()                # refused before writing anything
    main(["--params", str(params), "--infer", str(infer), "--out", str(tmp_path / "out"), "--dry-run"])
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "dry-run"


def _rounds(tmp_path, names, masks, figures: dict[int, float]):
    """infer/r<N>/ for each round: its masks (round N's masks are `masks` with N added) and its nested OOF figure."""
    root = tmp_path / "infer"
    for r, oof in figures.items():
        d = root / f"r{r}"
        d.mkdir(parents=True)
        np.save(d / "test_masks.npy", ((masks + r) % NC).astype(np.uint8))
        (d / "test_index.json").write_text(json.dumps({"file_names": names}))
        (d / "metrics.json").write_text(json.dumps({"oof_miou": oof, "selected_oof_miou": oof + 0.01}))
    return root


@pytest.mark.parametrize("figures, sent, why", [
    ({0: 0.50, 1: 0.45}, 0, "the pseudo-label round after it did not gain"),
    ({0: 0.50, 1: 0.55}, 1, "r1 has the best nested OOF mIoU of the rounds (r0 0.5000, r1 0.5500)"),
    ({0: 0.50, 1: 0.50}, 0, "did not gain"),                                  # a tie is no gain
    ({0: 0.40, 1: 0.52, 2: 0.47}, 1, "; the pseudo-label round after it did not gain"),
    ({0: 0.60, 1: 0.50, 2: 0.55}, 0, "the pseudo-label rounds after it did not gain")])
def test_the_round_sent_is_the_one_with_the_best_honest_figure(sub, tmp_path, figures, sent, why):
    from pipelines.submit import choose_round, main

    _, names, masks = sub
    root = _rounds(tmp_path, names, masks, figures)
    choice = choose_round(root)
    assert (choice.round, choice.infer_dir, choice.oof_miou) == (sent, root / f"r{sent}", figures[sent])
    assert why in choice.reason
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"root": "x", "classes": list(TRASH_CLASSES)},
                                      "submit": {"base_url": "http://127.0.0.1:9", "competition_id": 1}}))
    main(["--params", str(params), "--infer", str(root), "--out", str(tmp_path / "out"), "--dry-run"])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (result["round"], result["oof_miou"]) == (sent, figures[sent]) and why in result["round_reason"]
    expected = write_submission(tmp_path / "expected.csv", names, ((masks + sent) % NC).astype(np.uint8))
    assert result["sha256"] == sha256_file(expected)          # that round's masks, not the last round's
    # one round's folder is sent as given
    assert choose_round(root / "r0").reason.startswith("the infer output given")


def test_the_round_choice_fails_without_any_round(tmp_path):
    from pipelines.submit import SubmitFailed, choose_round
    with pytest.raises(SubmitFailed, match="no r<N>/test_masks.npy under"):
        choose_round(tmp_path)


def test_leaderboard_client_imports_without_fastapi():
    import subprocess
    import sys

    code = "import sys, segpipe.leaderboard; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- submit policy
POLICY = {"nightly": "if_better", "demo": "always", "paused": "never"}


def _params(tmp_path, **kw) -> SubmitParams:
    return SubmitParams(**{"base_url": "http://127.0.0.1:9", "competition_id": 1, "policy": POLICY,
                           "ledger": str(tmp_path / "ledger.json"), **kw})


def _hist(*rows):
    """History records: (submission_id, oof_miou, status)."""
    return [{"submission_id": i, "oof_miou": oof, "status": st, "run": f"run-{i}"} for i, oof, st in rows]


@pytest.mark.parametrize(
    "kw, deployment, oof, history, submit, reason",
    [
        ({"mode": "dry-run"}, "demo", 0.9, [], False, r"<submit.mode=dry-run>"),
        ({}, "staging", 0.9, [], False, r"deployment 'staging' is not in submit.policy \['demo', 'nightly', 'paused'\]"),
        ({}, "paused", 0.9, [], False, r"never submits <submit.policy.paused=never>"),
        ({}, "demo", None, _hist((1, 0.99, "scored")), True, r"always submits <submit.policy.demo=always>"),
        ({}, None, 0.1, _hist((1, 0.99, "scored")), True, r"outside any deployment always submits"),
        ({"manual_policy": "never"}, None, 0.9, [], False, r"never submits <submit.manual_policy=never>"),
        ({}, "nightly", 0.5, [], True, r"OOF mIoU 0.5000: no earlier submission to beat"),
        ({}, "nightly", None, [], False, r"has none to compare"),
        ({}, "nightly", float("nan"), [], False, r"has none to compare"),
        ({}, "nightly", 0.61, _hist((1, 0.5, "scored"), (2, 0.6, "pending")), True,
         r"0.6100 beats the best submitted OOF mIoU 0.6000 \(submission 2, run run-2\)"),
        ({}, "nightly", 0.6, _hist((1, 0.5, "scored"), (2, 0.6, "scored")), False,
         r"0.6000 does not beat the best submitted OOF mIoU 0.6000 \(submission 2"),
        # a submission the leaderboard failed (bad file) sets no bar; one with no OOF (by hand) neither
        ({}, "nightly", 0.55, _hist((1, 0.5, "scored"), (2, 0.9, "failed"), (3, None, "scored")), True,
         r"beats the best submitted OOF mIoU 0.5000 \(submission 1"),
    ],
    ids=["mode-dry-run", "unlisted", "never", "always", "manual", "manual-never", "first", "no-oof", "nan-oof",
         "better", "equal", "failed-ignored"],
)
def test_policy_decides_which_runs_submit(tmp_path, kw, deployment, oof, history, submit, reason):
    from pipelines.submit import decide

    d = decide(_params(tmp_path, **kw), deployment, oof, history)
    assert d.submit is submit
    assert re.search(reason, d.reason), d.reason


def test_policy_param_rejects_unknown_rules():
    from segpipe.config import ParamsError, parse_section

    raw = {"submit": {"base_url": "x", "competition_id": 1, "policy": {"nightly": "sometimes"}}}
    with pytest.raises(ParamsError, match=r"submit.policy.nightly: .*'always', 'if_better' or 'never'"):
        parse_section(raw, "submit", SubmitParams)


def test_submit_stage_skips_by_policy_without_the_network(sub, tmp_path):
    """nightly + if_better, an earlier better submission in the history: write + lint, say why, touch nothing."""
    from pipelines.submit import HISTORY_NAME, run

    _, names, masks = sub
    infer = _infer_dir(tmp_path, names, masks)
    params = _params(tmp_path)                                    # base_url: nothing listens on port 9
    earlier = [{"leaderboard": "http://127.0.0.1:9|1", "run": "night-1", "submission_id": 4, "oof_miou": 0.7,
                "public_score": 0.68, "status": "scored"},
               {"leaderboard": "http://other:1|1", "run": "x", "submission_id": 9, "oof_miou": 0.1, "status": "scored"}]
    (tmp_path / HISTORY_NAME).write_text(json.dumps(earlier))
    result = run(params, DataParams(root="x", classes=TRASH_CLASSES), infer, tmp_path / "out", key=None,
                 hyperparameters={}, oof_miou=0.65, deployment="nightly", run_name="night-2")
    assert result.status == "dry-run" and result.submission_id is None and result.oof_miou == 0.65
    assert "0.6500 does not beat the best submitted OOF mIoU 0.7000 (submission 4, run night-1)" in result.summary()
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["reason"] == result.reason and saved["status"] == "dry-run"
    # the out dir carries this leaderboard's history (not the other one's); nothing was added or sent
    assert json.loads((tmp_path / "out" / "history.json").read_text()) == earlier[:1]
    assert json.loads((tmp_path / HISTORY_NAME).read_text()) == earlier
    assert not (tmp_path / "ledger.json").exists()
    lint_submission(result.csv, names, NC)

    # the same run from a deployment the policy does not list: also a dry run, with its own reason
    other = run(params, DataParams(root="x", classes=TRASH_CLASSES), infer, tmp_path / "out", key=None,
                hyperparameters={}, oof_miou=0.99, deployment="adhoc")
    assert other.status == "dry-run" and "deployment 'adhoc' is not in submit.policy" in other.reason


def test_submit_stage_main_needs_no_key_when_policy_says_no(sub, tmp_path, monkeypatch):
    from pipelines.submit import main

    _, names, masks = sub
    infer = _infer_dir(tmp_path, names, masks)
    (infer / "metrics.json").write_text(json.dumps({"oof_miou": 0.42}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"root": "x", "classes": list(TRASH_CLASSES)},
        "submit": {"mode": "submit", "base_url": "http://127.0.0.1:9", "competition_id": 1,
                   "manual_policy": "never", "ledger": str(tmp_path / "ledger.json")},
    }))
    monkeypatch.delenv("SEGPIPE_LEADERBOARD_KEY", raising=False)
    main(["--params", str(params), "--infer", str(infer), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["status"] == "dry-run" and saved["oof_miou"] == 0.42
    assert "<submit.manual_policy=never>" in saved["reason"]


def test_real_params_policy():
    """The shipped params: the nightly run submits only improvements, the demo always, other deployments never."""
    from pipelines.submit import decide
    from segpipe.config import load_params
    from conftest import REPO

    p = load_params("submit", SubmitParams, REPO / "params.yaml")
    better, worse = _hist((1, 0.5, "scored")), _hist((1, 0.9, "scored"))
    assert decide(p, "nightly", 0.6, better).submit and not decide(p, "nightly", 0.6, worse).submit
    assert decide(p, "demo", 0.6, worse).submit and not decide(p, "someone-elses", 0.6, []).submit
