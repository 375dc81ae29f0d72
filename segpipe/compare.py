"""Do light experiments predict heavy ones, and does cross-validation track the leaderboard?

Experiments are records of (profile, setting, score): the setting is what the experiment changed against its
baseline params (the profile switch itself excluded). Per profile, a setting's gain is its score minus that
profile's baseline score (the run that changed nothing but the profile). A setting tried in both profiles gives a
pair (light gain, heavy gain); over all pairs: how often the signs agree and the rank correlation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

BASELINE = "(baseline)"


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{a: {b: 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def setting_of(params: dict, reference: dict, ignore: Sequence[str] = ("profile",)) -> dict[str, Any]:
    """The flat keys whose value differs from `reference` (added or removed keys too), minus `ignore`."""
    a, b = flatten(params), flatten(reference)
    keys = sorted(set(a) | set(b))
    return {k: a.get(k) for k in keys if a.get(k) != b.get(k)
            and not any(k == i or k.startswith(f"{i}.") for i in ignore)}


def setting_label(setting: dict[str, Any]) -> str:
    if not setting:
        return BASELINE
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(setting.items()))


@dataclass(frozen=True)
class GainRow:
    setting: str
    light_gain: float
    heavy_gain: float
    light_score: float
    heavy_score: float
    agree: bool                  # same sign (a zero gain agrees only with a zero gain)


@dataclass(frozen=True)
class GainReport:
    light: str
    heavy: str
    light_baseline: float | None
    heavy_baseline: float | None
    rows: list[GainRow]
    only_one_profile: list[str]        # settings tried in one profile only: no pair to compare
    sign_agreement: float | None       # share of settings whose gains have the same sign
    spearman: float | None             # rank correlation of the gains (needs >= 2 settings)

    def metrics(self) -> dict:
        return {"settings_compared": len(self.rows), "sign_agreement": self.sign_agreement,
                "spearman": self.spearman, "light_baseline": self.light_baseline,
                "heavy_baseline": self.heavy_baseline}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Rank correlation (ties get their mean rank); None with fewer than 2 pairs or a constant side."""
    if len(x) < 2:
        return None
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def gain_report(records: Sequence[dict], light: str, heavy: str) -> GainReport:
    """records: {"profile", "setting" (label), "score"}; a setting seen several times in a profile is averaged."""
    scores: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("score") is None or not math.isfinite(r["score"]):
            continue
        scores.setdefault((r["profile"], r["setting"]), []).append(float(r["score"]))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    base = {p: mean.get((p, BASELINE)) for p in (light, heavy)}
    settings = sorted({s for (p, s) in mean if p in (light, heavy) and s != BASELINE})
    rows, lonely = [], []
    for s in settings:
        lo, hi = mean.get((light, s)), mean.get((heavy, s))
        if lo is None or hi is None or base[light] is None or base[heavy] is None:
            lonely.append(s)
            continue
        gl, gh = lo - base[light], hi - base[heavy]
        rows.append(GainRow(s, gl, gh, lo, hi, bool(np.sign(round(gl, 6)) == np.sign(round(gh, 6)))))
    agreement = sum(r.agree for r in rows) / len(rows) if rows else None
    rho = spearman([r.light_gain for r in rows], [r.heavy_gain for r in rows])
    return GainReport(light, heavy, base[light], base[heavy], rows, lonely, agreement, rho)


