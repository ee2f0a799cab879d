"""Time Geneformer tokenization: cellformers vs per-cell loops and vs the official pipeline.

Run from the repository root:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tokenize_geneformer.py

With the real Geneformer V1 dictionaries, on real counts, in the V1 setting (top 2048 genes)
and a V2-style setting (``<cls>`` + top 4094 + ``<eos>``, with made-up ``<cls>``/``<eos>`` ids
appended to the V1 dictionary). Two measurements, both in one process, results in
``benchmarks/results/tokenize_geneformer.md``:

1. **Ranking in memory** (counts already loaded, no file I/O, no ``datasets``) on

   * ``cellbench``: CellBench, 450 cells, Ensembl IDs in ``var['ensembl_id']``;
   * ``pbmc68k``: scanpy's ``pbmc68k_reduced`` counts, 700 cells × 765 genes, gene symbols
     matched to Ensembl IDs with :func:`cellformers.genes.match_genes`.

   Timed: ``cellformers`` (:func:`cellformers.tokenize.tokenize_geneformer`, default
   deterministic tie-break, whole dataset in one call, padded ``int64`` output);
   ``cellformers official ties`` (``tie_break="official"``, per-cell argsort); ``reference``
   (``tests/geneformer_reference.py``, the per-cell transcription of the official ranking loop
   used as the test oracle: collapse, chunked normalisation, a row extraction per cell for the
   values and one for the columns, ``np.argsort``, truncation, then padded); ``per-cell loop,
   lean`` (the same per-cell algorithm without the duplicated row extraction and without the
   ID mapping step); ``per-cell argsort alone`` (only the reference's ``np.argsort(-values)``
   calls on rows extracted beforehand: the sorting floor of any implementation that sorts
   every detected gene of every cell; not a tokenizer, so not checked).

2. **File to tokens**: one ``.h5ad`` file on disk (raw counts in ``X``, ``var['ensembl_id']``,
   ``obs['n_counts']``, a label column; written uncompressed by anndata into a temporary
   folder) to the final tokens, on

   * ``cellbench``: the 450 CellBench cells, ``n_counts`` = row sums;
   * ``pbmc68k repeated``: the pbmc68k counts with symbols mapped to Ensembl IDs by
     :func:`cellformers.genes.symbol_to_ensembl` (unknown symbols kept as they are, so outside
     the vocabulary), the 700 cells repeated to ``--cells`` (20,000) so that per-file costs
     do not dominate.

   Timed: ``official pipeline stand-in``
   (``benchmarks/_geneformer_official_pipeline.py``: the official
   ``TranscriptomeTokenizer.tokenize_data`` h5ad path re-created step for step: full read,
   ID-collapse check, chunks of 512 cells, per-cell ``np.argsort`` list comprehension,
   ``datasets.Dataset.from_dict`` + ``.map(format_cell_features)`` with ``nproc=1``; without
   ``save_to_disk``); the same with the map in the main process (``num_proc=1`` before
   ``datasets`` 4.1; since then it starts a one-worker pool); the same with ``backed="r"`` as
   pre-2024 official versions read the file;
   ``cellformers from file`` (``anndata.read_h5ad``, ``match_genes(var['ensembl_id'],
   keep_duplicates=True)``, ``tokenize_geneformer`` on ``X`` with ``obs['n_counts']``;
   padded token arrays) and its ``tie_break="official"`` variant; ``read_h5ad alone``, the
   file read both sides pay. Dictionary loading (the official constructor; our vocabulary
   and median array) is done once, outside the timings, for both.

Every tokenizer output is checked against the reference (1) or the stand-in's dataset (2).
Best of several repeats per implementation after a first run: interleaved across
implementations in (1); back to back per implementation in (2), where the official
pipeline's many small allocations otherwise make the next large allocation pay for
huge-page compaction on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before NumPy/SciPy load OpenMP
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # geneformer_reference.py: the per-cell oracle
sys.path.insert(0, str(ROOT / "benchmarks"))  # _geneformer_official_pipeline.py
RESULTS = ROOT / "benchmarks" / "results"
# The real dictionaries and datasets sit in ../shared/data beside a checkout.
if "CELLFORMERS_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["CELLFORMERS_DATA"] = str(ROOT.parent / "shared" / "data")

import anndata as ad  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from _geneformer_official_pipeline import OfficialPipeline  # noqa: E402
from datasets.fingerprint import Hasher  # noqa: E402
from geneformer_reference import tokenize_reference  # noqa: E402

import cellformers as cf  # noqa: E402
from cellformers.genes import GeneVocab, match_genes, read_gene_dict, symbol_to_ensembl  # noqa: E402
from cellformers.tokenize import tokenize_geneformer  # noqa: E402

SETTINGS = (("V1, 2048", 2048, False), ("V2, 4096", 4096, True))
OFFICIAL = "official pipeline stand-in"
#: The stand-in and its variants, each changing one thing (see _geneformer_official_pipeline).
OFFICIAL_VARIANTS = {
    OFFICIAL: {},
    "official stand-in, map in main process": {"map_in_process": True},
    "official stand-in, backed='r'": {"backed": True},
}
OURS_FILE = "cellformers from file"


# ------------------------------------------------------------------ 1. ranking in memory
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


def memory_benchmark(names: list[str], dictionaries, repeats: int):
    """Rows of the in-memory table and the share of the reference's time spent in argsort."""
    tokens, _, by_id = dictionaries
    cls_id, eos_id = tokens["<cls>"], tokens["<eos>"]
    rows_out, sort_share = [], []
    for dataset in names:
        X, gene_ids, ensembl = load_dataset(dataset, tokens)
        n_counts = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        n_vocab = np.diff(X[:, gene_ids >= 0].tocsr().indptr)
        rows = sorted_rows(X, gene_ids, n_counts, by_id)
        for setting, max_len, special in SETTINGS:
            ids = {"cls_id": cls_id, "eos_id": eos_id} if special else {}
            runs = implementations(X, gene_ids, ensembl, n_counts, rows, dictionaries, max_len, ids)
            outputs = {name: run() for name, run in runs.items()}  # warm-up and results
            best = dict.fromkeys(runs, np.inf)
            for _ in range(repeats):
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
    return rows_out, sort_share


