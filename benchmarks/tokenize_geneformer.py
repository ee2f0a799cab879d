"""Time Geneformer tokenization: cellformers' vectorised tokenizer vs the per-cell reference.

Run from the repository root:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tokenize_geneformer.py

With the real Geneformer V1 dictionaries, on real counts:

* ``cellbench``: CellBench, 450 cells, Ensembl IDs in ``var['ensembl_id']``;
* ``pbmc68k``: scanpy's ``pbmc68k_reduced`` counts, 700 cells × 765 genes, gene symbols mapped
  to Ensembl IDs with :func:`cellformers.genes.match_genes`;

each with the V1 settings (top 2048 genes) and V2-style settings (``<cls>`` + top 4094 +
``<eos>``, with made-up ``<cls>``/``<eos>`` ids appended to the V1 dictionary). Timed:

* ``cellformers``: :func:`cellformers.tokenize.tokenize_geneformer` (default deterministic
  tie-break), whole dataset in one call, padded ``int64`` output;
* ``cellformers official ties``: the same with ``tie_break="official"`` (per-cell argsort);
* ``reference``: ``tests/geneformer_reference.py``, the per-cell transcription of the official
  ``TranscriptomeTokenizer`` used as the test oracle (collapse, chunked normalisation, a row
  extraction per cell for the values and one for the columns as the official code does,
  ``np.argsort``, truncation), then padded into the same array;
* ``per-cell loop, lean``: the same per-cell algorithm without the duplicated row extraction
  and without the ID mapping step: the fastest straightforward per-cell loop;
* ``per-cell argsort alone``: only the reference's ``np.argsort(-values)`` calls, on rows
  extracted beforehand: the sorting floor of any implementation that sorts every detected
  gene of every cell (not a full tokenizer, so not checked).

Every run is checked against the reference. Best of several interleaved repeats in one
process; results go to ``benchmarks/results/tokenize_geneformer.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # geneformer_reference.py: the per-cell oracle
RESULTS = ROOT / "benchmarks" / "results"
# The real dictionaries and datasets sit in ../shared/data beside a checkout.
if "CELLFORMERS_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["CELLFORMERS_DATA"] = str(ROOT.parent / "shared" / "data")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from geneformer_reference import tokenize_reference  # noqa: E402

import cellformers as cf  # noqa: E402
from cellformers.genes import GeneVocab, match_genes, read_gene_dict  # noqa: E402
from cellformers.tokenize import tokenize_geneformer  # noqa: E402


def load_dictionaries():
    paths = cf.data.geneformer_v1_dictionaries()
    tokens = read_gene_dict(paths["token_dictionary"])
    medians = read_gene_dict(paths["gene_median_dictionary"])
    tokens_v2 = {**tokens, "<cls>": len(tokens), "<eos>": len(tokens) + 1}
    by_id = np.full(len(tokens_v2), np.nan)
    for gene, median in medians.items():
        by_id[tokens[gene]] = median
    return tokens_v2, medians, by_id


def load_dataset(name: str, tokens: dict) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Counts (CSR), token id and Ensembl ID of every column."""
    vocab = GeneVocab({k: v for k, v in tokens.items()}, pad_token="<pad>", cls_token=None)
    if name == "cellbench":
        adata = cf.data.cellbench_2platform()
        ensembl = adata.var["ensembl_id"].astype(str).to_numpy()
        X = sp.csr_matrix(adata.X)
    elif name == "pbmc68k":
        adata = cf.data.pbmc68k_reduced_counts()
        X = sp.csr_matrix(adata.layers["counts"])
        ensembl = None
    else:
        raise ValueError(name)
    gene_ids = match_genes(
        adata.var_names if ensembl is None else ensembl, vocab, keep_duplicates=True
    ).token_ids
    if ensembl is None:  # the Ensembl IDs the symbols were matched to
        ensembl = np.array(
            [vocab.tokens[t] if t >= 0 else f"UNMATCHED{j}" for j, t in enumerate(gene_ids)]
        )
    return X, gene_ids, ensembl


def lean_loop(X, gene_ids, n_counts, medians_by_id, max_len, cls_id=None, eos_id=None):
    """The per-cell algorithm without the official code's repeated row extraction."""
    loc = np.flatnonzero(gene_ids >= 0)
    tokens = gene_ids[loc]
    X_norm = sp.csr_matrix(X[:, loc] / n_counts[:, None] * 10_000 / medians_by_id[tokens])
    rows = []
    for i in range(X_norm.shape[0]):
        start, stop = X_norm.indptr[i], X_norm.indptr[i + 1]
        ids = tokens[X_norm.indices[start:stop]][np.argsort(-X_norm.data[start:stop])]
        if cls_id is None:
            rows.append(ids[:max_len])
        else:
            rows.append(np.concatenate([[cls_id], ids[: max_len - 2], [eos_id]]))
    return rows


def sorted_rows(X, gene_ids, n_counts, medians_by_id):
    """The normalised rows of the vocabulary genes, extracted for the argsort-only timing."""
    loc = np.flatnonzero(gene_ids >= 0)
    X_norm = sp.csr_matrix(X[:, loc] / n_counts[:, None] * 10_000 / medians_by_id[gene_ids[loc]])
    return [X_norm.data[X_norm.indptr[i] : X_norm.indptr[i + 1]] for i in range(X.shape[0])]


