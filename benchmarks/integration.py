"""Batch integration on CellBench: embeddings of four transformer families vs PCA and scVI.

Run from the repository root (about 10 minutes on 2 CPU cores; ``--quick`` for a smoke test of
a few minutes that writes nothing):

    python benchmarks/integration.py

CellBench (450 cells of three lung cancer cell lines, ``cell_line``, measured with CEL-seq2 and
Drop-seq, ``batch``) is embedded in several ways, all without labels:

* ``PCA``: 50 principal components of the log-normalised counts (``normalize_total`` to
  10,000, ``log1p``) of the ``N_HVG`` most variable genes of all cells (unintegrated baseline;
  also the pre-integration embedding of the PCR comparison metric);
* ``scVI``: ``scvi.model.SCVI`` on the raw counts of the same genes with ``batch_key="batch"``,
  default network and training settings (scvi-tools' epoch heuristic), latent mean;
* for each model family (scGPT, Geneformer, scBERT, scFoundation) the network of
  ``benchmarks/annotation.py`` (same sizes and inputs), pretrained from scratch on all 450
  cells with its own masked objective (``train(mode="pretrain")``), embedded with
  ``get_latent_representation()`` (each class's default pooling); the same network with its
  random initial weights is embedded too, as a control.

The embeddings are scored with ``cellformers.tl.evaluate_integration`` (scib-metrics'
``Benchmarker``, its full default metric set, exact neighbours), platform as the batch and
``cell_line`` as the label. The results go to ``benchmarks/results/integration.md`` and the
heatmap of ``cellformers.pl.integration_scores`` to ``benchmarks/results/integration.png``.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import logging  # noqa: E402
import warnings  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402
from annotation import ARCH, FAMILIES, N_HVG, PRETRAIN_LR, TRAIN, build  # noqa: E402

import cellformers as cf  # noqa: E402
from cellformers.genes import read_gene_dict  # noqa: E402

SEED = 0
LABEL = "cell_line"
BATCH = "batch"
N_PCS = 50


def hvgs(adata) -> np.ndarray:
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=N_HVG)
    return norm.var_names[norm.var["highly_variable"].to_numpy()].to_numpy()


def pca(adata, genes) -> np.ndarray:
    norm = adata[:, genes].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=N_PCS, random_state=SEED)
    return norm.obsm["X_pca"]


def scvi_latent(adata, genes, max_epochs: int | None) -> tuple[np.ndarray, float, int]:
    counts = adata[:, genes].copy()
    scvi.model.SCVI.setup_anndata(counts, batch_key=BATCH)
    scvi.settings.seed = SEED
    model = scvi.model.SCVI(counts)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    epochs = len(model.history["elbo_train"])
    return model.get_latent_representation(), seconds, epochs


ADVERSARIAL_WEIGHT = 1.0  # weight of the batch discriminator's cross-entropy (batch_adversarial)


def family_embeddings(family, adata, genes, dicts, epochs) -> tuple[dict, str]:
    """Embeddings of ``family``'s network untrained and pretrained on all cells."""
    out = {}
    gene_key = "ensembl_id"
    # build() sets up a train and a test AnnData; here both are all cells, without labels
    model, _ = build(family, adata, adata.copy(), genes, None, gene_key, dicts)
    model.is_trained_ = True  # embed with the random initial weights
    out[f"{family} untrained"] = model.get_latent_representation()
    model, _ = build(family, adata, adata.copy(), genes, None, gene_key, dicts)
    scvi.settings.seed = SEED
    start = time.perf_counter()
    model.train(
        epochs,
        mode="pretrain",
        lr=PRETRAIN_LR,
        batch_size=TRAIN[family]["batch_size"],
        train_size=1.0,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    loss = model.history["train_loss"].to_numpy(dtype=float)[:, 0]
    out[f"{family} pretrained"] = model.get_latent_representation()
    # the same pretraining with an adversarial batch discriminator on the cell embedding
    model, _ = build(family, adata, adata.copy(), genes, None, gene_key, dicts, batch_key=BATCH)
    scvi.settings.seed = SEED
    model.train(
        epochs,
        mode="pretrain",
        lr=PRETRAIN_LR,
        batch_size=TRAIN[family]["batch_size"],
        train_size=1.0,
        batch_adversarial=ADVERSARIAL_WEIGHT,
        enable_progress_bar=False,
    )
    out[f"{family} pretrained + batch_adversarial"] = model.get_latent_representation()
    note = (
        f"{family}: pretraining {epochs} epochs in {seconds:.0f} s, loss {loss[0]:.3g} (first "
        f"epoch) -> {loss[-1]:.3g} (last); embedding dimension {out[f'{family} pretrained'].shape[1]}."
    )
    print(note, flush=True)
    return out, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, help="override every family's setting")
    parser.add_argument("--scvi-epochs", type=int, help="default: scvi-tools' heuristic")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 pretraining epoch, 20 scVI epochs, 150 cells; writes nothing",
    )
    parser.add_argument("--models", nargs="*", choices=FAMILIES, help="families (default: all)")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.pretrain_epochs = args.pretrain_epochs or 1
        args.scvi_epochs = args.scvi_epochs or 20

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
    adata = cf.data.cellbench_2platform()
    if args.quick:
        adata = adata[np.random.default_rng(SEED).choice(adata.n_obs, 150, replace=False)].copy()
    genes = hvgs(adata)
    notes = []
    reps = {"PCA": pca(adata, genes)}
    latent, seconds, epochs = scvi_latent(adata, genes, args.scvi_epochs)
    reps["scVI"] = latent
    notes.append(f"scVI: {epochs} epochs in {seconds:.0f} s; latent dimension {latent.shape[1]}.")
    print(notes[-1], flush=True)
    for family in args.models or FAMILIES:
        epochs = args.pretrain_epochs or TRAIN[family]["pretrain_epochs"]
        out, note = family_embeddings(family, adata, genes, dicts, epochs)
        reps.update(out)
        notes.append(note)

    for name, emb in reps.items():
        adata.obsm[name] = np.asarray(emb, dtype=np.float32)
    start = time.perf_counter()
    scores = cf.tl.evaluate_integration(
        adata,
        list(reps),
        batch_key=BATCH,
        label_key=LABEL,
        pre_integrated_key="PCA",
        neighbors="exact",
    )
    metric_seconds = time.perf_counter() - start
    total = time.perf_counter() - total
    write_results(scores, reps, notes, metric_seconds, args, total)