# ----------------------------------------------------------------------- 2. file to tokens
def write_inputs(folder: Path, n_cells: int) -> dict[str, tuple[Path, dict[str, str]]]:
    """The .h5ad files of the file benchmark, each alone in its folder (the official API reads
    every .h5ad of a directory), with the custom attribute each carries through."""

    def write(name: str, adata: ad.AnnData) -> Path:
        path = folder / name / f"{name}.h5ad"
        path.parent.mkdir(parents=True)
        adata.write_h5ad(path)
        return path

    cb = cf.data.cellbench_2platform()
    X = sp.csr_matrix(cb.X)
    obs = pd.DataFrame(
        {
            "cell_line": cb.obs["cell_line"],
            "n_counts": np.asarray(X.sum(axis=1), dtype=np.float64).ravel(),
        },
        index=cb.obs_names,
    )
    var = pd.DataFrame({"ensembl_id": cb.var["ensembl_id"].astype(str)}, index=cb.var_names)
    out = {"cellbench": (write("cellbench", ad.AnnData(X, obs, var)), {"cell_line": "cell_line"})}

    pbmc = cf.data.pbmc68k_reduced_counts()
    symbols = pbmc.var_names.to_numpy(dtype=object)
    ensembl = symbol_to_ensembl(symbols)
    ensembl = np.where(pd.isna(ensembl), symbols, ensembl).astype(str)  # unknown: outside vocab
    # no duplicates, so the official collapse step is only its check (as on most data)
    assert pd.Index(ensembl).is_unique
    rows = np.resize(np.arange(pbmc.n_obs), n_cells)
    X = sp.csr_matrix(pbmc.layers["counts"])[rows]
    obs = pd.DataFrame(
        {
            "bulk_labels": pd.Categorical(pbmc.obs["bulk_labels"].to_numpy()[rows]),
            "n_counts": np.asarray(X.sum(axis=1), dtype=np.float64).ravel(),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"ensembl_id": ensembl}, index=pbmc.var_names)
    out["pbmc68k repeated"] = (
        write("pbmc68k", ad.AnnData(X, obs, var)),
        {"bulk_labels": "cell_type"},
    )
    return out


