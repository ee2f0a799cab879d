"""Cell-type annotation by fine-tuning scGPT, Geneformer, scBERT and scFoundation architectures.

Run from the repository root (about 30 minutes on 2 CPU cores; ``--quick`` for a smoke test of
a few minutes that writes nothing):

    python benchmarks/annotation.py

No published checkpoint is used: every model is a small network of its family, built from
scratch. Four splits, each scored on its held-out cells:

* CellBench (450 cells of three lung cancer cell lines, ``cell_line``, on two platforms):
  train on CEL-seq2 and test on Drop-seq, the reverse, and a stratified random 70/30 split;
* scanpy's ``pbmc68k_reduced`` (700 cells, 765 genes, counts recovered by
  ``cf.data.pbmc68k_reduced_counts()``, 10 ``bulk_labels``, imbalanced): a stratified random
  70/30 split.

On every split, using the training cells only,

* ``chance``: guessing each test label from the training class frequencies (mean of 1,000
  draws);
* ``logistic regression``: scikit-learn's ``LogisticRegression`` on the log-normalised counts
  (``normalize_total`` to 10,000, ``log1p``) of the ``N_HVG`` most variable genes of the
  training cells (all genes when there are fewer);
* for each model family, ``random init -> fine-tune``: ``train(mode="finetune")`` on the
  training labels from random weights, and ``pretrain -> fine-tune``: the same network (same
  initial weights) first pretrained from scratch with the family's own masked objective
  (``train(mode="pretrain")``) on the training cells, then fine-tuned in the same way;
  predictions on the test cells with ``predict_celltype``.

scGPT, scBERT and scFoundation read the training cells' ``N_HVG`` most variable genes (the genes
the logistic regression reads; scBERT's and scFoundation's fixed gene panel, scGPT's
vocabulary, as its official annotation and integration recipes select HVGs), Geneformer the
rank-value encoding of all genes with the published V1 token dictionary and gene medians. The pbmc labels are imbalanced (8 to 240 cells per type), so every
pbmc fit uses ``class_weight="balanced"`` (the logistic regression too).

Fine-tuning learning rates and epochs were checked with ``--dev`` (each split's test cells are
replaced by a stratified 30 % of its training cells), never on test cells; pretraining epochs
are set by the time budget. The results go to ``benchmarks/results/annotation.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
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

import cellformers as cf  # noqa: E402
from cellformers.genes import read_gene_dict  # noqa: E402
from cellformers.model import SCBERT, SCGPT, Geneformer, SCFoundation  # noqa: E402

SEED = 0
N_HVG = 500
TRAIN_KW = {"train_size": 1.0, "enable_progress_bar": False}
FAMILIES = ("scGPT", "Geneformer", "scBERT", "scFoundation")

# Network sizes (all small, built from scratch). Dropout inside attention makes PyTorch leave
# its fused CPU attention kernel (about 10x slower here), so the full-attention families train
# without it.
ARCH = {
    "scGPT": {
        "d_model": 64,
        "nhead": 4,
        "d_hid": 128,
        "nlayers": 2,
        "dropout": 0.0,
        "max_seq_len": 512,
    },
    "Geneformer": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "max_input_size": 256,
        "hidden_dropout_prob": 0.02,
        "attention_probs_dropout_prob": 0.0,
    },
    "scBERT": {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16},
    "scFoundation": {
        "encoder_dim": 64,
        "encoder_depth": 2,
        "encoder_heads": 4,
        "encoder_d_hid": 128,
        "encoder_dropout": 0.0,
        "decoder_dim": 64,
        "decoder_depth": 2,
        "decoder_heads": 4,
        "decoder_dim_head": 16,
    },
}
# Training settings per family: epochs, fine-tuning peak learning rate (AdamW, warm-up then
# cosine decay) and minibatch size; weight decay and warm-up are each class's defaults.
# Chosen with --dev on the pbmc68k_reduced split (random-init fine-tune, lr 3e-4 or 1e-3).
TRAIN = {
    "scGPT": {"pretrain_epochs": 10, "finetune_epochs": 20, "finetune_lr": 1e-3, "batch_size": 16},
    "Geneformer": {
        "pretrain_epochs": 3,
        "finetune_epochs": 20,
        "finetune_lr": 1e-3,
        "batch_size": 16,
    },
    "scBERT": {"pretrain_epochs": 3, "finetune_epochs": 10, "finetune_lr": 3e-4, "batch_size": 16},
    "scFoundation": {
        "pretrain_epochs": 3,
        "finetune_epochs": 10,
        "finetune_lr": 1e-3,
        "batch_size": 16,
    },
}
PRETRAIN_LR = 1e-3
# what each family's pretraining history reports besides the loss
PRETRAIN_METRIC = {
    "scGPT": None,
    "Geneformer": "mlm_accuracy_train",
    "scBERT": "mlm_accuracy_train",
    "scFoundation": None,
}


# ---------------------------------------------------------------------------- data and splits
def datasets() -> dict:
    """``{name: (AnnData with raw counts in X, label column, gene key, split names)}``."""
    cellbench = cf.data.cellbench_2platform()
    pbmc = cf.data.pbmc68k_reduced_counts()
    pbmc.X = pbmc.layers["counts"].copy()
    return {
        "CellBench": (cellbench, "cell_line", "ensembl_id"),
        "pbmc68k_reduced": (pbmc, "bulk_labels", None),
    }


def splits(data: dict, dev: bool) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{split: (dataset, train positions, test positions)}``; ``dev`` validates in train."""
    out = {}
    adata, label, _ = data["CellBench"]
    platforms = adata.obs["batch"].to_numpy()
    for a, b in (("CEL-seq2", "Drop-seq"), ("Drop-seq", "CEL-seq2")):
        out[f"CellBench {a} -> {b}"] = (
            "CellBench",
            np.flatnonzero(platforms == a),
            np.flatnonzero(platforms == b),
        )
    for name in ("CellBench", "pbmc68k_reduced"):
        adata, label, _ = data[name]
        labels = adata.obs[label].to_numpy()
        train, test = train_test_split(
            np.arange(adata.n_obs), test_size=0.3, stratify=labels, random_state=SEED
        )
        out[f"{name} random 70/30"] = (name, np.sort(train), np.sort(test))
    if dev:
        for split, (name, train, _) in out.items():
            labels = data[name][0].obs[data[name][1]].to_numpy()
            fit, val = train_test_split(
                train, test_size=0.3, stratify=labels[train], random_state=SEED
            )
            out[split] = (name, np.sort(fit), np.sort(val))
    return out