def write_results(scores, reps, notes, metric_seconds, args, total_seconds) -> None:
    table = scores.pivot(index="embedding", columns="metric", values="value")
    metrics = list(pd.unique(scores["metric"]))
    table = table.loc[list(reps), metrics]
    category = dict(zip(scores["metric"], scores["category"], strict=False))
    short = {"bio_conservation": "bio", "batch_correction": "batch", "aggregate": "aggregate"}
    lines = [
        "# Batch integration on CellBench (platform as batch, cell line as label)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads (2 vCPUs shared with other jobs), torch {torch.__version__}, scvi-tools "
        f"{version('scvi-tools')}, scib-metrics {version('scib-metrics')}, scanpy "
        f"{version('scanpy')}; CPU, float32, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. "
        f"Whole run {total_seconds / 60:.1f} min (metrics {metric_seconds:.0f} s). Produced by "
        f"`{shlex.join(['python', 'benchmarks/integration.py', *args.argv])}`.",
        "",
        "## Setup",
        "",
        f"- Data: CellBench, 450 cells (CEL-seq2 240, Drop-seq 210), 3 cell lines; the {N_HVG:,} "
        "most variable genes of all cells (`highly_variable_genes` on log-normalised counts, no "
        f"labels) for PCA, scVI, scGPT, scBERT and scFoundation; Geneformer reads all genes "
        f"(rank-value encoding with the published V1 dictionaries). Seed {SEED} "
        "(`scvi.settings.seed` before building and before training each network; untrained and "
        "pretrained networks start from the same weights).",
        f"- PCA: {N_PCS} components of `normalize_total(1e4)` + `log1p`. scVI: "
        '`scvi.model.SCVI(adata)` defaults (10 latent dimensions) with `batch_key="batch"`, '
        "`train()` with scvi-tools' default epochs.",
        "- Transformers: the networks, inputs and pretraining settings of "
        "`benchmarks/annotation.py` (listed in `benchmarks/results/annotation.md`), pretrained "
        f"on all 450 cells (lr {PRETRAIN_LR:g}); default pooling of `get_latent_representation` "
        "(scGPT: `<cls>` state, L2-normalised; Geneformer: mean of the penultimate layer; "
        "scBERT: mean over panel positions; scFoundation: `all`, i.e. [S, T, max, mean] of the "
        "encoder states, 4 x 64 values). None of these objectives sees the batch, except the "
        f"`pretrained + batch_adversarial` rows: the same pretraining with "
        f"`train(..., batch_adversarial={ADVERSARIAL_WEIGHT:g})`, an adversarial platform "
        "discriminator (gradient reversal) on the default cell embedding.",
        '- Metrics: `cf.tl.evaluate_integration(adata, keys, batch_key="batch", '
        'label_key="cell_line", pre_integrated_key="PCA", neighbors="exact")`: scib-metrics\' '
        "full default set, raw values (not min-max scaled across embeddings), higher is better; "
        "aggregates are the means of each category and Total = 0.6 bio + 0.4 batch.",
        "",
        "| network | " + " | ".join(f"{k}" for k in ARCH) + " |",
        "|---" * (len(ARCH) + 1) + "|",
        "| pretraining epochs | "
        + " | ".join(str(args.pretrain_epochs or TRAIN[k]["pretrain_epochs"]) for k in ARCH)
        + " |",
        "",
        "## Scores",
        "",
        "| embedding | " + " | ".join(f"{m} ({short[category[m]]})" for m in metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for name, row in table.iterrows():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.to_numpy()) + " |")
    lines += ["", "## Training", "", *[f"- {n}" for n in notes], ""]
    lines += ["## What the numbers show", "", *summary(table), ""]
    text = "\n".join(lines)
    print(text)
    if not (args.quick or args.models):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "integration.md").write_text(text)
        ax = cf.pl.integration_scores(scores, show=False)
        ax.figure.savefig(RESULTS / "integration.png", dpi=72, bbox_inches="tight")


