"""Cell-line classification on CellBench: Geneformer pretrained and fine-tuned vs a linear baseline.

Run from the repository root (about 15 minutes on 2 CPU cores):

    python benchmarks/finetune_geneformer.py

CellBench (450 cells of three lung cancer cell lines measured on two platforms) is split three
ways: a stratified random 70/30 split by cell line (fixed seed) and the two cross-platform splits
(train on all cells of one platform, test on all cells of the other). On every split, using the
training cells only,

* ``logistic regression``: scikit-learn's ``LogisticRegression`` on the 2,000 most variable genes
  chosen on the training cells (``normalize_total`` + ``log1p``, ``highly_variable_genes``);
* ``Geneformer random init -> fine-tune``: a small Geneformer (hidden 128, 4 layers, 4 heads,
  intermediate 256, 512 input tokens, V1 layout with the real published V1 token dictionary and
  gene medians) fine-tuned from random weights with ``train(mode="finetune")``;
* ``Geneformer pretrain -> fine-tune``: the same network (same initial weights) first pretrained
  from scratch with the masked-gene objective (``train()``) on the training cells, then fine-tuned
  in the same way;
* probes (kNN and logistic regression) on ``get_latent_representation()`` (penultimate layer,
  mean pooling) of the pretrained, not fine-tuned, model, and of the random-init model as a
  control;

are evaluated on the test cells (``predict_celltype`` for the fine-tuned models) with macro-F1
and accuracy, next to chance (guessing with the training class frequencies) and the training
wall-clock time. The results go to ``benchmarks/results/finetune_geneformer.md``.

The fine-tuning learning rate and epochs were chosen with ``--dev`` (each split's test cells are
replaced by a stratified 30 % of its training cells; lr 2e-4 / 5e-4 / 1e-3, 5 or 10 epochs), never
on test cells; the number of pretraining epochs is set by the time budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

# Sleeping (not spinning) idle OpenMP threads avoid per-op stalls on shared vCPUs; this must be
# set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
# The small real datasets sit in ../shared/data beside a checkout; CELLFORMERS_DATA overrides.
os.environ.setdefault("CELLFORMERS_DATA", str(ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "benchmarks" / "results"

import logging  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import scanpy as sc  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import cellformers as cf  # noqa: E402
from cellformers.genes import read_gene_dict  # noqa: E402
from cellformers.model import Geneformer  # noqa: E402

LABEL = "cell_line"
SEED = 0
ARCH = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 512,
    "max_input_size": 512,
    "hidden_dropout_prob": 0.02,
    # Attention dropout makes PyTorch leave its fused CPU attention kernel for the explicit
    # [batch, heads, L, L] path, which doubles the pretraining time here.
    "attention_probs_dropout_prob": 0.0,
}
TRAIN_KW = {"batch_size": 12, "train_size": 1.0, "enable_progress_bar": False}


def splits(adata, dev: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (train positions, test positions)}``; ``dev`` validates inside the train cells."""
    labels = adata.obs[LABEL].to_numpy()
    platforms = adata.obs["platform"].to_numpy()
    train, test = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=SEED
    )
    out = {"random 70/30 (stratified)": (np.sort(train), np.sort(test))}
    for a, b in (("CEL-seq2", "Drop-seq"), ("Drop-seq", "CEL-seq2")):
        out[f"{a} -> {b}"] = (np.flatnonzero(platforms == a), np.flatnonzero(platforms == b))
    if dev:
        for name, (train, _) in out.items():
            fit, val = train_test_split(
                train, test_size=0.3, stratify=labels[train], random_state=SEED
            )
            out[name] = (np.sort(fit), np.sort(val))
    return out


def scores(truth, pred) -> dict[str, float]:
    return {
        "macro_f1": f1_score(truth, pred, average="macro"),
        "accuracy": accuracy_score(truth, pred),
    }


def chance(train_labels, test_labels, n_draws: int = 1000) -> dict[str, float]:
    """Mean scores of guessing each test label from the training class frequencies."""
    rng = np.random.default_rng(SEED)
    classes, counts = np.unique(train_labels, return_counts=True)
    draws = [
        scores(test_labels, rng.choice(classes, len(test_labels), p=counts / counts.sum()))
        for _ in range(n_draws)
    ]
    return {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}


def hvg_logistic_regression(train, test) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    data = {}
    for name, part in (("train", train), ("test", test)):
        part = part.copy()
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        data[name] = part
    sc.pp.highly_variable_genes(data["train"], n_top_genes=2000)  # train cells only
    genes = data["train"].var_names[data["train"].var["highly_variable"].to_numpy()]
    clf = LogisticRegression(max_iter=5000)
    clf.fit(data["train"][:, genes].X.toarray(), train.obs[LABEL].to_numpy())
    pred = clf.predict(data["test"][:, genes].X.toarray())
    return pred, time.perf_counter() - start


