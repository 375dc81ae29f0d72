"""Hostile input never crashes the validate stage: each case is a validate process of its own that must exit 1 (not
a signal, not a traceback), name the record and the problem, and leave the output folder as it was.

Every case runs in a process of its own, so a segfault inside pycocotools fails its case instead of taking pytest
down. A fresh `python -m pipelines.validate` costs ~5 s on this 2-core machine (pandas, then the great-expectations
import and context), so the cases run as children forked, two at a time, from one interpreter that paid that once
(`_forking_runner`); each child calls the stage's own main(argv). A few cases also run through the real entry
point in a fresh interpreter (test_stage_entry_point_in_a_fresh_interpreter), as dvc.yaml runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segpipe.config import TRASH_CLASSES
from segpipe.synth import generate

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "an earlier run's output: a failed run must leave it as it was\n"
IMAGE_1 = "batch_01_vt/0002.jpg"        # image id 1 of the generated train_all.json
TEST_0 = "batch_03_vt/0001.jpg"         # image id 0 of test.json


# ----------------------------------------------------------------------------- mutations

def _edit(root: Path, name: str, fn) -> None:
    path = root / name
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))      # json writes float("inf") / float("nan") as Infinity / NaN


def image(**kw):
    """Update image 1 in train_all.json and in whichever split file lists it (so it stays consistent)."""
    def mutate(root: Path) -> None:
        for name in ("train_all.json", "train.json", "val.json"):
            _edit(root, name, lambda d: [im.update(kw) for im in d["images"] if im["file_name"] == IMAGE_1])
    return mutate


def drop_image_key(key: str):
    def mutate(root: Path) -> None:
        for name in ("train_all.json", "train.json", "val.json"):
            _edit(root, name, lambda d: [im.pop(key) for im in d["images"] if im["file_name"] == IMAGE_1])
    return mutate


def set_in(name: str, fn):
    return lambda root: _edit(root, name, fn)


def first_poly(d: dict) -> dict:
    return next(a for a in d["annotations"] if isinstance(a["segmentation"], list))


def annotation(**kw):
    return set_in("train_all.json", lambda d: first_poly(d).update(kw))


def seg(segmentation):
    return annotation(segmentation=segmentation)


def rename_test_image(new: str | bytes):
    """Rename test image 0 on disk and in test.json; bytes: a non-UTF-8 name, as the file system holds it."""
    def mutate(root: Path) -> None:
        raw = new if isinstance(new, bytes) else new.encode()
        os.rename(bytes(root / TEST_0), bytes(root) + b"/" + raw)
        _edit(root, "test.json", lambda d: d["images"][0].update(file_name=os.fsdecode(raw)))
    return mutate


def link_file_outside(root: Path) -> None:
    shutil.move(root / IMAGE_1, root.parent / "outside.jpg")
    (root / IMAGE_1).symlink_to(root.parent / "outside.jpg")


def link_folder_outside(root: Path) -> None:
    shutil.move(root / "batch_02_vt", root.parent / "elsewhere")
    (root / "batch_02_vt").symlink_to(root.parent / "elsewhere")


def same_stem(root: Path) -> None:
    """Image 1 becomes batch_01_vt/0001.png beside image 0's batch_01_vt/0001.jpg: one mask name for both."""
    shutil.copyfile(root / IMAGE_1, root / "batch_01_vt/0001.png")
    (root / IMAGE_1).unlink()
    image(file_name="batch_01_vt/0001.png")(root)


def mask_png_link(root: Path) -> None:
    shutil.move(root / "masks/1.png", root.parent / "mask.png")
    (root / "masks/1.png").symlink_to(root.parent / "mask.png")


def annotation_record(d: dict):
    return first_poly(d)["id"], first_poly(d)["image_id"]