def summary(table) -> list[str]:
    """Statements computed from the table, then what it does not show."""
    lines = []
    for col in ("Bio conservation", "Batch correction", "Total"):
        order = table[col].sort_values(ascending=False)
        lines.append(
            f"- {col}: " + ", ".join(f"{name} {value:.3f}" for name, value in order.items()) + "."
        )
    pairs = [
        (name.removesuffix(" pretrained"), name, name.replace("pretrained", "untrained"))
        for name in table.index
        if name.endswith(" pretrained") and name.replace("pretrained", "untrained") in table.index
    ]
    if pairs:
        lines.append(
            "- Pretrained minus untrained (same network, same initial weights), bio "
            "conservation / batch correction: "
            + ", ".join(
                f"{family} {table.loc[pre, 'Bio conservation'] - table.loc[unt, 'Bio conservation']:+.3f}"
                f" / {table.loc[pre, 'Batch correction'] - table.loc[unt, 'Batch correction']:+.3f}"
                for family, pre, unt in pairs
            )
            + "."
        )
    ari = table["KMeans ARI"] if "KMeans ARI" in table else None
    if ari is not None:
        lines.append(
            "- KMeans ARI against the cell lines: "
            + ", ".join(f"{name} {value:.3f}" for name, value in ari.items())
            + "."
        )
    lines += [
        "",
        "How to read this. The batch-correction metrics score how well the two platforms mix "
        "within each cell line's neighbourhood; an embedding that separates nothing, neither "
        "platform nor cell line, also mixes the platforms, so a high batch-correction score "
        "means something only next to a high bio-conservation score (KMeans ARI/NMI, "
        "silhouette label). PCR comparison is 0 for PCA by construction (PCA is the "
        "pre-integration reference). scVI is the only integration method here (it is told the "
        "platform); the transformer pretraining objectives never see the batch, so their "
        "embeddings are unintegrated representations, compared with PCA rather than with scVI, "
        "except the `+ batch_adversarial` rows, trained to hide the platform from a "
        "discriminator. The "
        "transformers are small networks pretrained from scratch on these 450 cells for a few "
        "epochs: not foundation models, and nothing here says how the published checkpoints "
        "would score. CellBench has three cell lines and two platforms, 450 cells and one "
        "seed; a harder atlas with many cell types and batches is needed before any ranking "
        "means much.",
    ]
    return lines


if __name__ == "__main__":
    main()
