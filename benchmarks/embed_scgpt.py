"""Time scGPT cell embedding: cellformers vs the official scGPT code, same weights, same cells.

Run from the repository root (needs ``pip install --no-deps scgpt==0.2.4`` plus a stand-in
``torchtext`` package on the path, as in the tests):

    PYTHONPATH=tests/stubs python benchmarks/embed_scgpt.py

For each dataset a random-weight whole-human-sized scGPT (d_model 512, 12 layers, 8 heads) is
written in the official checkpoint layout, then embedded in separate processes by

* ``cellformers``: ``SCGPT.from_pretrained(folder, adata).get_latent_representation()``;
* ``official pipeline``: ``scgpt.tasks.get_batch_cell_embeddings`` (its DataLoader, binning and
  padding, as ``embed_data`` runs it);
* ``official forward``: the official ``TransformerModel._encode`` alone on pre-tokenized
  batches in the data's cell order padded to each batch's longest cell (tokenization excluded).

It reports cells/s, speed-up ratios, peak resident memory above the process baseline, the
fraction of the machine's dense matmul FLOP/s reached (FLOPs counted on real, unpadded tokens),
and the agreement of the embeddings; it writes ``benchmarks/results/embed_scgpt.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # official_scgpt.py: reference checkpoints
RESULTS = ROOT / "benchmarks" / "results"
D_MODEL, NHEAD, NLAYERS, MAX_LEN, BATCH = 512, 8, 12, 1200, 32

from official_scgpt import load_official, official_folder  # noqa: E402

# Both implementations run under the same OpenMP setting; sleeping (not spinning) idle threads
# avoid per-op stalls on machines with shared vCPUs.
ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
# The small real datasets sit in ../shared/data beside a checkout; CELLFORMERS_DATA overrides.
if "CELLFORMERS_DATA" not in ENV and (ROOT.parent / "shared" / "data").is_dir():
    ENV["CELLFORMERS_DATA"] = str(ROOT.parent / "shared" / "data")
os.environ.update(ENV)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_dataset(name: str):
    import cellformers as cf

    if name == "pbmc68k":
        adata = cf.data.pbmc68k_reduced_counts()
        adata.X = adata.layers["counts"]
        del adata.layers["counts"]
        return adata
    if name == "cellbench":
        return cf.data.cellbench_2platform()
    raise ValueError(name)


def run_one(which: str, dataset: str, folder: Path, out: Path) -> None:
    """Measure one implementation in this (fresh) process and write a JSON record."""
    import torch

    adata = load_dataset(dataset)
    base_rss = _rss_mb()
    if which == "cellformers":
        from cellformers.model import SCGPT

        SCGPT.setup_anndata(adata)
        model = SCGPT.from_pretrained(folder, adata)
        model.get_latent_representation(indices=np.arange(8), batch_size=BATCH)  # warm-up
        start = time.perf_counter()
        emb = model.get_latent_representation(batch_size=BATCH)
        seconds = time.perf_counter() - start
        from cellformers.tokenize import scgpt_sequence_lengths

        lengths = scgpt_sequence_lengths(adata.X, model._tokenizer(adata).gene_ids, MAX_LEN)
    else:
        import warnings

        warnings.filterwarnings("ignore")
        model, vocab, _ = load_official(folder)
        matched = adata[:, adata.var_names.isin(vocab)].copy()
        gene_ids = np.array([vocab[g] for g in matched.var_names])
        if which == "official-pipeline":
            from scgpt.tasks.cell_emb import get_batch_cell_embeddings

            configs = {"pad_token": "<pad>", "pad_value": -2, "embsize": D_MODEL}
            get_batch_cell_embeddings(
                matched[:8],
                model=model,
                vocab=vocab,
                max_length=MAX_LEN,
                batch_size=BATCH,
                model_configs=configs,
                gene_ids=gene_ids,
            )
            start = time.perf_counter()
            emb = get_batch_cell_embeddings(
                matched,
                model=model,
                vocab=vocab,
                max_length=MAX_LEN,
                batch_size=BATCH,
                model_configs=configs,
                gene_ids=gene_ids,
            )
            seconds = time.perf_counter() - start
        else:  # official forward on our tokens, in data order, padded per batch
            import cellformers as cf

            X = matched.X.tocsr()
            tokens = cf.tokenize.tokenize_scgpt(
                X, gene_ids, cls_id=vocab["<cls>"], pad_id=vocab["<pad>"]
            )
            lengths_all = tokens.lengths
            batches = [
                np.arange(i, min(i + BATCH, X.shape[0])) for i in range(0, X.shape[0], BATCH)
            ]

            def forward(idx):
                L = int(lengths_all[idx].max())
                g = torch.as_tensor(tokens.genes[idx, :L])
                v = torch.as_tensor(tokens.values[idx, :L])
                return model._encode(g, v, src_key_padding_mask=g.eq(vocab["<pad>"]))[:, 0]

            with torch.no_grad():
                forward(batches[0][:8])
                start = time.perf_counter()
                emb = torch.cat([forward(idx) for idx in batches]).numpy()
                seconds = time.perf_counter() - start
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        lengths = None
    record = {
        "which": which,
        "dataset": dataset,
        "n_cells": adata.n_obs,
        "seconds": seconds,
        "peak_rss_mb": _rss_mb() - base_rss,
        "lengths": None if lengths is None else lengths.tolist(),
    }
    np.save(out.with_suffix(".npy"), emb)
    out.write_text(json.dumps(record))


def matmul_flops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    n, start = 10, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start)


def model_flops(lengths: np.ndarray) -> float:
    """Forward FLOPs of the encoder over real tokens (matmuls and attention)."""
    d, h = D_MODEL, D_MODEL
    per_token = NLAYERS * (2 * 4 * d * d + 2 * 2 * d * h)
    attention = NLAYERS * 2 * 2 * d * (lengths.astype(float) ** 2)
    return float(per_token * lengths.sum() + attention.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc68k", "cellbench"])
    parser.add_argument(
        "--_one", nargs=3, metavar=("WHICH", "DATASET", "FOLDER"), help=argparse.SUPPRESS
    )
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        run_one(args._one[0], args._one[1], Path(args._one[2]), Path(args._out))
        return

    import torch

    flops_peak = matmul_flops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dataset in args.datasets:
            adata = load_dataset(dataset)
            folder = tmp / f"ckpt_{dataset}"
            official_folder(
                folder, list(adata.var_names), d_model=D_MODEL, nhead=NHEAD, nlayers=NLAYERS
            )
            records = {}
            for which in ("cellformers", "official-pipeline", "official-forward"):
                out = tmp / f"{dataset}_{which}.json"
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--_one",
                        which,
                        dataset,
                        str(folder),
                        "--_out",
                        str(out),
                    ],
                    check=True,
                    env=ENV,
                )
                records[which] = json.loads(out.read_text())
                records[which]["emb"] = np.load(out.with_suffix(".npy"))
            lengths = np.asarray(records["cellformers"]["lengths"])
            flops = model_flops(lengths)
            ours = records["cellformers"]
            diff_pipe = float(np.abs(ours["emb"] - records["official-pipeline"]["emb"]).max())
            diff_fwd = float(np.abs(ours["emb"] - records["official-forward"]["emb"]).max())
            for which, rec in records.items():
                rows.append(
                    {
                        "dataset": f"{dataset} ({rec['n_cells']} cells, median {int(np.median(lengths))} tokens)",
                        "implementation": which,
                        "cells/s": rec["n_cells"] / rec["seconds"],
                        "speed-up of cellformers": rec["seconds"] / ours["seconds"],
                        "peak RSS above baseline (MB)": rec["peak_rss_mb"],
                        "% of matmul FLOP/s": 100 * flops / rec["seconds"] / flops_peak,
                    }
                )
            rows[-3]["max |Δ| vs official"] = f"pipeline {diff_pipe:.1e}, forward {diff_fwd:.1e}"

    lines = [
        "# scGPT cell embedding: cellformers vs official scGPT 0.2.4",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, dense fp32 matmul {flops_peak / 1e9:.0f} GFLOP/s. "
        f"Model: random weights, d_model {D_MODEL}, {NLAYERS} layers, {NHEAD} heads, max_seq_len {MAX_LEN}, "
        f"batch size {BATCH}, float32, CPU, OMP_WAIT_POLICY={ENV['OMP_WAIT_POLICY']} for every run. "
        "Produced by `benchmarks/embed_scgpt.py`.",
        "",
        "The official pipeline bins with random tie-breaking and samples random gene subsets, so its "
        "embeddings differ from ours on real counts with ties; `official-forward` runs the official "
        "network on our tokens, so its difference measures the network alone.",
        "",
        "| dataset | implementation | cells/s | speed-up of cellformers | peak RSS above baseline (MB) | % of matmul FLOP/s | max abs diff vs official |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['implementation']} | {r['cells/s']:.1f} | {r['speed-up of cellformers']:.2f}x | "
            f"{r['peak RSS above baseline (MB)']:.0f} | {r['% of matmul FLOP/s']:.0f} % | {r.get('max |Δ| vs official', '')} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embed_scgpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
