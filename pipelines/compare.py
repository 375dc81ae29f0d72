"""Quick-vs-full gain report: do the light profile's experiments predict the heavy profile's?

The data is DVC's own experiment record, `dvc exp show --json`: every experiment's params.yaml and metrics. An
experiment's profile is its `profile` param, its setting what else it changed against the commit it ran on
(`dvc exp run -S profile=quick -S 'infer.tta=[]'`: profile quick, setting infer.tta=[]), its score the metric
`compare.metric` names. Run after the experiments:

    dvc exp run --queue -S profile=quick -S train.loss=ce ...   # each setting in both profiles, plus each baseline
    dvc exp run --run-all
    python -m pipelines.compare                                 # artifacts/compare/{report.md, metrics.json, ...}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.common import parser, run_main, write_json
from pipelines.dvccli import run_dvc
from segpipe.compare import GainReport, gain_markdown, gain_report, setting_label, setting_of
from segpipe.config import CompareParams, parse_section, read_params


@dataclass(frozen=True)
class CompareResult:
    report: GainReport
    records: list[dict]
    out_dir: Path


def dvc_exp_show(repo: Path = Path(".")) -> list:
    """`dvc exp show --json` of the repository (the project's pinned dvc; waits, within a bound, for its lock)."""
    proc = run_dvc("exp", "show", "--json", cwd=repo, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed in {repo}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def _params(entry: dict) -> dict | None:
    return (((entry.get("data") or {}).get("params") or {}).get("params.yaml") or {}).get("data")


def _score(entry: dict, metric: str) -> float | None:
    path, key = metric.rsplit(":", 1)
    found = (((entry.get("data") or {}).get("metrics") or {}).get(path) or {}).get("data") or {}
    value = found.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def records_from_exp_show(show: list, metric: str) -> list[dict]:
    """One record per experiment (and per baseline commit that has the metric): name, rev, baseline, profile,
    setting (label and dict) and score. The workspace row is left out: it repeats the last experiment."""
    records = []
    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        reference = _params(commit) or {}
        entries = [(commit, commit.get("name") or commit["rev"][:8])]
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                entries.append((rev, rev.get("name") or exp.get("name") or rev["rev"][:8]))
        for entry, name in entries:
            params = _params(entry)
            if params is None:
                continue
            setting = setting_of(params, reference)
            records.append({"name": name, "rev": entry.get("rev"), "baseline": commit.get("rev"),
                            "profile": params.get("profile", "full"), "setting": setting_label(setting),
                            "changed": setting, "score": _score(entry, metric)})
    return records


def run(params: CompareParams, show: list, out_dir: Path) -> CompareResult:
    """Write out_dir/{experiments.json, gains.json, report.md, metrics.json}."""
    out_dir = Path(out_dir)
    records = records_from_exp_show(show, params.metric)
    scored = [r for r in records if r["score"] is not None]
    rep = gain_report(scored, params.light, params.heavy)
    write_json(out_dir / "experiments.json", records)
    write_json(out_dir / "gains.json", {**asdict(rep), "metric": params.metric})
    write_json(out_dir / "metrics.json", rep.metrics())
    (out_dir / "report.md").write_text(gain_markdown(rep, scored))
    agree = "n/a" if rep.sign_agreement is None else f"{rep.sign_agreement:.0%}"
    rho = "n/a" if rep.spearman is None else f"{rep.spearman:+.2f}"
    print(f"compare: {len(scored)} scored experiments; {len(rep.rows)} settings tried in both {params.light} and "
          f"{params.heavy}: signs agree {agree}, rank correlation {rho} <compare.metric={params.metric}>", flush=True)
    for r in rep.rows:
        print(f"compare:   {r.setting}: {params.light} {r.light_gain:+.4f}, {params.heavy} {r.heavy_gain:+.4f}"
              f"{'' if r.agree else '  (signs disagree)'}", flush=True)
    return CompareResult(rep, records, out_dir)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, default=Path("artifacts/compare"))
    p.add_argument("--exp-show", type=Path, help="a saved `dvc exp show --json` instead of asking DVC")
    a = p.parse_args()
    params = parse_section(read_params(a.params), "compare", CompareParams, str(a.params))
    run_main(lambda: run(params, json.loads(a.exp_show.read_text()) if a.exp_show else dvc_exp_show(), a.out))


if __name__ == "__main__":
    main()