# (id, mutation, problem code (None: the file itself is rejected), substrings of the line naming it); CASES puts
# the layout in front
A = "annotation {id} (image {image_id})"       # filled in from the base data by `_expected`
COCO_CASES = [
    # 1. ill-typed records and structure
    ("width_string", image(width="64"), "image_bad_type", [f"image 1 ({IMAGE_1})", 'width="64" is a string']),
    ("height_float_string", image(height="64.0"), "image_bad_type", ['height="64.0" is a string']),
    ("width_float", image(width=64.0), "image_bad_type", [f"image 1 ({IMAGE_1})", "width=64.0 is a float"]),
    ("id_bool", image(id=True), "image_bad_type", [f"({IMAGE_1})", "id=true is a boolean"]),
    ("width_null", image(width=None), "image_bad_type", ["width=null is null"]),
    ("height_list", image(height=[64]), "image_bad_type", ["height=[64] is a list"]),
    ("width_missing", drop_image_key("width"), "image_missing_keys", [f"image 1 ({IMAGE_1})", "lacks width"]),
    ("image_not_object", set_in("train_all.json", lambda d: d["images"].__setitem__(3, [3])), "image_bad_type",
     ["image #3", "is a list, not an object"]),
    ("ann_id_list", annotation(id=[0]), "annotation_bad_type", ["annotation [0]", "id=[0] is a list"]),
    ("ann_image_id_string", annotation(image_id="0"), "annotation_bad_type", ['image_id="0" is a string']),
    ("ann_category_float", annotation(category_id=2.0), "annotation_bad_type", [A, "category_id=2.0 is a float"]),
    ("ann_category_missing", set_in("train_all.json", lambda d: first_poly(d).pop("category_id")),
     "annotation_missing_keys", [A, "lacks category_id"]),
    ("category_id_string", set_in("train_all.json", lambda d: d["categories"][0].update(id="1")),
     "category_invalid", ['category "1"', 'id="1" is a string']),
    ("category_not_object", set_in("train_all.json", lambda d: d["categories"].__setitem__(2, "Paper pack")),
     "category_invalid", ["#2 in categories", "is a string, not an object"]),
    ("test_id_string", set_in("test.json", lambda d: d["images"][0].update(id="0")), "image_bad_type",
     [f"({TEST_0})", 'id="0" is a string']),
    ("top_level_list", lambda r: (r / "train_all.json").write_text("[1, 2]"), None,
     ["train_all.json", "top level must be an object"]),
    ("images_not_list", set_in("train_all.json", lambda d: d.update(images={})), None,
     ["train_all.json", "`images` must be a list"]),
    ("segmentation_string", seg("0 0 10 10"), "invalid_segmentation", [A, "neither a list of polygons"]),
    # 2. geometry, checked before pycocotools (1e10 and -1e300 segfaulted it)
    ("coord_1e10", seg([[1, 1, 1e10, 1, 30, 30]]), "polygon_outside_image", [A, "x = 1e+10 beyond the image width"]),
    ("coord_minus_1e300", seg([[1, 1, 30, 1, 30, -1e300]]), "polygon_outside_image", [A, "y = -1e+300 < 0"]),
    ("coord_infinity", seg([[1, 1, float("inf"), 1, 30, 30]]), "polygon_nan", [A, "(e.g. Infinity)"]),
    ("coord_nan", seg([[1, 1, 30, float("nan"), 30, 30]]), "polygon_nan", [A, "(e.g. NaN)"]),
    ("coord_int_beyond_float", seg([[1, 1, 10**400, 1, 30, 30]]), "polygon_nan", [A, "non-numeric"]),
    ("coord_string", seg([[1, 1, "30", 1, 30, 30]]), "polygon_nan", [A, '(e.g. "30")']),
    ("odd_coordinates", seg([[1, 1, 30, 1, 30, 30, 7]]), "polygon_odd_coordinates", [A, "odd number"]),
    ("two_points", seg([[1, 1, 30, 30]]), "polygon_too_few_points", [A, "polygon 0 has 2 point(s)"]),
    ("outline_too_long", seg([[1, 1, 60, 1, 60, 60] * 3000]), "polygon_too_long", [A, "9000 vertices"]),
    ("rle_runs_short", seg({"size": [64, 64], "counts": [0, 100]}), "rle_invalid", [A, "add up to 100 pixels"]),
    ("rle_runs_long", seg({"size": [64, 64], "counts": [0, 100, 5000]}), "rle_invalid", [A, "add up to 5100"]),
    ("rle_size_other", seg({"size": [32, 32], "counts": [1024]}), "rle_size_mismatch", [A, "RLE size [32, 32]"]),
    ("rle_counts_floats", seg({"size": [64, 64], "counts": [0.5, 4095.5]}), "rle_invalid", [A, "hold 0.5"]),
    ("rle_string_truncated", seg({"size": [64, 64], "counts": "0o"}), "rle_invalid", [A, "ends in the middle"]),
    # 3. file names
    ("absolute_path", image(file_name="/etc/hostname"), "file_name_unsafe", ["/etc/hostname is an absolute path"]),
    ("dotdot", image(file_name="../hidden/0002.jpg"), "file_name_unsafe", ["has a `..` component"]),
    ("symlink_outside", link_file_outside, "file_name_unsafe", [f"image 1 ({IMAGE_1})", "outside data.root"]),
    ("folder_link_outside", link_folder_outside, "file_name_unsafe", ["(batch_02_vt/0001.jpg)", "outside data.root"]),
    ("same_mask_name", same_stem, "mask_name_collision",
     ["image 1 (batch_01_vt/0001.png)", "same as that of image 0 (batch_01_vt/0001.jpg)"]),
    ("test_name_comma", rename_test_image("batch_03_vt/a,b.jpg"), "test_file_name_not_csv_safe",
     ["a,b.jpg", "a comma"]),
    ("test_name_quote", rename_test_image('batch_03_vt/a"b.jpg'), "test_file_name_not_csv_safe", ["double quote"]),
    ("test_name_newline", rename_test_image("batch_03_vt/a\nb.jpg"), "test_file_name_not_csv_safe",
     [r"a\nb.jpg", r"control character '\n'"]),
    ("test_name_control", rename_test_image("batch_03_vt/a\x1bb.jpg"), "test_file_name_not_csv_safe",
     [r"control character '\x1b'"]),
    ("test_name_not_utf8", rename_test_image(b"batch_03_vt/a\xffb.jpg"), "file_name_unsafe",
     [r"a\xffb.jpg", "not valid UTF-8"]),
]
MASK_PNG_CASES = [
    ("mask_png_mask_link", mask_png_link, "file_name_unsafe", ["masks/1.png", "outside data.root"]),
    ("mask_png_test_comma", lambda r: (r / "test/images/t0.png").rename(r / "test/images/t,0.png"),
     "test_file_name_not_csv_safe", ["t,0.png", "a comma"]),
]
CASES = [("coco", *c) for c in COCO_CASES] + [("mask_png", *c) for c in MASK_PNG_CASES]