def pad(rows: list[np.ndarray], pad_id: int = 0) -> np.ndarray:
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def implementations(X, gene_ids, ensembl, n_counts, rows, dictionaries, max_len, ids) -> dict:
    """The timed callables for one dataset and setting; each returns padded token ids."""
    tokens, medians, by_id = dictionaries
    return {
        "cellformers": lambda: (
            tokenize_geneformer(
                X, gene_ids, by_id, n_counts=n_counts, max_len=max_len, **ids
            ).input_ids
        ),
        "cellformers official ties": lambda: (
            tokenize_geneformer(
                X, gene_ids, by_id, n_counts=n_counts, max_len=max_len, tie_break="official", **ids
            ).input_ids
        ),
        "reference (official per-cell work)": lambda: pad(
            tokenize_reference(
                X,
                ensembl,
                n_counts,
                tokens,
                medians,
                model_input_size=max_len,
                special_token=bool(ids),
            )
        ),
        "per-cell loop, lean": lambda: pad(lean_loop(X, gene_ids, n_counts, by_id, max_len, **ids)),
        "per-cell argsort alone": lambda: [np.argsort(-r) for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cellbench", "pbmc68k"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    tokens, medians, by_id = load_dictionaries()
    cls_id, eos_id = tokens["<cls>"], tokens["<eos>"]
    rows_out, sort_share = [], []
    for dataset in args.datasets:
        X, gene_ids, ensembl = load_dataset(dataset, tokens)
        n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        n_vocab = np.diff(X[:, gene_ids >= 0].tocsr().indptr)
        rows = sorted_rows(X, gene_ids, n_counts, by_id)
        for setting, max_len, special in (("V1, 2048", 2048, False), ("V2, 4096", 4096, True)):
            ids = {"cls_id": cls_id, "eos_id": eos_id} if special else {}
            runs = implementations(
                X, gene_ids, ensembl, n_counts, rows, (tokens, medians, by_id), max_len, ids
            )
            outputs = {name: run() for name, run in runs.items()}  # warm-up and results
            best = dict.fromkeys(runs, np.inf)
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
            reference = outputs["reference (official per-cell work)"]
            for name in ("cellformers", "cellformers official ties", "per-cell loop, lean"):
                assert np.array_equal(outputs[name], reference), f"{name} differs"
            sort_share.append(
                f"{dataset} {setting}: {best['per-cell argsort alone'] * 1e3:.0f} of "
                f"{best['reference (official per-cell work)'] * 1e3:.0f} ms"
            )
            for name, seconds in best.items():
                rows_out.append(
                    {
                        "dataset": f"{dataset} ({X.shape[0]} cells, median "
                        f"{int(np.median(n_vocab))} vocabulary genes)",
                        "setting": setting,
                        "implementation": name,
                        "ms": seconds * 1e3,
                        "cells/s": X.shape[0] / seconds,
                        "speed-up": best["reference (official per-cell work)"] / seconds,
                        "vs lean": best["per-cell loop, lean"] / seconds,
                    }
                )
                print(rows_out[-1])

    lines = [
        "# Geneformer tokenization: cellformers vs the per-cell reference",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python "
        f"{platform.python_version()}, numpy {np.__version__}, scipy {version('scipy')}, "
        f"pandas {version('pandas')}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; all "
        "implementations single-threaded NumPy/SciPy. Real Geneformer V1 "
        "dictionaries (V2 setting: `<cls>`/`<eos>` ids appended). Best of "
        f"{args.repeats} interleaved repeats per implementation, all in one process. Produced "
        "by `benchmarks/tokenize_geneformer.py`.",
        "",
        "Every output equals the reference's token for token (on these data the real medians "
        "give no exactly tied values among the kept genes, so the deterministic tie-break "
        "agrees too). The reference is `tests/geneformer_reference.py`, the test oracle that "
        "mirrors the official `TranscriptomeTokenizer`'s per-cell work (it extracts each row "
        "twice, as the official code does); the lean loop is the same per-cell algorithm "
        "without that duplication and without the ID mapping step.",
        "",
        "| dataset | setting | implementation | time (ms) | cells/s | speed-up of this row vs reference | vs lean loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['dataset']} | {r['setting']} | {r['implementation']} | {r['ms']:.1f} | "
            f"{r['cells/s']:,.0f} | {r['speed-up']:.1f}x | {r['vs lean']:.1f}x |"
        )
    lines += [
        "",
        "Where the time goes. Both sides must order each cell's genes by value. The reference "
        "sorts every detected gene of every cell; its `np.argsort` calls alone take "
        f"{'; '.join(sort_share)}. cellformers encodes each value and token in one int64 key, "
        "keeps per cell only the keys that can be among the first `k + 1` (one linear "
        "histogram pass) and sorts those along padded rows, with no Python loop over cells. "
        "On dense cells (CellBench) sorting dominates both, so the gain is bounded: it is "
        "largest for V1 (2048 of about 5,400 genes kept) and smaller for V2 (4094 kept, nearly "
        "every gene is sorted). On sparse cells (pbmc68k) the reference's per-cell Python and "
        "SciPy row indexing dominate, which the vectorised tokenizer removes. The "
        '`tie_break="official"` path loops over cells with the same argsort as the reference.',
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenize_geneformer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