def subsample(idx: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of the positions ``idx``, stratified by label (for ``--quick``)."""
    if len(idx) <= n:
        return idx
    keep, _ = train_test_split(
        idx, train_size=n, stratify=labels[idx], random_state=SEED
    )  # every label with at least 2 cells keeps some
    return np.sort(keep)


def train_hvgs(train) -> np.ndarray:
    """The ``N_HVG`` most variable genes of the training cells (all genes when fewer)."""
    if train.n_vars <= N_HVG:
        return train.var_names.to_numpy()
    norm = train.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=N_HVG)
    return norm.var_names[norm.var["highly_variable"].to_numpy()].to_numpy()


# ---------------------------------------------------------------------------- scores
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


def hvg_logistic_regression(train, test, genes, label, class_weight) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    data = {}
    for name, part in (("train", train), ("test", test)):
        part = part.copy()
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        data[name] = part[:, genes].X.toarray()
    clf = LogisticRegression(max_iter=5000, class_weight=class_weight)
    clf.fit(data["train"], train.obs[label].to_numpy())
    pred = clf.predict(data["test"])
    return pred, time.perf_counter() - start


# ---------------------------------------------------------------------------- models
def build(family: str, train, test, genes, label, gene_key, dicts, batch_key=None):
    """A fresh network of ``family`` on ``train`` (seeded) and the test AnnData it reads."""
    if family != "Geneformer":
        # the training cells' most variable genes (scBERT's and scFoundation's fixed panel)
        train, test = train[:, genes].copy(), test[:, genes].copy()
    cls = {"scGPT": SCGPT, "Geneformer": Geneformer, "scBERT": SCBERT}.get(family, SCFoundation)
    setup = {"labels_key": label, "batch_key": batch_key}
    if family == "Geneformer":  # Ensembl IDs, as the V1 dictionaries use
        setup["gene_key"] = gene_key
    for part in (train, test):
        cls.setup_anndata(part, **setup)
    scvi.settings.seed = SEED  # the same initial weights for both arms
    kwargs = dict(ARCH[family])
    if family == "Geneformer":
        kwargs.update(token_dictionary=dicts[0], gene_medians=dicts[1])
    elif family == "scBERT":
        # the published gene2vec table is not available for this panel: a frozen table of fixed
        # random gene vectors lets the encoder tell the panel genes apart
        rng = np.random.default_rng(SEED)
        kwargs["gene2vec"] = rng.standard_normal((train.n_vars, kwargs["dim"]))
    return cls(train, **kwargs), test


def fit(model, mode: str, epochs: int, lr: float, batch_size: int, class_weight) -> float:
    scvi.settings.seed = SEED  # same minibatch order and masking in every arm
    start = time.perf_counter()
    extra = {"class_weight": class_weight} if mode == "finetune" else {}
    model.train(epochs, mode=mode, lr=lr, batch_size=batch_size, **extra, **TRAIN_KW)
    return time.perf_counter() - start


def history(model, key: str) -> tuple[float, float]:
    values = model.history[key].to_numpy(dtype=float)[:, 0]
    return float(values[0]), float(values[-1])


def run_family(family, train, test, genes, label, gene_key, dicts, class_weight, args) -> list:
    settings = TRAIN[family]
    pre_epochs = args.pretrain_epochs or settings["pretrain_epochs"]
    ft_epochs = args.finetune_epochs or settings["finetune_epochs"]
    bs = settings["batch_size"]
    truth = test.obs[label].to_numpy()
    rows = []

    model, query = build(family, train, test, genes, label, gene_key, dicts)
    seconds = fit(model, "finetune", ft_epochs, settings["finetune_lr"], bs, class_weight)
    rows.append(
        {
            "method": f"{family} random init -> fine-tune",
            **scores(truth, model.predict_celltype(query)),
            "pretrain_s": None,
            "finetune_s": seconds,
        }
    )

    model, query = build(family, train, test, genes, label, gene_key, dicts)
    pre_seconds = fit(model, "pretrain", pre_epochs, PRETRAIN_LR, bs, None)
    first, last = history(model, "train_loss")
    note = f"pretraining loss {first:.3g} -> {last:.3g}"
    if PRETRAIN_METRIC[family]:
        first, last = history(model, PRETRAIN_METRIC[family])
        note += f", masked-token accuracy {first:.3f} -> {last:.3f}"
    seconds = fit(model, "finetune", ft_epochs, settings["finetune_lr"], bs, class_weight)
    rows.append(
        {
            "method": f"{family} pretrain -> fine-tune",
            **scores(truth, model.predict_celltype(query)),
            "pretrain_s": pre_seconds,
            "finetune_s": seconds,
            "note": note,
        }
    )
    for row in rows:
        print(
            f"   {row['method']}: macro-F1 {row['macro_f1']:.3f}, acc {row['accuracy']:.3f}, "
            f"{(row['pretrain_s'] or 0) + row['finetune_s']:.0f} s {row.get('note', '')}",
            flush=True,
        )
    return rows


def run_split(adata, label, gene_key, train_idx, test_idx, dicts, class_weight, args) -> list:
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    truth = test.obs[label].to_numpy()
    genes = train_hvgs(train)
    rows = [
        {"method": "chance (guess by train class frequencies)", **chance(train.obs[label], truth)}
    ]
    pred, seconds = hvg_logistic_regression(train, test, genes, label, class_weight)
    rows.append(
        {
            "method": "logistic regression on train HVGs",
            **scores(truth, pred),
            "finetune_s": seconds,
            "note": f"{len(genes):,} genes",
        }
    )
    for row in rows:
        print(f"   {row['method']}: macro-F1 {row['macro_f1']:.3f}, acc {row['accuracy']:.3f}")
    for family in args.models or FAMILIES:
        rows += run_family(family, train, test, genes, label, gene_key, dicts, class_weight, args)
    for row in rows:
        row["n"] = f"{len(train_idx)} / {len(test_idx)}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, help="override every family's setting")
    parser.add_argument("--finetune-epochs", type=int, help="override every family's setting")
    parser.add_argument(
        "--dev",
        action="store_true",
        help="evaluate on a stratified 30 %% of each split's training cells (for tuning)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 epoch each, at most 90 training and 60 test cells; writes nothing",
    )
    parser.add_argument("--splits", nargs="*", help="names of the splits to run (default: all)")
    parser.add_argument("--models", nargs="*", choices=FAMILIES, help="families (default: all)")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.pretrain_epochs = args.pretrain_epochs or 1
        args.finetune_epochs = args.finetune_epochs or 1

    scvi.settings.seed = SEED
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    total = time.perf_counter()
    paths = cf.data.geneformer_v1_dictionaries()
    dicts = (
        read_gene_dict(paths["token_dictionary"]),
        read_gene_dict(paths["gene_median_dictionary"]),
    )
    data = datasets()
    results = {}
    for split, (name, train_idx, test_idx) in splits(data, args.dev).items():
        if args.splits and split not in args.splits:
            continue
        adata, label, gene_key = data[name]
        if args.quick:
            labels = adata.obs[label].to_numpy()
            train_idx = subsample(train_idx, labels, 90)
            test_idx = subsample(test_idx, labels, 60)
        class_weight = "balanced" if name == "pbmc68k_reduced" else None
        print(f"== {split}: {len(train_idx)} train / {len(test_idx)} test cells", flush=True)
        results[split] = run_split(
            adata, label, gene_key, train_idx, test_idx, dicts, class_weight, args
        )
    total = time.perf_counter() - total
    write_results(results, args, total)


# ---------------------------------------------------------------------------- report
def _seconds(value) -> str:
    return "" if value is None else f"{value:.0f}"


def write_results(results, args, total_seconds) -> None:
    lines = [
        "# Cell-type annotation: four transformer families fine-tuned from scratch (held-out cells)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads (2 vCPUs shared with other jobs), torch {torch.__version__}, scvi-tools "
        f"{version('scvi-tools')}, scikit-learn {version('scikit-learn')}, scanpy "
        f"{version('scanpy')}; CPU, float32, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. "
        f"Whole run {total_seconds / 60:.1f} min. Produced by "
        f"`{shlex.join(['python', 'benchmarks/annotation.py', *args.argv])}`"
        + (" (VALIDATION cells, not test cells)." if args.dev else "."),
        "",
        "## Setup",
        "",
        "- Data: CellBench (450 cells, 3 cell lines, `cell_line`; CEL-seq2 240 cells, Drop-seq "
        "210) and scanpy's pbmc68k_reduced (700 cells, 765 genes, counts from "
        "`cf.data.pbmc68k_reduced_counts()`, 10 `bulk_labels` with 8 to 240 cells). Splits: "
        "train on one CellBench platform and test on the other, and stratified random 70/30 "
        f"splits (scikit-learn, `random_state={SEED}`) of each dataset.",
        f"- Seeds: `scvi.settings.seed = {SEED}` before building each network (so the random-init "
        "and the pretrained arm start from the same weights) and before each `train` call.",
        f"- Everything is learned from the training cells of the split only: the {N_HVG:,} HVGs "
        "(`highly_variable_genes` on log-normalised counts; for pbmc68k_reduced they are chosen "
        "among its 765 genes, which scanpy had already chosen as HVGs of all 700 cells when it "
        "built the dataset), the pretraining and the fine-tuning (no validation hold-out, no "
        "early stopping).",
        "- Logistic regression: scikit-learn `LogisticRegression(max_iter=5000)` on "
        "`normalize_total(1e4)` + `log1p` of the HVGs.",
        '- pbmc68k_reduced: every fine-tune uses `class_weight="balanced"` (loss weight '
        "n / (k n_c) per class), and so does the logistic regression; CellBench (three "
        "lines of similar size) uses none.",
        "",
        "| family | network | input | pretraining objective | batch | pretrain epochs | "
        "fine-tune epochs | fine-tune lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    arch = ARCH
    desc = {
        "scGPT": (
            f"d_model {arch['scGPT']['d_model']}, {arch['scGPT']['nlayers']} layers, "
            f"{arch['scGPT']['nhead']} heads, d_hid {arch['scGPT']['d_hid']}, dropout 0, "
            "ClsDecoder head on `<cls>`",
            f"vocabulary = the {N_HVG:,} train HVGs; `<cls>` + the expressed ones (at most "
            f"{arch['scGPT']['max_seq_len'] - 1}: a random subset per epoch in training, a fixed "
            "per-cell subset at inference), 51 value bins",
            "masked value prediction (40 % of gene tokens) + MVC",
        ),
        "Geneformer": (
            f"hidden {arch['Geneformer']['hidden_size']}, "
            f"{arch['Geneformer']['num_hidden_layers']} layers, "
            f"{arch['Geneformer']['num_attention_heads']} heads, intermediate "
            f"{arch['Geneformer']['intermediate_size']}, hidden dropout 0.02, no attention dropout",
            f"top {arch['Geneformer']['max_input_size']} genes by rank-value encoding (V1 layout, "
            "published V1 token dictionary of 25,426 tokens and gene medians)",
            "masked-gene prediction (15 %)",
        ),
        "scBERT": (
            f"dim {arch['scBERT']['dim']}, {arch['scBERT']['depth']} Performer layers, "
            f"{arch['scBERT']['heads']} heads x {arch['scBERT']['dim_head']}, official "
            "fine-tuning head (conv + 3 linear layers over all positions)",
            f"panel = the {N_HVG:,} train HVGs (+1 position), 5 expression bins, frozen N(0, 1) "
            "gene vectors as the gene2vec position table",
            "masked-expression prediction (15 % of non-zero tokens)",
        ),
        "scFoundation": (
            f"encoder {arch['scFoundation']['encoder_dim']} x "
            f"{arch['scFoundation']['encoder_depth']} layers ({arch['scFoundation']['encoder_heads']} "
            f"heads, feed-forward {arch['scFoundation']['encoder_d_hid']}, dropout 0), Performer "
            f"decoder {arch['scFoundation']['decoder_dim']} x "
            f"{arch['scFoundation']['decoder_depth']}; head: batch norm + MLP on max-pooled gene "
            "states",
            f"gene list = the {N_HVG:,} train HVGs; expressed genes + depth tokens T (`t4`) and S "
            "(total over the list), 100 value bins",
            "read-depth-aware masked autoencoding (MSE)",
        ),
    }
    for family in FAMILIES:
        t = TRAIN[family]
        pre = args.pretrain_epochs or t["pretrain_epochs"]
        ft = args.finetune_epochs or t["finetune_epochs"]
        lines.append(
            f"| {family} | {desc[family][0]} | {desc[family][1]} | {desc[family][2]} | "
            f"{t['batch_size']} | {pre} | {ft} | {t['finetune_lr']:g} |"
        )
    lines += [
        "",
        f"Learning rates: pretraining {PRETRAIN_LR:g} for every family, fine-tuning as listed "
        "(peak, AdamW, linear warm-up then cosine decay; weight decay and warm-up fraction are each class's "
        "defaults). Fine-tuning trains the whole network (`freeze_layers=0`). Times are "
        "training wall-clock in seconds (inference not included); the machine was shared, so "
        "they are indicative only.",
        "",
        "How the settings were chosen (validation cells only: `--dev` and the same runs with "
        "other learning rates or epochs; macro-F1 of random-init fine-tunes unless said "
        "otherwise). scGPT reading all genes of CellBench (a random 511 of a cell's 4,100-8,700 "
        "expressed genes, 5th-95th percentile, per epoch) predicted one class on the "
        "CEL-seq2 -> Drop-seq validation cells (macro-F1 0.201) at lr 1e-4, 3e-4 and 1e-3 (10 "
        "epochs; at 1e-3 also after pretraining), so scGPT reads the train HVGs, as the official "
        "scGPT recipes select HVGs; with 500 genes no cell is truncated. On the pbmc68k_reduced "
        "validation cells (343 training / 147 validation): scBERT 5 epochs at lr 1e-4 0.317, "
        "3e-4 0.583 (10 epochs: 0.654), 1e-3 one class predicted (0.024, with 1,000 HVGs); "
        "Geneformer 20 epochs at lr 3e-4 0.308, 1e-3 0.425 (10 epochs: 0.375); scFoundation 10 "
        "epochs at lr 3e-4 0.501, 1e-3 0.667; scGPT 10 epochs at lr 1e-3 0.590 (training loss "
        "still falling, so 20 epochs here).",
        "",
        "## Results",
        "",
        "| split (train / test cells) | method | macro-F1 | accuracy | pretrain (s) | "
        "fine-tune (s) | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, rows in results.items():
        for row in rows:
            lines.append(
                f"| {split} ({row['n']}) | {row['method']} | {row['macro_f1']:.3f} | "
                f"{row['accuracy']:.3f} | {_seconds(row.get('pretrain_s'))} | "
                f"{_seconds(row.get('finetune_s'))} | {row.get('note', '')} |"
            )
    lines += ["", "## Macro-F1 at a glance", ""]
    methods = list(dict.fromkeys(r["method"] for rows in results.values() for r in rows))
    lines += [
        "| method | " + " | ".join(results) + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for method in methods:
        cells = []
        for rows in results.values():
            hit = [r for r in rows if r["method"] == method]
            cells.append(f"{hit[0]['macro_f1']:.3f}" if hit else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## What the numbers show", "", *summary(results)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not (args.dev or args.quick or args.splits or args.models):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "annotation.md").write_text(text)


def summary(results) -> list[str]:
    """Statements computed from the table, then what it does not show."""
    lines = []
    gains, gaps, above_chance = [], [], []
    for split, rows in results.items():
        by = {r["method"]: r for r in rows}
        base = by["logistic regression on train HVGs"]["macro_f1"]
        chance_f1 = by["chance (guess by train class frequencies)"]["macro_f1"]
        parts = []
        for family in FAMILIES:
            pre = by.get(f"{family} pretrain -> fine-tune")
            rnd = by.get(f"{family} random init -> fine-tune")
            if pre and rnd:
                parts.append(f"{family} {pre['macro_f1']:.3f} (random init {rnd['macro_f1']:.3f})")
                gains.append(pre["macro_f1"] - rnd["macro_f1"])
                gaps += [base - pre["macro_f1"], base - rnd["macro_f1"]]
                above_chance += [pre["macro_f1"] - chance_f1, rnd["macro_f1"] - chance_f1]
        lines.append(
            f"- {split}: macro-F1 chance {chance_f1:.3f}, logistic regression {base:.3f}; "
            "pretrain -> fine-tune: " + ", ".join(parts) + "."
        )
    if not gains:
        return lines
    gains, gaps = np.asarray(gains), np.asarray(gaps)
    cellbench_lr = [
        next(r for r in rows if r["method"] == "logistic regression on train HVGs")["macro_f1"]
        for split, rows in results.items()
        if split.startswith("CellBench")
    ]
    n_train = [int(rows[0]["n"].split(" / ")[0]) for rows in results.values()]
    n_test = [int(rows[0]["n"].split(" / ")[1]) for rows in results.values()]
    if cellbench_lr and min(cellbench_lr) == 1.0:
        cellbench_note = "1.000 on every CellBench split"
    elif cellbench_lr:
        cellbench_note = f"at least {min(cellbench_lr):.3f} on the CellBench splits"
    else:
        cellbench_note = "not run on CellBench here"
    lines += [
        "",
        f"Pretrain -> fine-tune minus random init -> fine-tune (macro-F1), over the {len(gains)} "
        f"family x split pairs: {int((gains > 0.02).sum())} above +0.02, "
        f"{int((gains < -0.02).sum())} below -0.02, {int((np.abs(gains) <= 0.02).sum())} within "
        f"0.02 (range {gains.min():+.3f} to {gains.max():+.3f}). The logistic regression is at "
        f"least as good as the fine-tuned transformer in {int((gaps >= 0).sum())} of "
        f"{len(gaps)} fine-tunes (transformer minus logistic regression at best "
        f"{-gaps.min() + 0.0:+.3f} macro-F1). The "
        f"smallest margin of a fine-tuned transformer over chance is {min(above_chance):+.3f}.",
        "",
        "What this does and does not show. Every family goes through the same public path "
        '(`setup_anndata`, `train(mode="pretrain")`, `train(mode="finetune")`, '
        "`predict_celltype` on cells it has never seen, across platforms too), and the "
        "numbers say how well that works for small networks trained here. They say nothing "
        "about the published checkpoints: pretraining a few epochs on the split's "
        f"{min(n_train)}-{max(n_train)} training cells, the same cells the fine-tuning sees, is "
        "not a foundation model: it brings no data that fine-tuning does not see too (the "
        "notes column gives each objective's first- and last-epoch values). The three "
        f"CellBench cell lines are easy (logistic regression macro-F1 {cellbench_note}), so "
        "those splits mainly show that nothing is broken; "
        "pbmc68k_reduced is harder (10 imbalanced types, three of them with 8-19 cells in all, "
        f"765 genes). One seed, one split each, {min(n_test)}-{max(n_test)} test cells: "
        "differences of a few hundredths are within noise. Fine-tuning learning rates and "
        "epochs come from a few validation runs (lr 1e-4 to 1e-3, on training cells of the "
        "pbmc68k_reduced and CellBench splits, never test cells), not from a search per split.",
    ]
    return lines


if __name__ == "__main__":
    main()