def gain_markdown(rep: GainReport, records: Sequence[dict]) -> str:
    def f(v, signed=False):
        return "n/a" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")
    lines = "\n".join(f"| {r.setting} | {f(r.light_gain, True)} | {f(r.heavy_gain, True)} | "
                      f"{'yes' if r.agree else '**no**'} |" for r in rep.rows)
    runs = "\n".join(f"| {r.get('name') or r.get('rev', '')[:8]} | {r['profile']} | {r['setting']} | {f(r.get('score'))} |"
                     for r in records)
    verdict = ("no setting was tried in both profiles yet" if not rep.rows else
               f"signs agree for {sum(r.agree for r in rep.rows)} of {len(rep.rows)} settings"
               + (f"; rank correlation {rep.spearman:+.2f}" if rep.spearman is not None else ""))
    lonely = "".join(f"- {s}\n" for s in rep.only_one_profile)
    return (f"# Do `{rep.light}` experiments predict `{rep.heavy}` ones?\n\nGain = a setting's score minus its "
            f"profile's baseline ({rep.light}: {f(rep.light_baseline)}, {rep.heavy}: {f(rep.heavy_baseline)}). "
            f"**{verdict}.**\n\n| setting | {rep.light} gain | {rep.heavy} gain | same sign |\n|---|---|---|---|\n"
            f"{lines}\n\n" + (f"Tried in one profile only:\n\n{lonely}\n" if lonely else "")
            + f"## Every experiment\n\n| experiment | profile | setting | score |\n|---|---|---|---|\n{runs}\n")


# ---- cross-validation vs leaderboard ------------------------------------------------------------------------

@dataclass(frozen=True)
class CvLb:
    rows: list[dict]               # per scored submission, oldest first: n, time, run, oof, public, gap, diverged
    warnings: list[str]


def cv_vs_lb(history: Sequence[dict], margin: float) -> CvLb:
    """Submissions with both an OOF and a public score; a warning for each whose |public - OOF| exceeds margin."""
    rows, warnings = [], []
    for r in history:
        oof, pub = r.get("oof_miou"), r.get("public_score")
        if oof is None or pub is None:
            continue
        gap = float(pub) - float(oof)
        row = {"n": len(rows) + 1, "time": r.get("time"), "run": r.get("run"), "submission_id": r.get("submission_id"),
               "oof_miou": float(oof), "public_miou": float(pub), "gap": gap, "diverged": abs(gap) > margin}
        rows.append(row)
        if row["diverged"]:
            warnings.append(f"submission {row['submission_id']} (run {row['run']}): public mIoU {pub:.4f} vs OOF "
                            f"mIoU {oof:.4f} differ by {gap:+.4f}, beyond the margin {margin} "
                            f"<submit.cv_lb_margin={margin}>: local validation may not track the leaderboard")
    return CvLb(rows, warnings)


def cv_lb_plot(cv: CvLb, margin: float, path: Path) -> None:
    """OOF and public mIoU per submission in time order; diverged submissions marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if cv.rows:
        n = [r["n"] for r in cv.rows]
        oof = np.array([r["oof_miou"] for r in cv.rows])
        pub = np.array([r["public_miou"] for r in cv.rows])
        ax.fill_between(n, oof - margin, oof + margin, color="tab:blue", alpha=0.12, label=f"OOF ± {margin}")
        ax.plot(n, oof, "o-", color="tab:blue", label="OOF mIoU (cross-validation)")
        ax.plot(n, pub, "s-", color="tab:orange", label="public mIoU (leaderboard)")
        bad = [r for r in cv.rows if r["diverged"]]
        if bad:
            ax.scatter([r["n"] for r in bad], [r["public_miou"] for r in bad], s=140, facecolors="none",
                       edgecolors="red", label="diverged")
        ax.set_xticks(n)
    else:
        ax.text(0.5, 0.5, "no scored submission yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("submission (oldest first)")
    ax.set_ylabel("mIoU")
    ax.set_title("Cross-validation vs leaderboard")
    if cv.rows:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cv_lb_markdown(cv: CvLb, margin: float, image: str = "cv_lb.png") -> str:
    rows = "\n".join(f"| {r['n']} | {r['time']} | {r['run']} | {r['submission_id']} | {r['oof_miou']:.4f} | "
                     f"{r['public_miou']:.4f} | {r['gap']:+.4f} | {'**yes**' if r['diverged'] else 'no'} |"
                     for r in cv.rows)
    warn = "".join(f"> **Warning:** {w}\n>\n" for w in cv.warnings)
    return (f"# Cross-validation vs leaderboard\n\n{warn}\n![OOF vs public mIoU]({image})\n\n"
            f"| # | time | run | submission | OOF mIoU | public mIoU | public - OOF | beyond {margin} |\n"
            f"|---|---|---|---|---|---|---|---|\n{rows}\n")