def cellformers_from_file(path, vocab, by_id, max_len, ids, tie_break="deterministic"):
    """Our path from the file to padded token arrays; labels stay in the returned ``obs``."""
    adata = ad.read_h5ad(path)
    gene_ids = match_genes(adata.var["ensembl_id"], vocab, keep_duplicates=True).token_ids
    tok = tokenize_geneformer(
        adata.X,
        gene_ids,
        by_id,
        n_counts=adata.obs["n_counts"].to_numpy(),
        max_len=max_len,
        tie_break=tie_break,
        **ids,
    )
    return tok, adata.obs


def official_run(pipe: OfficialPipeline, folder: Path, stages: list) -> datasets.Dataset:
    """``pipe.tokenize_data(folder)``, recording the time of its two halves."""
    t0 = time.perf_counter()
    cells, metadata = pipe.tokenize_files(folder)
    t1 = time.perf_counter()
    dataset = pipe.create_dataset(cells, metadata)
    stages.append((t1 - t0, time.perf_counter() - t1))
    return dataset


def check_file_outputs(outputs: dict, custom: dict[str, str]) -> None:
    """Every path gives the stand-in's tokens (empty cells dropped as the official code does)."""
    official = outputs[OFFICIAL]
    flat = np.asarray(official.data.column("input_ids").combine_chunks().flatten())
    lengths = np.asarray(official["length"])
    for name in OFFICIAL_VARIANTS:
        assert outputs[name].column_names == official.column_names, name
        for column in official.column_names:
            assert outputs[name][column][:] == official[column][:], f"{name} differs: {column}"
    for name in (OURS_FILE, f"{OURS_FILE}, official ties"):
        tok, obs = outputs[name]
        keep = tok.n_genes > 0
        assert np.array_equal(tok.lengths[keep], lengths), f"{name}: lengths differ"
        ours = tok.input_ids[keep][~tok.padding_mask[keep]]
        assert np.array_equal(ours, flat), f"{name}: tokens differ"
        for key, column in custom.items():
            assert obs[key].to_numpy()[keep].tolist() == official[column][:], f"{name}: {key}"


def file_implementations(path, official, stages, vocab, by_id, max_len, ids) -> dict:
    """The timed callables of the file benchmark for one file and setting."""

    def run_official(name):
        return lambda: official_run(official[name], path.parent, stages[name])

    return {
        **{name: run_official(name) for name in OFFICIAL_VARIANTS},
        OURS_FILE: lambda: cellformers_from_file(path, vocab, by_id, max_len, ids),
        f"{OURS_FILE}, official ties": lambda: cellformers_from_file(
            path, vocab, by_id, max_len, ids, tie_break="official"
        ),
        "read_h5ad alone": lambda: ad.read_h5ad(path),
    }


