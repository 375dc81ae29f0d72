"""The README's "Real data" steps, run as written, on datasets that are not the generator's.

Both datasets are built from the ten real COCO photos of ../shared/data/coco-real-sample (their own sizes, their
own categories mapped to data.classes by name): (a) the mask-PNG layout, one folder; (b) the COCO layout with the
competition's three batch folders shared by train and test. The commands are taken from the README's code blocks,
so a change there changes what runs here: the first bash block brings the data in (its `/path/to/dataset` placeholder
replaced by the dataset's folder; for (b) its commented `dvc import-url` alternative is run instead of `dvc add`,
from a bucket on the test's own SeaweedFS, with the `--fs-config endpointurl=` the README says another S3 needs),
the yaml block is merged into params.yaml, and the second bash block runs the chain through `dvc repro` and through
`prefect deployment run full-pipeline/demo`. Between the two the test only fills in the dataset's layout and
classes, points submit.base_url at a stand-in for the real leaderboard and shrinks the work (one model, one epoch,
tiny input); `split` keeps its defaults.

There is no real leaderboard here: the stand-in is the local server with `--published-only`, which speaks only the
published protocol and holds the test photos' labels, on the test's SeaweedFS (not the stack's). The stack (one for
both cases) is started by the README's own `segpipe stack up`, without a leaderboard, as data.hidden_labels is empty.
Both cases together: 4.5 to 5 min on 2 busy cores (2026-12; of each case `dvc repro` ~70-95 s, the flow run ~30-40 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml
from pycocotools import mask as cocomask

from segpipe import stack
from tests.conftest import COCO_SAMPLE, REPO, free_port, free_port_block
from tests.tiny import copy_project

pytestmark = [pytest.mark.slow, pytest.mark.services]
BIN = Path(sys.executable).parent
FOLDERS = ("batch_01_vt", "batch_02_vt", "batch_03")     # the competition's three batch folders
PLACEHOLDER_DATASET = "/path/to/dataset"
PLACEHOLDER_BUCKET = "s3://bucket/trash"
BOARD_BUCKET = "real-leaderboard"
CID = 1


# ---- the README's section ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadmeSteps:
    bring: str        # bash: drop the generator, bring the dataset in through DVC
    params: dict      # yaml: what params.yaml gets
    run: str          # bash: commit, stack up, dvc repro, deploy, deployment run


def readme_steps() -> ReadmeSteps:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Real data\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```(bash|yaml)\n(.*?)```", section, re.S)
    bash = [body for lang, body in blocks if lang == "bash"]
    yml = [body for lang, body in blocks if lang == "yaml"]
    assert len(bash) >= 2 and yml, "README 'Real data' lost its blocks: bring-in (bash), params (yaml), run (bash)"
    return ReadmeSteps(bash[0], yaml.safe_load(yml[0]), bash[1])


def import_url_instead(bring: str, url: str, endpoint: str) -> str:
    """The bring-in block with its commented `dvc import-url` line run instead of `dvc add`."""
    (imp,) = [ln for ln in bring.splitlines() if "dvc import-url" in ln and PLACEHOLDER_BUCKET in ln]
    imp = imp.lstrip("# ").replace(PLACEHOLDER_BUCKET, url) + f" --fs-config endpointurl={endpoint}"
    (add,) = [ln for ln in bring.splitlines() if "dvc add" in ln and not ln.startswith("#")]
    return bring.replace(add, imp)


# ---- two small datasets from the ten real photos ----------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str
    classes: list[str]
    test_names: list[str]       # image_id of each test photo in the submission
    test_masks: list[np.ndarray]


def _sample():
    coco = json.loads((COCO_SAMPLE / "annotations" / "instances_val2017_subset.json").read_text())
    used = {a["category_id"] for a in coco["annotations"]}
    categories = [c for c in coco["categories"] if c["id"] in used]
    # by name, in an order of our own (COCO's ids are not contiguous and not this order)
    classes = ["Background"] + sorted(c["name"] for c in categories)
    images = sorted(coco["images"], key=lambda im: im["id"])
    folder = {im["id"]: FOLDERS[i % len(FOLDERS)] for i, im in enumerate(images)}
    # one test photo per folder: train and test share every folder, as in the competition
    test_ids = {next(im["id"] for im in reversed(images) if folder[im["id"]] == f) for f in FOLDERS}
    return coco, categories, classes, images, folder, test_ids


def _mask(coco: dict, categories: list[dict], classes: list[str], im: dict) -> np.ndarray:
    """(H, W) uint8 class ids by category name; overlaps: the larger class index (data.overlap: max)."""
    index = {c["id"]: classes.index(c["name"]) for c in categories}
    out = np.zeros((im["height"], im["width"]), np.uint8)
    for a in coco["annotations"]:
        if a["image_id"] == im["id"]:
            rle = cocomask.frPyObjects(a["segmentation"], im["height"], im["width"])
            hit = cocomask.decode(cocomask.merge(rle) if isinstance(rle, list) else rle) > 0
            out[hit] = np.maximum(out[hit], index[a["category_id"]])
    return out


def coco_dataset(root: Path) -> Dataset:
    coco, categories, classes, images, folder, test_ids = _sample()
    renamed = [{**im, "file_name": f"{folder[im['id']]}/{im['file_name']}"} for im in images]
    for im, new in zip(images, renamed):
        (root / new["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        (root / new["file_name"]).write_bytes((COCO_SAMPLE / "images" / im["file_name"]).read_bytes())
    train = [im for im in renamed if im["id"] not in test_ids]
    test = [im for im in renamed if im["id"] in test_ids]
    anns = [a for a in coco["annotations"] if a["image_id"] not in test_ids]

    def write(name: str, imgs: list[dict], annotations: list[dict]) -> None:
        (root / name).write_text(json.dumps({"images": imgs, "annotations": annotations, "categories": categories}))

    write("train_all.json", train, anns)
    write("train.json", train[:-2], [a for a in anns if a["image_id"] in {im["id"] for im in train[:-2]}])
    write("val.json", train[-2:], [a for a in anns if a["image_id"] in {im["id"] for im in train[-2:]}])
    write("test.json", test, [])
    return Dataset(root, "coco", classes, [im["file_name"] for im in test],
                   [_mask(coco, categories, classes, im) for im in images if im["id"] in test_ids])


def mask_png_dataset(root: Path) -> Dataset:
    coco, categories, classes, images, _, test_ids = _sample()
    for sub in ("images", "masks", "test/images"):
        (root / sub).mkdir(parents=True)
    test_names, test_masks = [], []
    for im in images:
        photo = (COCO_SAMPLE / "images" / im["file_name"]).read_bytes()
        mask = _mask(coco, categories, classes, im)
        if im["id"] in test_ids:
            (root / "test" / "images" / im["file_name"]).write_bytes(photo)
            test_names.append(im["file_name"])
            test_masks.append(mask)
        else:
            (root / "images" / im["file_name"]).write_bytes(photo)
            cv2.imwrite(str(root / "masks" / f"{Path(im['file_name']).stem}.png"), mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return Dataset(root, "mask_png", classes, test_names, test_masks)


def write_hidden_labels(ds: Dataset, out: Path) -> None:
    """What the real leaderboard holds: the test photos' labels at the submission's 256 x 256."""
    out.mkdir(parents=True)
    labels = np.stack([cv2.resize(m, (256, 256), interpolation=cv2.INTER_NEAREST) for m in ds.test_masks])
    np.save(out / "labels.npy", labels)
    (out / "index.json").write_text(json.dumps({"file_names": ds.test_names, "classes": ds.classes,
                                                "public": [i % 2 == 0 for i in range(len(ds.test_names))]}))


# ---- the services -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory):
    """One stack home for both cases; the README's `segpipe stack up` starts it (each project links .segpipe here).
    Its credentials are written first, so the stand-in leaderboard can accept the stack's key."""
    home = tmp_path_factory.mktemp("stack") / "home"
    base = free_port_block(11)
    ports = {"s3": base, "prefect": base + 9, "leaderboard": base + 10}
    stack.write_credentials(home, ports)
    try:
        yield {"home": home, "ports": ports}
    finally:
        stack.down(home)