def probes(train_emb, train_labels, test_emb) -> dict[str, np.ndarray]:
    knn = KNeighborsClassifier(n_neighbors=10).fit(train_emb, train_labels)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    lr.fit(train_emb, train_labels)
    return {"kNN (k=10)": knn.predict(test_emb), "logistic regression": lr.predict(test_emb)}


def new_model(train, dicts) -> Geneformer:
    torch.manual_seed(SEED)  # the same initial weights for both Geneformer arms
    return Geneformer(train, token_dictionary=dicts[0], gene_medians=dicts[1], **ARCH)


def run_split(adata, train_idx, test_idx, dicts, args) -> list[dict]:
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    truth = test.obs[LABEL].to_numpy()
    rows = [
        {"method": "chance (guess by train class frequencies)", **chance(train.obs[LABEL], truth)}
    ]

    pred, seconds = hvg_logistic_regression(train, test)
    rows.append(
        {
            "method": "logistic regression, 2,000 train HVGs",
            **scores(truth, pred),
            "seconds": seconds,
        }
    )

    for part in (train, test):
        Geneformer.setup_anndata(part, gene_key="ensembl_id", labels_key=LABEL)

    # random init -> fine-tune (its embeddings before fine-tuning are the probe control)
    model = new_model(train, dicts)
    model.is_trained_ = True  # allow embedding with the untrained weights
    emb = [model.get_latent_representation(p) for p in (train, test)]
    for probe, pred in probes(emb[0], train.obs[LABEL], emb[1]).items():
        rows.append({"method": f"probe: {probe} on random-init embeddings", **scores(truth, pred)})
    torch.manual_seed(SEED)
    start = time.perf_counter()
    model.train(args.finetune_epochs, mode="finetune", lr=args.finetune_lr, **TRAIN_KW)
    seconds = time.perf_counter() - start
    rows.append(
        {
            "method": "Geneformer random init -> fine-tune",
            **scores(truth, model.predict_celltype(test)),
            "seconds": seconds,
        }
    )

    # masked-gene pretraining on the train cells -> probes -> fine-tune
    model = new_model(train, dicts)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    model.train(args.pretrain_epochs, lr=args.pretrain_lr, **TRAIN_KW)
    pretrain_seconds = time.perf_counter() - start
    mlm_acc = float(model.history["mlm_accuracy_train"].to_numpy(dtype=float)[-1, 0])
    emb = [model.get_latent_representation(p) for p in (train, test)]
    for probe, pred in probes(emb[0], train.obs[LABEL], emb[1]).items():
        rows.append(
            {
                "method": f"probe: {probe} on pretrained embeddings",
                **scores(truth, pred),
                "seconds": pretrain_seconds,
                "note": f"last-epoch masked-gene accuracy (train) {mlm_acc:.3f}",
                "mlm_accuracy": mlm_acc,
            }
        )
    # scvi-tools' TrainRunner leaves the module in eval mode after training and Lightning keeps
    # that mode, so a second train() would fine-tune without dropout; train mode is restored here.
    model.module.train()
    torch.manual_seed(SEED)
    start = time.perf_counter()
    model.train(args.finetune_epochs, mode="finetune", lr=args.finetune_lr, **TRAIN_KW)
    seconds = time.perf_counter() - start
    rows.append(
        {
            "method": "Geneformer pretrain -> fine-tune",
            **scores(truth, model.predict_celltype(test)),
            "seconds": pretrain_seconds + seconds,
            "note": f"pretraining {pretrain_seconds:.0f} s + fine-tuning {seconds:.0f} s",
        }
    )
    for row in rows:
        row["n"] = f"{len(train_idx)} / {len(test_idx)}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument(
        "--dev",
        action="store_true",
        help="evaluate on a stratified 30 %% of each split's training cells (for tuning)",
    )
    parser.add_argument("--splits", nargs="*", help="names of the splits to run (default: all)")
    args = parser.parse_args()

    # scvi-tools shuffles the training cells with settings.seed (None by default: a new order on
    # every run); torch.manual_seed alone does not make training reproducible.
    scvi.settings.seed = SEED
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    total = time.perf_counter()
    paths = cf.data.geneformer_v1_dictionaries()
    dicts = (
        read_gene_dict(paths["token_dictionary"]),
        read_gene_dict(paths["gene_median_dictionary"]),
    )
    adata = cf.data.cellbench_2platform()
    results = {}
    for name, (train_idx, test_idx) in splits(adata, args.dev).items():
        if args.splits and name not in args.splits:
            continue
        print(f"== {name}: {len(train_idx)} train / {len(test_idx)} test cells", flush=True)
        results[name] = run_split(adata, train_idx, test_idx, dicts, args)
        for row in results[name]:
            print(
                f"   {row['method']}: macro-F1 {row['macro_f1']:.3f}, acc {row['accuracy']:.3f}",
                flush=True,
            )
    total = time.perf_counter() - total
    write_results(results, args, total)