def fingerprint_seconds(pipe: OfficialPipeline) -> float:
    """Time ``datasets`` takes to hash the tokenizer object (done for every ``.map``)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        Hasher.hash(pipe)
        times.append(time.perf_counter() - start)
    return min(times)


def file_benchmark(inputs, dictionaries, repeats: int):
    """Rows of the file table and notes on where the stand-in's time goes."""
    tokens_v1, tokens_v2, medians, by_id = dictionaries
    vocab = GeneVocab(dict(tokens_v1), pad_token="<pad>", cls_token=None)
    rows_out, notes = [], []
    for dataset, (path, custom) in inputs.items():
        n_cells = ad.read_h5ad(path, backed="r").n_obs
        for setting, max_len, special in SETTINGS:
            ids = {"cls_id": tokens_v2["<cls>"], "eos_id": tokens_v2["<eos>"]} if special else {}
            official = {
                name: OfficialPipeline(
                    tokens_v2 if special else tokens_v1,
                    medians,
                    custom_attr_name_dict=custom,
                    model_input_size=max_len,
                    special_token=special,
                    **variant,
                )
                for name, variant in OFFICIAL_VARIANTS.items()
            }
            stages: dict[str, list] = {name: [] for name in OFFICIAL_VARIANTS}
            runs = file_implementations(path, official, stages, vocab, by_id, max_len, ids)
            # Each implementation's runs back to back (first run: the output that is checked):
            # interleaved, every large allocation after the official pipeline's many small
            # ones pays for huge-page compaction here, charged to whoever runs next.
            outputs, first, best = {}, {}, {}
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run()
                first[name] = time.perf_counter() - start
                best[name] = np.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
            check_file_outputs(outputs, custom)
            n_vocab = int(np.median(outputs[OURS_FILE][0].n_genes))
            del outputs
            fastest = min(best[name] for name in OFFICIAL_VARIANTS)
            split = {name: min(stages[name][1:], key=sum) for name in OFFICIAL_VARIANTS}
            in_process = "official stand-in, map in main process"
            notes.append(
                f"{dataset}, {setting}: read_h5ad {best['read_h5ad alone'] * 1e3:.0f} ms; "
                f"`tokenize_files` (read, collapse check, per-cell ranking) "
                f"{split[OFFICIAL][0] * 1e3:.0f} ms; `create_dataset` "
                f"{split[OFFICIAL][1] * 1e3:.0f} ms with the one-worker pool, "
                f"{split[in_process][1] * 1e3:.0f} ms in the main process, each including "
                f"about {fingerprint_seconds(official[OFFICIAL]) * 1e3:.0f} ms to hash the "
                "tokenizer object (timed on its own)"
            )
            for name, seconds in best.items():
                rows_out.append(
                    {
                        "dataset": f"{dataset} ({n_cells:,} cells, median {n_vocab} "
                        "vocabulary genes)",
                        "setting": setting,
                        "implementation": name,
                        "ms": seconds * 1e3,
                        "first ms": first[name] * 1e3,
                        "cells/s": n_cells / seconds,
                        "vs official": best[OFFICIAL] / seconds,
                        "vs fastest": fastest / seconds,
                    }
                )
                print(rows_out[-1])
    return rows_out, notes


# ----------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cellbench", "pbmc68k"])
    parser.add_argument("--repeats", type=int, default=7, help="in-memory benchmark")
    parser.add_argument("--file-repeats", type=int, default=3, help="file benchmark")
    parser.add_argument("--cells", type=int, default=20_000, help="pbmc68k cells in the file")
    args = parser.parse_args()
    datasets.disable_progress_bars()

    tokens, medians, by_id = load_dictionaries()
    tokens_v1 = {k: v for k, v in tokens.items() if k not in ("<cls>", "<eos>")}
    mem_rows, sort_share = memory_benchmark(args.datasets, (tokens, medians, by_id), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp), args.cells)
        file_rows, notes = file_benchmark(
            inputs, (tokens_v1, tokens, medians, by_id), args.file_repeats
        )
    write_results(args, mem_rows, sort_share, file_rows, notes)