class StandInLeaderboard:
    """The local server with --published-only: presigned_url + the upload, no limits/listing/scores API."""

    def __init__(self, s3, labels: Path, state: Path, key: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state.parent / "board.log"
        env = {**os.environ, "SEGPIPE_S3_ENDPOINT": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "SEGPIPE_LEADERBOARD_KEYS": key}
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segpipe.leaderboard", "serve", "--published-only", "--port", str(self.port),
             "--labels", str(labels), "--state-dir", str(state), "--competition-id", str(CID), "--bucket", BOARD_BUCKET,
             "--poll-s", "0.2"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def bash(script: str, cwd: Path, env: dict, timeout: int = 900) -> str:
    """Run a README block as one shell script; the trace (`+ [<s> s] <command>`) says when each command started."""
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README step failed:\n{script}\n---\n{out[-6000:]}"
    return out


def user_env(shared: dict, **extra: str) -> dict:
    """A user's shell: no virtualenv on PATH (the README says .venv/bin/...), the stack's ports, a git identity."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SEGPIPE_", "AWS_", "PREFECT_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    env.update({"SEGPIPE_S3_PORT": str(shared["ports"]["s3"]), "SEGPIPE_PREFECT_PORT": str(shared["ports"]["prefect"]),
                "SEGPIPE_LEADERBOARD_PORT": str(shared["ports"]["leaderboard"]), "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com", **extra})
    return env


def merge(params: dict, update: dict) -> None:
    for section, values in update.items():
        params.setdefault(section, {}).update(values)


# ---- the steps --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mask_png", "coco"])
def test_readme_real_data_steps(layout, shared_stack, s3, tmp_path):
    steps = readme_steps()
    assert steps.params["data"]["hidden_labels"] == ""           # the README's own: no local leaderboard
    project = copy_project(tmp_path / "project")
    (project / ".venv").symlink_to(BIN.parent)                   # the checkout's virtualenv, as `make setup` makes
    (project / ".segpipe").symlink_to(shared_stack["home"])      # one stack for both cases
    ds = (mask_png_dataset if layout == "mask_png" else coco_dataset)(tmp_path / "dataset")
    team = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}

    # 1. bring the data in through DVC: `dvc add` of a folder, or `dvc import-url` from a bucket
    if layout == "coco":
        bucket = "team-data"
        client = s3.client()
        client.create_bucket(Bucket=bucket)
        for p in sorted(ds.root.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), bucket, f"coco/{p.relative_to(ds.root)}")
        bring = import_url_instead(steps.bring, f"s3://{bucket}/coco", s3.endpoint_url)
    else:
        bring = steps.bring.replace(PLACEHOLDER_DATASET, str(ds.root))
    assert bring != steps.bring
    bash(bring, project, user_env(shared_stack, **team))
    assert "generate" not in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    tracked = yaml.safe_load((project / "data/raw.dvc").read_text())
    assert (project / "data/raw").is_dir() and ("deps" in tracked) == (layout == "coco")   # an import records its URL

    # 2. params.yaml: the README's values, the dataset's layout and classes, the stand-in leaderboard, tiny work
    key = stack.load_env(shared_stack["home"])["SEGPIPE_LEADERBOARD_KEY"]
    write_hidden_labels(ds, tmp_path / "board" / "labels")
    board = StandInLeaderboard(s3, tmp_path / "board" / "labels", tmp_path / "board" / "state", key)
    p = yaml.safe_load((project / "params.yaml").read_text())
    split_before = dict(p["split"])
    merge(p, steps.params)
    merge(p, {"data": {"layout": ds.layout, "classes": ds.classes},
              "submit": {"base_url": board.url, "competition_id": CID, "description": f"real data {layout}"}})
    fpn = p["train"]["models"]["fpn_mbv2"]
    merge(p, {"train": {"models": {"fpn_mbv2": fpn}, "seeds": [0], "epochs": 1, "batch_size": 4, "input_size": 32,
                        "threads": 1},
              "retrain": {"epochs": 1}, "pseudo": {"rounds": 0, "threshold": 0.3, "min_confident_fraction": 0.0},
              "infer": {"batch_size": 8, "scales": [1.0]}, "validate": {"sample_grid": 4}})
    assert p["split"] == split_before and p["split"]["group_by"] == "auto"   # the default split, untouched
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))

    # 3. run it: stack up (no leaderboard), dvc repro, deploy, deployment run
    try:
        board.wait_ready()
        t0 = time.monotonic()
        out = bash("PS4='+ [$SECONDS s] '; set -x\n" + steps.run, project, user_env(shared_stack))
        seconds = time.monotonic() - t0
        check_run(layout, out, project, ds, tracked, shared_stack, s3, board)
    finally:
        board.stop()
    folds = json.loads((project / "artifacts/split/folds.json").read_text())
    print(f"\n{layout}: split grouped by {folds['grouped_by']} ({folds['reason']}); the README's run block took "
          f"{seconds:.0f} s:", *(ln for ln in out.splitlines() if ln.startswith("+ [")), sep="\n  ")


def check_run(layout: str, out: str, project: Path, ds: Dataset, tracked: dict, shared_stack: dict, s3,
              board: StandInLeaderboard) -> None:
    assert "leaderboard: not started: data.hidden_labels is empty" in out
    assert stack.status(shared_stack["home"])["leaderboard"]["state"] == "not started (data.hidden_labels is empty)"
    # dvc repro: the chain from validate on, the default split saying how it grouped
    assert "Running stage 'generate'" not in out and "Running stage 'validate'" in out
    folds = json.loads((project / "artifacts/split/folds.json").read_text())
    assert folds["group_by"] == "auto" and f"grouped by {folds['grouped_by']}" in out
    assert "<split.group_by=auto>" in out
    if layout == "mask_png":                                     # one folder: per image, never a failure
        assert folds["grouped_by"] == "image"
    assert sorted(set(folds["folds"].values())) == [0, 1]
    rows = (project / "artifacts/submit/submission.csv").read_text().splitlines()
    assert rows[0] == "image_id,PredictionString" and [r.split(",")[0] for r in rows[1:]] == ds.test_names
    assert all(len(r.split(",", 1)[1].split(" ")) == 256 * 256 for r in rows[1:])

    # the Prefect flow: completed, on this data version, submitted to the stand-in with only the published calls
    assert "Completed" in out
    (summary_path,) = (project / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["data_version"] == tracked["outs"][0]["md5"].removesuffix(".dir")[:12]
    assert summary["submit_status"] == "submitted", summary
    # the newest object of the user: the layouts share the bucket, and the server never hands out a key that
    # already holds an object (the earlier case's file stays at 0001)
    folder = f"app/Competitions/{CID:06d}/Users/00000001/Submissions/"
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BOARD_BUCKET, Prefix=folder).get("Contents", []))
    stored = s3.client().get_object(Bucket=BOARD_BUCKET, Key=keys[-1])
    assert stored["Body"].read() == (summary_path.parent / "submit" / "submission.csv").read_bytes()
    deadline = time.monotonic() + 30            # the stand-in scores it against the photos' own labels
    while "<td>scored</td>" not in (page := requests.get(f"{board.url}/", timeout=10).text):
        assert time.monotonic() < deadline, board.log_path.read_text()[-3000:]
        time.sleep(0.5)
    assert f"real data {layout}" in page

    secret = stack.load_env(shared_stack["home"])["AWS_SECRET_ACCESS_KEY"]
    for path in list((shared_stack["home"] / "logs").glob("*.log")) + list((project / "runs").rglob("*.json")):
        assert secret not in path.read_text(errors="ignore"), f"secret leaked into {path}"
