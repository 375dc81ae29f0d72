"""A Ray member's inputs by content (flows.nodeinputs): the flow stores the photos S3 lacks under their sha256, a
node stages the run's folders, photos and params into a folder of its own, verified, fetching only what it lacks,
and uses the flow's run folder in place when it has it (real SeaweedFS; no Prefect, no Ray)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from flows import nodeinputs
from pipelines import split
from segpipe.config import SplitParams
from segpipe.datasets import load_index
from segpipe.storage import ArtifactStore, StorageError, digest_dir, sha256_file
from test_training_chain import make_tiny

pytestmark = pytest.mark.services


def _stored_run(tmp_path: Path, store: ArtifactStore, run: str) -> tuple[Path, Path, dict]:
    """The flow's run folder (validate + split) with both folders stored to S3."""
    run_dir = tmp_path / "flow" / run
    make_tiny(run_dir)                    # validate/ and the photos under data/ (the index's data_root)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), run_dir / "validate", run_dir / "split")
    folders = {}
    for rel in ("validate", "split"):
        files: dict[str, str] = {}
        store.upload_dir(run_dir / rel, f"runs/{run}/{rel}", digests=files)
        folders[rel] = nodeinputs.StoredFolder(f"runs/{run}/{rel}", files)
    params = tmp_path / "flow" / "params.yaml"
    params.write_text("train: {epochs: 1}\n")
    return run_dir, params, folders


def test_a_node_stages_a_members_inputs_from_s3_by_content(tmp_path, s3_env):
    store = ArtifactStore(s3_env, prefix=f"nodeinputs-{uuid.uuid4().hex[:8]}")
    run = "r1"
    run_dir, params, folders = _stored_run(tmp_path, store, run)
    inputs = nodeinputs.prepare(store, run, run_dir, folders, params)
    train_rows = load_index(run_dir / "validate" / "index.json")[0]
    assert set(inputs.photos) == {s.image.relative_to(run_dir / "data").as_posix()
                                  for s in train_rows}                        # the test photos are no member's
    assert len(store.list(f"{nodeinputs.PHOTOS_PREFIX}/")) == len(set(inputs.photos.values())) == 16
    assert nodeinputs.store_photos(store, nodeinputs.needed_photos(run_dir, ["validate", "split"]))[1] == 0

    # a node without the flow's folder: everything comes from S3 into its own folder, verified
    node = tmp_path / "node"
    staged = nodeinputs.stage(inputs, tmp_path / "elsewhere" / run, tmp_path / "elsewhere" / "params.yaml", store,
                              node)
    assert staged.run_dir == node / "runs" / run and staged.data_root == staged.run_dir / "photos"
    assert staged.fetched == {"folders": sum(len(f.files) for f in folders.values()), "photos": 16}
    for rel, f in folders.items():
        assert digest_dir(staged.run_dir / rel) == f.files
    assert staged.params_file.read_text() == params.read_text()
    samples = load_index(staged.run_dir / "validate" / "index.json", staged.data_root)[0]
    assert [sha256_file(s.image) for s in samples] == [sha256_file(s.image) for s in train_rows]

    # again: nothing fetched; a damaged mask: its folder fetched again, whole
    assert nodeinputs.stage(inputs, run_dir.parent / "gone", params, store, node).fetched == {"folders": 0,
                                                                                              "photos": 0}
    (staged.run_dir / "validate" / "masks" / "0000.png").write_bytes(b"damaged")
    again = nodeinputs.stage(inputs, run_dir.parent / "gone", params, store, node)
    assert again.fetched == {"folders": len(folders["validate"].files), "photos": 0}
    assert digest_dir(again.run_dir / "validate") == folders["validate"].files

    # another run on the same photos: the node's copies serve it (content-addressed), its folders are new
    other = nodeinputs.MemberInputs("r2", inputs.folders, inputs.photos, inputs.params)
    assert nodeinputs.stage(other, run_dir.parent / "gone", params, store, node).fetched == {
        "folders": sum(len(f.files) for f in folders.values()), "photos": 0}

    # a node that has the flow's run folder at the same path, same content: used in place, nothing copied
    shared = nodeinputs.stage(inputs, run_dir, params, store, tmp_path / "node2")
    assert (shared.run_dir, shared.params_file, shared.data_root) == (run_dir, params, None)
    assert not (tmp_path / "node2").exists()


def test_a_stored_photo_that_is_not_the_content_named_fails_the_staging(tmp_path, s3_env):
    store = ArtifactStore(s3_env, prefix=f"nodeinputs-{uuid.uuid4().hex[:8]}")
    run_dir, params, folders = _stored_run(tmp_path, store, "r1")
    fake = "0" * 64
    store.put_bytes(b"not that photo", nodeinputs.photo_key(fake))
    inputs = nodeinputs.MemberInputs("r1", folders, {"batch_01_vt/0000.jpg": fake}, params.read_text())
    with pytest.raises(StorageError, match="not the content the flow stored"):
        nodeinputs.stage(inputs, tmp_path / "elsewhere", params, store, tmp_path / "node")
    assert not (tmp_path / "node" / "blobs" / fake).exists()


def test_a_pseudo_label_round_also_needs_its_pseudo_labelled_test_photos(tmp_path):
    run_dir = tmp_path / "run"
    make_tiny(run_dir)
    split.run(SplitParams(n_folds=2, seed=0, group_by="batch"), run_dir / "validate", run_dir / "split")
    test_photos = [r["image"] for r in json.loads((run_dir / "validate" / "index.json").read_text())["test"]]
    (run_dir / "pseudo" / "r1").mkdir(parents=True)
    (run_dir / "pseudo" / "r1" / "index.json").write_text(json.dumps({  # per-fold teachers: a set per fold
        "data_root": str(run_dir / "data"), "folds": {"0": [{"image": test_photos[0], "mask": "m0.png"}],
                                                       "1": [{"image": test_photos[1], "mask": "m1.png"}]}}))
    round0 = nodeinputs.needed_photos(run_dir, ["validate", "split"])
    round1 = nodeinputs.needed_photos(run_dir, ["validate", "split", "pseudo/r1", "audit/r0"])
    assert set(round1) - set(round0) == set(test_photos[:2])
    assert round1[test_photos[0]] == run_dir / "data" / test_photos[0]
