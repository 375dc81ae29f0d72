"""The `compare-profiles` flow: the quick-vs-full gain report from DVC's experiments, as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import pipelines.compare
from segpipe.config import load_params


@flow(name="compare-profiles", log_prints=True)
def compare_profiles(params_file: str = "params.yaml", out_dir: str = "artifacts/compare") -> dict:
    """Read `dvc exp show --json` of this checkout; publish the gains table and report; return the summary."""
    result = pipelines.compare.run(load_params("compare", path=Path(params_file)), pipelines.compare.dvc_exp_show(),
                                   Path(out_dir))
    rep = result.report
    create_markdown_artifact((result.out_dir / "report.md").read_text(), key="quick-vs-full",
                             description=f"do {rep.light} experiments predict {rep.heavy} ones?")
    if rep.rows:
        create_table_artifact([{"setting": r.setting, f"{rep.light}_gain": round(r.light_gain, 4),
                                f"{rep.heavy}_gain": round(r.heavy_gain, 4), "same_sign": r.agree} for r in rep.rows],
                              key="quick-vs-full-gains", description="each setting's gain over its profile's baseline")
    return rep.metrics()


if __name__ == "__main__":
    compare_profiles()
