"""Stage helper `fetch`: make the DVC-versioned dataset present and return its data version."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path

import yaml

from pipelines.common import parser, run_main
from pipelines.dvccli import run_dvc
from segpipe.config import DataParams, load_params

log = logging.getLogger(__name__)


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # every dvc call of the chain goes through here: a lock held by another run is waited for, within a bound
    return run_dvc(*args, check=check)


def producing_stage(root: str) -> str | None:
    """The dvc.yaml stage whose outputs hold the dataset (the embedded generator's `generate`), if there is one."""
    stages = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {}) if Path("dvc.yaml").exists() else {}
    for name, stage in stages.items():
        for out in stage.get("outs", []) if isinstance(stage, dict) else []:
            out = next(iter(out)) if isinstance(out, dict) else str(out)
            if root == out or Path(out) in Path(root).parents:
                return name
    return None


def tracking_file(root: str) -> Path | None:
    """The `.dvc` file that `dvc add` or `dvc import-url` wrote for the dataset (or a folder above it), if any."""
    parts = Path(root).parts
    for i in range(len(parts), 0, -1):
        candidate = Path(*parts[:i]).parent / f"{parts[i - 1]}.dvc"
        if candidate.is_file():
            return candidate
    return None


def data_version(root: str) -> str:
    """The DVC content hash of the dataset folder (from dvc.lock or its `.dvc` file), else a listing hash."""
    lock = Path("dvc.lock")
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == root and "md5" in out:
                    return out["md5"].removesuffix(".dir")[:12]
    dvcfile = tracking_file(root)
    if dvcfile is not None:
        return yaml.safe_load(dvcfile.read_text())["outs"][0]["md5"].removesuffix(".dir")[:12]
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def run(data: DataParams, push: bool = True) -> str:
    """Make data.root present at its DVC version: `dvc repro` of the stage that writes it (the embedded `generate`;
    a no-op when up to date), else `dvc pull` of the `.dvc` file that `dvc add`/`dvc import-url` wrote."""
    stage = producing_stage(data.root)
    if stage:
        _dvc("repro", stage)
    else:
        pull(data.root)
    if not Path(data.root).is_dir():
        raise FileNotFoundError(f"dataset {data.root} (params.yaml data.root) is not there after DVC: "
                                "`dvc add` it or `dvc import-url` it, then commit the .dvc file")
    if push:
        push_data()
    version = data_version(data.root)
    print(f"fetch: dataset {data.root} at data version {version}")
    return version


def pull(root: str) -> None:
    """`dvc pull` the dataset's `.dvc` file. A remote that cannot be reached is only a warning when the workspace
    already holds exactly that version (`dvc status` clean): the data is there, the remote is not needed."""
    dvcfile = tracking_file(root)
    if dvcfile is None and Path(root).is_dir():
        # a folder placed by hand (a test fixture, a first look at new data) still runs; its version is a hash of
        # its file listing, which a nightly run cannot pull back elsewhere: say so every time
        log.warning("dataset %s (params.yaml data.root) is not under DVC: its version is a listing hash and no other "
                    "machine can pull it. Bring it in with `dvc add <dataset> -o %s` (README \"Real data\")", root, root)
        return
    if dvcfile is None:
        raise FileNotFoundError(
            f"dataset {root} (params.yaml data.root) is not under DVC: no dvc.yaml stage writes it and there is no "
            f"{root}.dvc. Bring it in with `dvc add <dataset> -o {root}` or `dvc import-url <url> {root}` "
            "(README \"Real data\") and commit the .dvc file")
    res = _dvc("pull", str(dvcfile), check=False)
    if res.returncode == 0:
        return
    error = res.stderr.strip() or res.stdout.strip()
    if Path(root).is_dir() and _workspace_matches(dvcfile):
        log.warning("dvc pull %s failed (%s); the workspace already holds this version, going on", dvcfile,
                    error[-300:])
        return
    raise RuntimeError(f"`dvc pull {dvcfile}` failed and {root} is missing or differs from {dvcfile}: {error}")


def _workspace_matches(dvcfile: Path) -> bool:
    """`dvc status` finds the workspace's data and DVC's cache equal to what `dvcfile` records (with the cache gone
    it says only "not in cache", whatever the workspace holds: that is no proof)."""
    res = _dvc("status", "--json", str(dvcfile), check=False)
    return res.returncode == 0 and not json.loads(res.stdout or "{}")


def push_data() -> bool:
    """`dvc push`: keep the remote complete, so another machine (or the nightly worker) can `dvc pull` this
    version. A remote that is not configured or not reachable is a warning: the data stays local."""
    res = _dvc("push", check=False)
    if res.returncode != 0:
        log.warning("dvc push failed (remote not configured or unreachable); data stays local: %s",
                    res.stderr.strip()[-300:])
    return res.returncode == 0


def main() -> None:
    a = parser(__doc__).parse_args()
    run_main(lambda: run(load_params("data", DataParams, a.params)))


if __name__ == "__main__":
    main()
