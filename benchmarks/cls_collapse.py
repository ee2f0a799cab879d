"""Does short from-scratch pretraining collapse scGPT's ``<cls>`` cell embedding?

Run from the repository root (about 10 minutes on 2 shared CPU cores):

    python benchmarks/cls_collapse.py

CellBench (450 cells, three lung cancer cell lines, two platforms) is cut to its most variable
genes (``--n-genes``, chosen on log-normalised counts of all cells, no labels used). A small
scGPT (``d_model`` 32, 2 layers, 4 heads) is built from scratch on these genes with scvi-tools'
seed fixed and embedded with ``get_latent_representation`` (pooling ``"cls"`` and ``"mean"``)

* untrained (random weights);
* after ``--epochs`` epochs of the default pretraining recipe (masked value prediction and MVC,
  ``lr=1e-4``, batch 32, 10 % warm-up, cosine decay);
* after the same pretraining with ``lr=1e-3``.

For each embedding it reports the mean per-dimension standard deviation across cells (the
collapse measure of the issue), the mean cosine similarity between cells, and the macro-F1 of
the cell line on held-out cells (a stratified 30 % split) with kNN (k = 15) and logistic
regression trained on the other 70 %, the latter on the raw embedding (scikit-learn defaults)
and on standardised features (each dimension scaled to unit variance on the training cells).
PCA (50 components of the log-normalised counts of the same genes) is the baseline. Pretraining
sees all cells without labels. The results go to ``benchmarks/results/cls_collapse.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "CELLFORMERS_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["CELLFORMERS_DATA"] = str(ROOT.parent / "shared" / "data")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import scanpy as sc  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import cellformers as cf  # noqa: E402
from cellformers.model import SCGPT  # noqa: E402

LABEL = "cell_line"
SEED = 0
ARCH = {"d_model": 32, "nhead": 4, "d_hid": 32, "nlayers": 2}
RESULTS = ROOT / "benchmarks" / "results" / "cls_collapse.md"


def load(n_genes: int):
    adata = cf.data.cellbench_2platform()
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_genes)
    keep = norm.var["highly_variable"].to_numpy()
    pca = sc.pp.pca(norm[:, keep].X, n_comps=50, random_state=SEED)
    return adata[:, keep].copy(), pca


def scores(emb: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    def f1(clf) -> float:
        return f1_score(y[test], clf.fit(emb[train], y[train]).predict(emb[test]), average="macro")

    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    return {
        "sd": float(emb.std(0).mean()),
        "cos": float(cos[~np.eye(len(emb), dtype=bool)].mean()),
        "knn": f1(KNeighborsClassifier(15)),
        "logreg": f1(LogisticRegression(max_iter=2000)),
        "logreg_std": f1(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-genes", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    start = time.time()
    adata, pca = load(args.n_genes)
    y = adata.obs[LABEL].astype(str).to_numpy()
    train, test = train_test_split(
        np.arange(adata.n_obs), test_size=0.3, stratify=y, random_state=SEED
    )
    SCGPT.setup_anndata(adata)
    rows = [("PCA (log-normalised counts, 50 PCs)", "-", scores(pca, y, train, test), 0.0)]
    for name, lr in (("untrained", None), ("default recipe, lr 1e-4", 1e-4), ("lr 1e-3", 1e-3)):
        scvi.settings.seed = SEED
        model = SCGPT(adata, **ARCH)
        t = time.time()
        if lr is None:
            model.is_trained_ = True  # random weights, embedded as they are
            losses = "-"
        else:
            model.train(max_epochs=args.epochs, lr=lr, train_size=1.0, enable_progress_bar=False)
            h = model.history
            losses = " / ".join(
                f"{float(h[k].to_numpy(dtype=float)[-1, 0]):.0f}"
                for k in ("mlm_mse_train", "mvc_mse_train")
            )
        seconds = time.time() - t
        for pooling in ("cls", "mean"):
            emb = model.get_latent_representation(pooling=pooling)
            rows.append(
                (f"scGPT {name}, pooling {pooling}", losses, scores(emb, y, train, test), seconds)
            )
            print(rows[-1], flush=True)
    write(rows, args, time.time() - start, adata.n_vars)


def write(rows, args, seconds: float, n_genes: int) -> None:
    lines = [
        "# scGPT `<cls>` collapse after short from-scratch pretraining (CellBench)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, scvi-tools {scvi.__version__}; CPU, float32. Whole run "
        f"{seconds / 60:.1f} min. Produced by `python benchmarks/cls_collapse.py "
        f"--n-genes {args.n_genes} --epochs {args.epochs}`.",
        "",
        f"Data: CellBench, 450 cells, 3 cell lines, raw counts on the {n_genes} most variable "
        f"genes. scGPT from scratch: d_model {ARCH['d_model']}, {ARCH['nlayers']} layers, "
        f"{ARCH['nhead']} heads, other arguments at their defaults; pretraining {args.epochs} "
        "epochs on all cells (no labels), batch 32. Held-out: stratified 30 % of the cells "
        "(135), classifiers fit on the other 315. sd: mean over dimensions of the standard "
        "deviation across cells; cos: mean cosine similarity between cells.",
        "",
        "| representation | final MLM / MVC loss | sd | cos | kNN macro-F1 | logreg macro-F1 "
        "| logreg (standardised) macro-F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, losses, s, _ in rows:
        lines.append(
            f"| {name} | {losses} | {s['sd']:.4f} | {s['cos']:.4f} | {s['knn']:.3f} | "
            f"{s['logreg']:.3f} | {s['logreg_std']:.3f} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    sys.exit(main())