# ----------------------------------------------------------------------------- the base datasets, the runs

def _mask_png(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "test/images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(TRASH_CLASSES) + "\n")
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        m = np.zeros((32, 40), np.uint8)
        m[5:15, 5:20] = k + 1
        Image.fromarray(m).save(root / "masks" / f"{k}.png")
    Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "test/images/t0.png")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The clean datasets, made once: 8 train + 2 test photos of 64 px (COCO), 4 + 1 (mask-PNG)."""
    root = tmp_path_factory.mktemp("bases")
    generate(root / "coco", root / "hidden", n_train=8, n_test=2, image_size=64, n_batches=2, val_fraction=0.25,
             seed=0, classes=TRASH_CLASSES)
    _mask_png(root / "mask_png")
    return {"coco": root / "coco", "mask_png": root / "mask_png"}


def _params(case_dir: Path, data: Path, layout: str, **validate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(root=str(data), layout=layout, classes=list(TRASH_CLASSES))
    # every image may lack annotations: a broken record must be the only problem, not an empty-image count
    raw["validate"].update({"max_empty_images": 8, "max_bad_records": 0, "sample_grid": 2, **validate})
    (case_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    return case_dir / "params.yaml"


@dataclass
class Run:
    returncode: int          # negative: killed by that signal (as subprocess reports it)
    stdout: str
    stderr: str


def _run(params: Path, out: Path) -> Run:
    """The stage as dvc.yaml runs it: `python -m pipelines.validate` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.validate", "--params", str(params), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, errors="backslashreplace", timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def _run_forked(jobs: list[dict], spec: Path) -> list[Run]:
    """Run pipelines.validate.main once per job, each in a process of its own forked from one interpreter that
    paid the imports and the great-expectations context once (~4 s of a fresh process's ~5 s): see _forking_runner.
    """
    spec.write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, "-m", "tests.test_bad_input", str(spec)], cwd=REPO, capture_output=True,
                          text=True, errors="backslashreplace", timeout=900)
    assert proc.returncode == 0, f"the forking runner itself failed:\n{proc.stderr[-3000:]}"
    read = lambda p: Path(p).read_text(errors="backslashreplace")  # noqa: E731
    return [Run(int(read(j["rc"])), read(j["stdout"]), read(j["stderr"])) for j in jobs]


