"""Perturbation-response baselines on the Papalexi ECCITE-seq CRISPR-KO screen (held-out targets).

Run from the repository root (under a minute on 2 CPU cores):

    python benchmarks/perturbation_baselines.py

The screen (16,192 THP-1 cells x 299 genes, 25 knockout targets with cells plus non-targeting
controls) is split by perturbation, never by cell: the 25 targets are shuffled with a fixed seed
and cut into 5 folds of 5; every fold is held out once while the baselines learn from the other
20 targets and the controls. Every target is therefore scored exactly once, by a baseline that
never saw its cells. ``cellformers.tl.evaluate_perturbation`` scores, per held-out target, the
predicted against the observed change from the control mean (``log1p`` of counts per 10,000):
Pearson correlation on all genes and on the target's top 20 DE genes (Welch t against the
control cells), mean squared error on both, and the fraction of top-20 DE genes whose direction
of change is right. Methods:

* ``control``: no change (correlations undefined);
* ``train_mean``: the mean profile of the training targets;
* ``linear (K=10, lambda=0.1)``: the linear model of Ahlmann-Eltze, Huber & Anders (2025) with
  the paper's settings; only 9 targets are measured genes, so it differs from ``train_mean``
  only for those 9 (the others fall back to ``train_mean``);
* ``linear (K, lambda tuned on training targets)``: the same model with ``K`` and ``lambda`` chosen
  per fold by leave-one-out over the measured training targets (mean Pearson delta), never on
  the held-out fold.

The screen has no combinations, so the ``additive`` baseline does not apply. Results are
reported over all 25 targets and over the 9 measured targets, with the observed on-target
knockdown of the 9 measured targets. The results go to
``benchmarks/results/perturbation_baselines.md``; model predictors add their rows with
``evaluate_perturbation(adata, predicted, ...)`` on the same folds.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from importlib.metadata import version
from itertools import product
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
# The small real datasets sit in ../shared/data beside a checkout; CELLFORMERS_DATA overrides.
os.environ.setdefault("CELLFORMERS_DATA", str(ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402

import cellformers as cf  # noqa: E402

KEY = "perturbation"
CONTROL = "non-targeting"
N_TOP = 20
GRID_K = (1, 2, 5, 10)
GRID_RIDGE = (0.1, 1.0, 10.0, 100.0, 1000.0)
METRICS = [
    "pearson_delta",
    f"pearson_delta_top{N_TOP}",
    "mse",
    f"mse_top{N_TOP}",
    f"direction_accuracy_top{N_TOP}",
]
PAPER = "linear (K=10, lambda=0.1)"
TUNED = "linear (K, lambda tuned on training targets)"


def folds(targets: list[str], n_folds: int, seed: int) -> list[list[str]]:
    order = np.random.default_rng(seed).permutation(sorted(targets))
    return [sorted(f) for f in np.array_split(order, n_folds)]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def tune_linear(adata, means, train: list[str]) -> tuple[int, float, float]:
    """Choose (K, lambda) by leave-one-out over the measured training targets."""
    measured = [t for t in train if t in adata.var_names]
    ctrl = means[CONTROL].X.ravel()
    best = None
    for k, ridge in product(GRID_K, GRID_RIDGE):
        scores = []
        for held in measured:
            pred = cf.tl.perturbation_baseline(
                adata,
                perturbation_key=KEY,
                control_label=CONTROL,
                test_perturbations=[held],
                train_perturbations=[t for t in train if t != held],
                method="linear",
                n_components=k,
                ridge=ridge,
            )
            scores.append(pearson(pred.X[0] - ctrl, means[held].X.ravel() - ctrl))
        score = float(np.mean(scores))
        if best is None or score > best[2]:
            best = (k, ridge, score)
    return best


def run_fold(adata, means, test: list[str], train: list[str]) -> tuple[pd.DataFrame, dict]:
    df = cf.tl.evaluate_perturbation(
        adata,
        perturbation_key=KEY,
        control_label=CONTROL,
        test_perturbations=test,
        train_perturbations=train,
        n_top_de=N_TOP,
        baselines=("control", "train_mean", "linear"),
    )
    df["method"] = df["method"].replace({"linear": PAPER})
    k, ridge, score = tune_linear(adata, means, train)
    tuned = cf.tl.perturbation_baseline(
        adata,
        perturbation_key=KEY,
        control_label=CONTROL,
        test_perturbations=test,
        train_perturbations=train,
        method="linear",
        n_components=k,
        ridge=ridge,
    )
    df_tuned = cf.tl.evaluate_perturbation(
        adata,
        tuned,
        perturbation_key=KEY,
        control_label=CONTROL,
        test_perturbations=test,
        train_perturbations=train,
        n_top_de=N_TOP,
        baselines=(),
        method_name=TUNED,
    )
    return pd.concat([df, df_tuned], ignore_index=True), {"K": k, "ridge": ridge, "loo": score}


def on_target(adata) -> pd.DataFrame:
    """Observed change of every measured target gene in its own knockout cells."""
    logn = adata.copy()
    sc.pp.normalize_total(logn, target_sum=1e4)
    cp10k = logn.X.copy()
    sc.pp.log1p(logn)
    logn.layers["cp10k"] = cp10k
    means = cf.tl.perturbation_means(
        logn, perturbation_key=KEY, control_label=CONTROL, normalize=False
    )
    lin = cf.tl.perturbation_means(
        logn, perturbation_key=KEY, control_label=CONTROL, layer="cp10k", normalize=False
    )
    measured = [t for t in means.obs_names if t in adata.var_names]
    sc.tl.rank_genes_groups(
        logn, KEY, groups=measured, reference=CONTROL, method="t-test", n_genes=adata.n_vars
    )
    rows = []
    for target in measured:
        de = sc.get.rank_genes_groups_df(logn, group=target).set_index("names")["scores"]
        rank = de.abs().sort_values(ascending=False, kind="stable").index.get_loc(target) + 1
        ko, ctrl = means[target, target].X.item(), means[CONTROL, target].X.item()
        rows.append(
            {
                "target": target,
                "cells": int(means.obs.loc[target, "n_cells"]),
                "control log1p": ctrl,
                "knockout log1p": ko,
                "delta log1p": ko - ctrl,
                "log2 FC (mean counts per 10k)": np.log2(
                    lin[target, target].X.item() / lin[CONTROL, target].X.item()
                ),
                "Welch t": de[target],
                "rank by abs(t) of 299": rank,
            }
        )
    return pd.DataFrame(rows).sort_values("delta log1p").reset_index(drop=True)


def fmt_table(summary: pd.DataFrame, methods: list[str]) -> list[str]:
    lines = [
        "| method | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for method in methods:
        cells = []
        for metric in METRICS:
            mean, sd, n = (summary.loc[method, (metric, s)] for s in ("mean", "sd", "n"))
            cells.append("NaN (undefined)" if n == 0 else f"{mean:.3f} ± {sd:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    total = time.perf_counter()
    adata = cf.data.papalexi_eccite_lowmoi()
    means = cf.tl.perturbation_means(adata, perturbation_key=KEY, control_label=CONTROL)
    targets = [p for p in means.obs_names if p != CONTROL and means.obs.loc[p, "n_cells"] > 0]
    measured = [t for t in targets if t in adata.var_names]
    split = folds(targets, args.folds, args.seed)
    frames, chosen = [], []
    for i, test in enumerate(split):
        train = [t for t in targets if t not in test]
        print(f"== fold {i + 1}: held out {', '.join(test)}", flush=True)
        df, best = run_fold(adata, means, test, train)
        frames.append(df)
        chosen.append(best)
        print(f"   tuned linear: K={best['K']}, lambda={best['ridge']:g}", flush=True)
    df = pd.concat(frames, ignore_index=True)
    knockdown = on_target(adata)
    total = time.perf_counter() - total
    write_results(df, split, chosen, knockdown, measured, args, total)


def write_results(df, split, chosen, knockdown, measured, args, total_seconds) -> None:
    methods = ["control", "train_mean", PAPER, TUNED]
    summary_all = cf.tl.summarize_perturbation_metrics(df)
    summary_measured = cf.tl.summarize_perturbation_metrics(df[df.perturbation.isin(measured)])
    per_target = (
        df[df.perturbation.isin(measured) & (df.metric == "pearson_delta")]
        .pivot(index="perturbation", columns="method", values="value")
        .reindex(columns=methods[1:])
    )
    n_targets = df.perturbation.nunique()
    lines = [
        "# Perturbation-response baselines on Papalexi ECCITE-seq (held-out knockout targets)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, numpy {np.__version__}, "
        f"scanpy {version('scanpy')}, anndata {version('anndata')}; CPU, float64. "
        f"Whole run {total_seconds:.0f} s. Produced by "
        f"`python benchmarks/perturbation_baselines.py --folds {args.folds} --seed {args.seed}`.",
        "",
        f"Data: `papalexi_eccite_lowmoi` (16,192 THP-1 cells x 299 genes, raw counts), "
        f"{n_targets} knockout targets with cells, controls `{CONTROL}`. Values: mean of "
        "`log1p` of counts per 10,000 per target (pseudobulk); change = target mean - control "
        "mean. Split by target: the targets are shuffled with "
        f"`numpy.random.default_rng({args.seed})` and cut into {args.folds} folds; each fold is "
        "held out once while the baselines learn from the other targets and the controls, so "
        "every target is scored once. Metrics from `cellformers.tl.evaluate_perturbation` "
        f"(top {N_TOP} DE genes: largest Welch |t| of the target's cells against the control "
        "cells); mean ± sd over held-out targets. The control baseline predicts no change, so "
        "its correlations are undefined and its direction accuracy is 0 by definition. "
        f"Tuned linear: K in {{{', '.join(map(str, GRID_K))}}}, lambda in "
        f"{{{', '.join(f'{r:g}' for r in GRID_RIDGE)}}}, "
        "chosen per fold by leave-one-out over the measured training targets (mean Pearson "
        "delta); chosen per fold: "
        + ", ".join(
            f"{i + 1}: K={c['K']}, lambda={c['ridge']:g} (LOO {c['loo']:.2f})"
            for i, c in enumerate(chosen)
        )
        + ".",
        "",
        "Folds: " + "; ".join(f"{i + 1}: {', '.join(f)}" for i, f in enumerate(split)) + ".",
        "",
        f"## All {n_targets} held-out targets",
        "",
        *fmt_table(summary_all, methods),
        "",
        f"## The {len(measured)} targets that are measured genes",
        "",
        "Only these have a perturbation embedding in the linear model; for the other "
        f"{n_targets - len(measured)} targets both linear rows equal `train_mean`.",
        "",
        *fmt_table(summary_measured, methods),
        "",
        "Pearson delta per measured target:",
        "",
        "| target | " + " | ".join(per_target.columns) + " |",
        "|---|" + "---|" * per_target.shape[1],
        *(
            f"| {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
            for t, row in per_target.iterrows()
        ),
        "",
        "## On-target knockdown of the measured targets (observed)",
        "",
        "Mean of `log1p` of counts per 10,000 in the control and knockout cells, their "
        "difference, log2 of the ratio of mean counts per 10,000, Welch's t (scanpy "
        "`rank_genes_groups`, t-test against the controls) and the rank of the target gene "
        "among the 299 genes by |t|.",
        "",
        "| " + " | ".join(knockdown.columns) + " |",
        "|---|" + "---|" * (knockdown.shape[1] - 1),
    ]
    for _, row in knockdown.iterrows():
        lines.append(
            f"| {row['target']} | {row['cells']} | {row['control log1p']:.3f} | "
            f"{row['knockout log1p']:.3f} | {row['delta log1p']:.3f} | "
            f"{row['log2 FC (mean counts per 10k)']:.2f} | {row['Welch t']:.1f} | "
            f"{row['rank by abs(t) of 299']} |"
        )
    lines += [
        "",
        "## What the numbers show",
        "",
        *findings(summary_all, summary_measured, knockdown),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "perturbation_baselines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def findings(summary_all, summary_measured, knockdown) -> list[str]:
    def m(summary, method, metric):
        return summary.loc[method, (metric, "mean")]

    pd_all = {k: m(summary_all, k, "pearson_delta") for k in ("train_mean", PAPER, TUNED)}
    pd_meas = {k: m(summary_measured, k, "pearson_delta") for k in ("train_mean", PAPER, TUNED)}
    mse = {k: m(summary_all, k, "mse") for k in ("control", "train_mean", PAPER, TUNED)}
    down = int((knockdown["delta log1p"] < 0).sum())
    top = int((knockdown["rank by abs(t) of 299"] <= N_TOP).sum())
    return [
        f"- Pearson delta over all targets: train_mean {pd_all['train_mean']:.3f}, linear with "
        f"the paper's settings {pd_all[PAPER]:.3f}, tuned linear {pd_all[TUNED]:.3f}. On the "
        f"measured targets: {pd_meas['train_mean']:.3f}, {pd_meas[PAPER]:.3f} and "
        f"{pd_meas[TUNED]:.3f}.",
        f"- MSE over all genes: control {mse['control']:.4f}, train_mean {mse['train_mean']:.4f}, "
        f"linear {mse[PAPER]:.4f}, tuned linear {mse[TUNED]:.4f}.",
        f"- On-target: {down} of {len(knockdown)} measured targets are lower in their own "
        f"knockout cells than in the controls; {top} of {len(knockdown)} are among their "
        f"knockout's top {N_TOP} DE genes.",
        "- The bar for a model: it must beat `train_mean` on Pearson delta and MSE on held-out "
        "targets. With 20 training targets, 9 of them measured, the linear model has few "
        "perturbation embeddings to learn from; how it compares with `train_mean` here says "
        "little about datasets with hundreds of perturbations.",
    ]


if __name__ == "__main__":
    main()