def goal_verdict(file_rows, mem_rows) -> str:
    """The 20x paragraph, from the cellformers rows of both benchmarks."""
    mem = [r["speed-up"] for r in mem_rows if r["implementation"] == "cellformers"]
    ours = [r for r in file_rows if r["implementation"] == OURS_FILE]
    listing = "; ".join(
        f"{r['dataset'].split(' (')[0]}, {r['setting']}: {r['vs official']:.1f}x "
        f"({r['vs fastest']:.1f}x)"
        for r in ours
    )
    below = [r for r in ours if r["vs official"] < 20]
    below_fastest = [r for r in ours if r["vs fastest"] < 20]
    if not below_fastest:
        verdict = (
            "**met on every dataset and setting measured**, against the stand-in as run with "
            "the installed libraries and against its fastest variant"
        )
    elif not below:
        verdict = (
            "**met against the stand-in as run with the installed libraries, but not on every "
            "dataset and setting against its fastest variant**"
        )
    elif len(below) == len(ours):
        verdict = "**not met on any dataset or setting measured**"
    else:
        verdict = (
            f"**met on {len(ours) - len(below)} of the {len(ours)} dataset/setting pairs "
            "measured, not on the others**"
        )
    return (
        "The goal is at least 20x the official tokenizer's cells/s on the same data. The "
        "official package cannot be installed here; the closest measurable stand-in is "
        f"section 2's `{OFFICIAL}`, our step-for-step re-creation of its `tokenize_data` "
        "h5ad path, file to final tokens, run with the installed `datasets`. cellformers "
        "(file to token arrays) against it, and in parentheses against the fastest of its "
        f"variants: {listing}. So the 20x goal is {verdict}. These are ratios against a "
        "re-creation, not against the official package itself. Section 1's ratios are a "
        "different comparison: the ranking step alone, in memory, against per-cell loops "
        "that skip the rest of the official pipeline (file read, per-gene dictionary "
        "look-ups, a second CSR conversion, the `datasets` build and `map`); they are not "
        "ratios against the official tokenizer. There cellformers is "
        f"{min(mem):.1f}x to {max(mem):.1f}x the reference's cells/s (the per-cell "
        "transcription of the official ranking loop)"
        + ("; the ranking step alone does not reach 20x either." if max(mem) < 20 else ".")
    )