def _forking_runner(spec: Path, parallel: int = 2) -> None:
    """`python -m tests.test_bad_input SPEC`: fork one child per job (`parallel` at a time); each child calls
    pipelines.validate.main(argv) with its stdout/stderr on files, as `python -m pipelines.validate` would, and
    exits with main's status; an uncaught exception prints its traceback and exits 1, as a fresh interpreter does,
    and a signal shows as -signal. A crash in one child cannot touch the others."""
    import pipelines.validate as stage
    from segpipe.validation import _gx

    _gx()
    queue, running = list(json.loads(spec.read_text())), {}
    while queue or running:
        while queue and len(running) < parallel:
            job = queue.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
                    os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
                    stage.main(["--params", job["params"], "--out", job["out"]])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = job
        pid, status = os.wait()
        job = running.pop(pid)
        Path(job["rc"]).write_text(str(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)))


def _prepare(bases: dict[str, Path], case_dir: Path, layout: str, mutate, existed: bool) -> tuple[Path, Path]:
    """A mutated copy of the base dataset, its params.yaml and the out dir (with an earlier output if `existed`)."""
    data = case_dir / "data"
    shutil.copytree(bases[layout], data, symlinks=True)
    mutate(data)
    out = case_dir / "validate"
    if existed:
        out.mkdir()
        (out / "index.json").write_text(SENTINEL)
    return _params(case_dir, data, layout), out


@pytest.fixture(scope="module")
def runs(bases, tmp_path_factory) -> dict[str, tuple[Run, Path, bool]]:
    """Every case's run: case id -> (its process, its out dir, whether an earlier output was there)."""
    root = tmp_path_factory.mktemp("cases")
    jobs, outs = [], {}
    for k, (layout, cid, mutate, _, _) in enumerate(CASES):
        existed = k % 2 == 0            # half the cases: an earlier output that must not be replaced
        params, out = _prepare(bases, root / cid, layout, mutate, existed)
        outs[cid] = (out, existed)
        jobs.append({"params": str(params), "out": str(out), **{f: str(root / cid / f) for f in
                                                                  ("rc", "stdout", "stderr")}})
    results = _run_forked(jobs, root / "jobs.json")
    return {cid: (run, *outs[cid]) for cid, run in zip(outs, results)}


def _expected(bases: dict[str, Path], wanted: list[str]) -> list[str]:
    ann_id, image_id = annotation_record(json.loads((bases["coco"] / "train_all.json").read_text()))
    return [w.format(id=ann_id, image_id=image_id) if w == A else w for w in wanted]


def _assert_failed_cleanly(run: Run, out: Path, existed: bool, code: str | None, wanted: list[str]) -> None:
    err = run.stderr
    assert run.returncode == 1, f"exit {run.returncode} (negative: killed by a signal)\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "validate: FAILED, nothing written to" in err, err[-3000:]
    # one line names the problem's code, the record and what is wrong
    wanted = ([f"[{code}]"] if code else []) + wanted
    assert any(all(w in line for w in wanted) for line in err.splitlines()), f"no line has all of {wanted}:\n{err}"
    if existed:
        assert sorted(p.name for p in out.iterdir()) == ["index.json"]
        assert (out / "index.json").read_text() == SENTINEL
    else:
        assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".validate")]   # no temp siblings left


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
def test_hostile_input_is_named_and_nothing_is_written(runs, bases, case):
    _, cid, _, code, wanted = case
    run, out, existed = runs[cid]
    _assert_failed_cleanly(run, out, existed, code, _expected(bases, wanted))