def write_results(results, args, total_seconds) -> None:
    lines = [
        "# Geneformer cell-line classification on CellBench (held-out cells)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, scvi-tools {version('scvi-tools')}, scikit-learn {version('scikit-learn')}, "
        f"scanpy {version('scanpy')}; CPU, float32, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. "
        f"Whole run {total_seconds / 60:.1f} min. Produced by `benchmarks/finetune_geneformer.py`"
        + (" --dev (VALIDATION cells, not test cells)." if args.dev else "."),
        "",
        "Geneformer: hidden 128, 4 layers, 4 heads, intermediate 256, 512 input tokens, hidden dropout "
        "0.02 (no attention dropout), V1 layout with the published V1 token dictionary (25,426 "
        "tokens) and gene medians; seed 0 for the split and the weights. Pretraining: masked-gene "
        f"objective, {args.pretrain_epochs} epochs, lr {args.pretrain_lr:g}; fine-tuning: "
        f"{args.finetune_epochs} epochs, lr {args.finetune_lr:g}; AdamW, batch 12, linear warm-up "
        "5 % then cosine decay, all on the training cells only (no validation hold-out). "
        "Baseline: logistic regression on log-normalised counts of the 2,000 HVGs of the training "
        "cells. Probes: kNN (k = 10) / logistic regression (standardised features) on the penultimate-layer mean-pooled "
        "embeddings. Time is training wall-clock (pretraining included where it applies).",
        "",
        "| split (train / test cells) | method | macro-F1 | accuracy | train time (s) | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for row in rows:
            seconds = f"{row['seconds']:.0f}" if "seconds" in row else ""
            lines.append(
                f"| {name} ({row['n']}) | {row['method']} | {row['macro_f1']:.3f} | "
                f"{row['accuracy']:.3f} | {seconds} | {row.get('note', '')} |"
            )
    lines += ["", "## What the numbers show", ""]
    summary = {}
    for name, rows in results.items():
        by = {r["method"]: r["macro_f1"] for r in rows}
        summary[name] = {
            "ft": by["Geneformer pretrain -> fine-tune"],
            "rnd": by["Geneformer random init -> fine-tune"],
            "base": by["logistic regression, 2,000 train HVGs"],
            "chance": by["chance (guess by train class frequencies)"],
            "probe_pre": by["probe: logistic regression on pretrained embeddings"],
            "probe_rnd": by["probe: logistic regression on random-init embeddings"],
            "mlm": next(r["mlm_accuracy"] for r in rows if "mlm_accuracy" in r),
        }
        v = summary[name]
        lines.append(
            f"- {name}: pretrain -> fine-tune macro-F1 {v['ft']:.3f}, random init -> fine-tune "
            f"{v['rnd']:.3f}, chance {v['chance']:.3f}, logistic regression on HVGs {v['base']:.3f}; "
            f"logistic-regression probe on pretrained vs random-init embeddings {v['probe_pre']:.3f} "
            f"vs {v['probe_rnd']:.3f}."
        )
    values = {k: [v[k] for v in summary.values()] for k in next(iter(summary.values()))}
    gain = np.subtract(values["ft"], values["rnd"])
    lines += [
        "",
        f"Every fine-tuned Geneformer is far above chance (macro-F1 {min(values['ft'] + values['rnd']):.2f}"
        f"-{max(values['ft'] + values['rnd']):.2f} against {max(values['chance']):.2f}), on held-out "
        "cells of the training platforms and on cells of a platform never seen in training. That "
        "is the claim this benchmark supports. Three cell lines are an easy task, though: "
        f"logistic regression on 2,000 HVGs reaches macro-F1 {min(values['base']):.3f} on its "
        "worst split, against "
        + ", ".join(f"{max(v['ft'], v['rnd']):.3f} ({name})" for name, v in summary.items())
        + " for the better fine-tuned Geneformer.",
        "",
        f"Pretraining from scratch at this budget ({args.pretrain_epochs} epochs on a few hundred "
        f"cells) hardly gets started: the masked-gene accuracy ends at "
        f"{min(values['mlm']):.1%}-{max(values['mlm']):.1%} (guessing one of 25,424 genes: 0.004 %). "
        + (
            f"It does not help fine-tuning (pretrain -> fine-tune minus random init -> fine-tune: "
            f"{', '.join(f'{g:+.3f}' for g in gain)} macro-F1)"
            if gain.max() < 0.02
            else f"Pretrain -> fine-tune minus random init -> fine-tune: "
            f"{', '.join(f'{g:+.3f}' for g in gain)} macro-F1"
        )
        + ", and probes on the pretrained embeddings "
        + (
            "are worse than on the random-init embeddings, "
            if all(np.less(values["probe_pre"], values["probe_rnd"]))
            else "compare with those on random-init embeddings as listed above, "
        )
        + "which already separate the cell lines well (rank-value encoding alone carries the "
        "signal). The benchmark shows the pretrain / fine-tune / predict pipeline working on held-out "
        "data, not the value of pretraining, which needs a large corpus. With one seed and 135-240 "
        "test cells, differences of a few hundredths are within noise.",
    ]
    print("\n".join(lines))
    if not args.dev:  # validation numbers are printed only
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "finetune_geneformer.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