def write_results(args, mem_rows, sort_share, file_rows, notes) -> None:
    versions = ", ".join(
        f"{p} {version(p)}" for p in ("numpy", "scipy", "pandas", "anndata", "h5py", "datasets")
    )
    lines = [
        "# Geneformer tokenization: cellformers vs per-cell loops and the official pipeline",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"Python {platform.python_version()}, {versions}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; all computation single-threaded. "
        "Real Geneformer V1 dictionaries (V2 setting: `<cls>`/`<eos>` ids appended). Each "
        f"time is the best of {args.repeats} (section 1) or {args.file_repeats} (section 2) "
        "repeats after a first run, all in one process, so the ratios within a table come "
        "from the same conditions. Produced by `benchmarks/tokenize_geneformer.py`.",
        "",
        "## Summary: the 20x goal",
        "",
        goal_verdict(file_rows, mem_rows),
        "",
        "## 1. Ranking in memory: cellformers vs per-cell loops",
        "",
        "No file I/O and no `datasets`: counts already in memory, output padded `int64` "
        "arrays. Every output equals the reference's token for token (on these data the real "
        "medians give no exactly tied values among the kept genes, so the deterministic "
        "tie-break agrees too). The reference is `tests/geneformer_reference.py`, the test "
        "oracle that mirrors the official per-cell ranking work (it extracts each row twice, "
        "as the official code does); the lean loop is the same per-cell algorithm without "
        "that duplication and without the ID mapping step. Column *vs reference* = reference "
        "time / this row's time; *vs lean loop* = lean-loop time / this row's time. Repeats "
        "interleaved across implementations.",
        "",
        "| dataset | setting | implementation | time (ms) | cells/s | vs reference | vs lean loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mem_rows:
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
        "",
        "## 2. File to tokens: cellformers vs the official pipeline stand-in",
        "",
        "One `.h5ad` file on disk (raw counts in `X` as CSR float32, `var['ensembl_id']`, "
        "`obs['n_counts']` as float64, one label column; written uncompressed by anndata) to "
        "the final tokens.",
        "",
        f"* `{OFFICIAL}` is `benchmarks/_geneformer_official_pipeline.py`, which re-creates the "
        "official `TranscriptomeTokenizer.tokenize_data` h5ad path (the version with "
        "`collapse_gene_ids`/`model_version`/`keep_counts`, read from its source) step for "
        "step: `scanpy.read_h5ad` of the whole file (the current official code reads it "
        "fully, not in backed mode), the ID-collapse check with its per-gene list "
        "comprehensions (no duplicate IDs here, so no rebuild), per-gene dictionary look-ups "
        "for the vocabulary columns, chunks of 512 cells (`adata[idx, :].X`, column subset, "
        "`/ n_counts * 10_000`, `/ medians`, both the scaled and unscaled matrices converted "
        "to CSR as the official code does), `np.argsort` per cell in a list comprehension, "
        "empty-cell removal, `datasets.Dataset.from_dict` with `input_ids` and the label, then "
        "`.map(format_cell_features, num_proc=1)` (truncation; `<cls>`/`<eos>` by `np.insert` "
        "for V2; `length`). Left out: `save_to_disk` and log/progress output, which would only "
        "slow the official side.",
        "* `official stand-in, map in main process`: the same with `.map(num_proc=None)`. "
        "Since `datasets` 4.1, `num_proc=1` (the official default `nproc=1`) runs the map in "
        "a one-worker process pool, shipping the dataset to the worker and back; before, it "
        "ran in the main process. This variant is the official code under an older "
        "`datasets`.",
        "* `official stand-in, backed='r'`: opens the file with "
        "`anndata.read_h5ad(path, backed='r')` and has no collapse check, as the official "
        "h5ad path did in its 2023 versions; chunks are then read from disk.",
        f"* `{OURS_FILE}`: `anndata.read_h5ad`, `match_genes(var['ensembl_id'], "
        "keep_duplicates=True)` and `tokenize_geneformer` on `X` with `obs['n_counts']`, "
        "giving padded token arrays, lengths and the cells' `obs` (labels included; empty "
        "cells are kept, flagged by `n_genes == 0`), default deterministic tie-break; "
        '`, official ties` with `tie_break="official"`.',
        "* `read_h5ad alone`: reading the file, which every path pays.",
        "",
        "Dictionary loading (the official constructor; our vocabulary and median array) "
        "happens once, outside the timings, for both sides. Checked on every dataset and "
        "setting: the three stand-in variants give the same dataset, and both cellformers "
        "variants give exactly its tokens, lengths and labels (after dropping empty cells, "
        "which the official code removes). The pbmc68k file repeats its 700 cells, so the "
        "per-cell work is that of 700 distinct cells, many times over. Column *vs official "
        f"stand-in* = `{OFFICIAL}` time / this row's time; *vs fastest stand-in* = the "
        "fastest of the three stand-in variants' times / this row's time. Timing: each "
        "implementation runs back to back, a first run (the output checked; column *first "
        f"run*) then {args.file_repeats} timed runs, best kept. Not interleaved: on this "
        "machine (transparent huge pages on `madvise`, which NumPy requests for large "
        "arrays) the first large allocation after the official pipeline's many small ones "
        "can pay several hundred ms of huge-page compaction, which interleaving charges to "
        "whichever implementation runs next; the *first run* column shows such cold costs.",
        "",
        "| dataset | setting | implementation | time (ms) | first run (ms) | cells/s | vs official stand-in | vs fastest stand-in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in file_rows:
        lines.append(
            f"| {r['dataset']} | {r['setting']} | {r['implementation']} | {r['ms']:.1f} | "
            f"{r['first ms']:.0f} | {r['cells/s']:,.0f} | {r['vs official']:.1f}x | "
            f"{r['vs fastest']:.1f}x |"
        )
    lines += [
        "",
        "Where the stand-in's time goes (stage times from its fastest timed run; the "
        "tokenizer-object hash is part of `datasets`' fingerprint of the map function, a "
        "closure over that object, computed on every `.map`): " + "; ".join(notes) + ". "
        "On the 450-cell CellBench file the fixed per-call costs of `create_dataset` "
        "dominate the stand-in's time; the 20,000-cell pbmc68k file shows the per-cell rate.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenize_geneformer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