# the entry point itself, in a fresh interpreter each: the case that segfaulted, one that failed in pandas' C
# hashing, one rejected before any suite ran
FRESH = ["coord_1e10", "test_name_not_utf8", "top_level_list"]


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in FRESH], ids=[c[1] for c in CASES if c[1] in FRESH])
def test_stage_entry_point_in_a_fresh_interpreter(bases, tmp_path, case):
    layout, _, mutate, code, wanted = case
    params, out = _prepare(bases, tmp_path, layout, mutate, existed=True)
    _assert_failed_cleanly(_run(params, out), out, True, code, _expected(bases, wanted))


def test_tolerated_bad_records_are_left_out_downstream(bases, tmp_path):
    """Within validate.max_bad_records the stage succeeds: the bad image and annotations are named as warnings
    and never reach rasterisation (an ill-typed id or a 1e10 coordinate there would crash it)."""
    data = tmp_path / "data"
    shutil.copytree(bases["coco"], data)
    image(width="64")(data)
    d = json.loads((data / "train_all.json").read_text())
    polys = [a for a in d["annotations"] if isinstance(a["segmentation"], list) and a["image_id"] != 1]
    polys[0]["id"] = [polys[0]["id"]]
    polys[1]["segmentation"] = [[1, 1, 1e10, 1, 30, 30]]
    (data / "train_all.json").write_text(json.dumps(d))
    out = tmp_path / "validate"
    proc = _run(_params(tmp_path, data, "coco", max_bad_records=3), out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("tolerated bad record") == 3, proc.stdout
    index = json.loads((out / "index.json").read_text())
    assert IMAGE_1 not in [r["file_name"] for r in index["train"]] and len(index["train"]) == 7


def test_rasterize_refuses_what_validation_refuses():
    """rasterize (the stage's, and any other caller's) goes through the same check: a named SegmentationError,
    never a segfault or a read past the mask. One process: a crash would fail this test, not pytest."""
    script = """
import math
from pathlib import Path
from segpipe.coco import CocoFile, SegmentationError, rasterize
cases = {"1e10": [[1, 1, 1e10, 1, 30, 30]], "inf": [[1, 1, math.inf, 1, 30, 30]], "short": [[1, 1, 30, 30]],
         "rle_long": {"size": [64, 64], "counts": [0, 100, 5000]}, "rle_str": {"size": [64, 64], "counts": "0o"},
         "too_long": [[1, 1, 60, 1, 60, 60] * 3000], "fine": [[1, 1, 30, 1, 30, 30]]}
for name, seg in cases.items():
    coco = CocoFile(Path("x.json"), [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
                    [{"id": 7, "image_id": 1, "category_id": 3, "segmentation": seg}], [{"id": 3, "name": "Paper"}])
    try:
        print(name, int((rasterize(coco, 1, {3: 2}) == 2).sum()))
    except SegmentationError as e:
        print(name, e.code, "annotation 7 (image 1)" in str(e))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert got == {"1e10": "polygon_outside_image True", "inf": "polygon_nan True",
                   "short": "polygon_too_few_points True", "rle_long": "rle_invalid True",
                   "rle_str": "rle_invalid True", "too_long": "polygon_too_long True", "fine": got["fine"]}, got
    assert int(got["fine"]) > 300, got      # a sane triangle still rasterises


def test_links_into_dvc_cache_are_part_of_the_dataset(tmp_path):
    """DVC's `cache.type: symlink` checks files out as links into its content-addressed cache, outside data.root:
    those are the versioned data itself; any other link out of the root is named."""
    from segpipe.validation import path_problem
    root, cache = tmp_path / "data", tmp_path / ".dvc/cache/files/md5/3f"
    root.mkdir()
    cache.mkdir(parents=True)
    (cache / "0123456789abcdef0123456789abcd").write_bytes(b"photo")
    (tmp_path / "loose.jpg").write_bytes(b"photo")
    (root / "a.jpg").symlink_to(cache / "0123456789abcdef0123456789abcd")
    (root / "b.jpg").symlink_to(tmp_path / "loose.jpg")
    (root / "c.jpg").write_bytes(b"photo")
    assert path_problem(root, "a.jpg") == "" and path_problem(root, "c.jpg") == ""
    assert "outside data.root" in path_problem(root, "b.jpg")


if __name__ == "__main__":
    _forking_runner(Path(sys.argv[1]))
