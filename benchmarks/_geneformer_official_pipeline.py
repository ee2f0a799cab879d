"""Stand-in for the official Geneformer ``TranscriptomeTokenizer.tokenize_data`` on .h5ad files.

The official package cannot be installed here, so this module re-creates, in our own code, the
structure and the work of its h5ad path (``geneformer/tokenizer.py``, the version with
``collapse_gene_ids``, ``model_version`` and ``keep_counts``; see
``../shared/specs/geneformer_scfoundation.md`` §1.4), step for step:

``tokenize_data`` -> ``tokenize_files`` (glob the directory for ``*.h5ad``)
-> ``tokenize_anndata``:

1. ``sum_ensembl_ids``: read the whole file into memory (``scanpy.read_h5ad``; the current
   official code does not use backed mode), check the required columns, then the duplicate
   check: the input IDs found in the gene mapping dictionary and their mapped values are listed
   with per-gene Python list comprehensions and their distinct counts compared; without
   duplicates, ``var['ensembl_id_collapsed'] = upper(ensembl_id).map(gene_mapping_dict)``.
   (With duplicates the official code rebuilds the matrix; not reproduced: the benchmark data
   have none, and :meth:`OfficialPipeline.tokenize_anndata` refuses them.)
2. vocabulary columns (``coding_miRNA_loc``), their medians and tokens, by per-gene
   dictionary look-ups; ``filter_pass`` (all cells when absent);
3. per chunk of ``chunk_size`` cells: ``adata[idx].obs['n_counts']``, ``adata[idx, :].X``, the
   column subset, ``X / n_counts * 10_000`` then ``/ medians``, both converted to CSR (the
   official code converts the unscaled matrix too, whether or not ``keep_counts`` is set), and a
   list comprehension calling ``rank_genes`` (``np.argsort(-values)``) on each row, extracting
   the row once for its values and once for its columns;
4. empty cells dropped with their metadata;

-> ``create_dataset``: ``datasets.Dataset.from_dict({'input_ids': ..., **custom attributes})``
and ``.map(format_cell_features, num_proc=nproc)``: truncation to ``model_input_size`` (V1) or
to ``model_input_size - 2`` with ``<cls>``/``<eos>`` inserted by ``np.insert`` (V2), and a
``length`` column. ``format_cell_features`` is a closure over the tokenizer object, so
``datasets`` fingerprints it (and the dictionaries it holds) as in the official code. With
``datasets`` >= 4.1, ``num_proc=1`` runs the map in a one-worker process pool (the dataset is
sent to the worker and back); older versions ran it in the main process, which
``map_in_process=True`` reproduces (``num_proc=None``).

Left out, each only adding time to the official side: ``save_to_disk`` of the result, log and
progress output. ``backed=True`` instead opens the file with ``anndata.read_h5ad(path,
backed="r")`` and skips step 1's collapse check, as the official h5ad path did before
``sum_ensembl_ids`` (2023 versions); chunks are then read from disk by ``adata[idx, :].X``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from datasets import Dataset


def rank_genes(gene_vector: np.ndarray, gene_tokens: np.ndarray) -> np.ndarray:
    """Tokens by descending value, NumPy's default (unstable) argsort as the official code."""
    return gene_tokens[np.argsort(-gene_vector)]


class OfficialPipeline:
    """The official ``TranscriptomeTokenizer``'s h5ad path, from a directory to a ``Dataset``.

    Parameters
    ----------
    token_dict, median_dict
        Ensembl ID (and special tokens) -> token id; Ensembl ID -> gene median.
    gene_mapping_dict
        Ensembl ID -> canonical Ensembl ID; default (``gene_mapping_file=None`` officially):
        identity over the token dictionary.
    custom_attr_name_dict
        ``{obs column: dataset column}`` copied through per cell.
    model_input_size, special_token
        V1: 2048, False; V2: 4096, True.
    backed
        Open the file in backed mode without the collapse check (pre-2024 official code).
    map_in_process
        Run ``.map`` with ``num_proc=None`` (what ``num_proc=1`` did before ``datasets`` 4.1).

    """

    def __init__(
        self,
        token_dict: Mapping[str, int],
        median_dict: Mapping[str, float],
        *,
        gene_mapping_dict: Mapping[str, str] | None = None,
        custom_attr_name_dict: Mapping[str, str] | None = None,
        nproc: int = 1,
        chunk_size: int = 512,
        model_input_size: int = 4096,
        special_token: bool = True,
        backed: bool = False,
        map_in_process: bool = False,
    ):
        self.custom_attr_name_dict = custom_attr_name_dict
        self.nproc = nproc
        self.chunk_size = chunk_size
        self.model_input_size = model_input_size
        self.special_token = special_token
        self.backed = backed
        self.map_in_process = map_in_process
        self.gene_median_dict = dict(median_dict)
        self.gene_token_dict = dict(token_dict)
        if special_token and not {"<cls>", "<eos>"} <= self.gene_token_dict.keys():
            raise ValueError("<cls> and <eos> are required when special_token is set.")
        if gene_mapping_dict is None:
            gene_mapping_dict = {k: k for k in self.gene_token_dict}
        # as the official constructor: keep the mappings whose target is a token
        keys = set(self.gene_token_dict)
        self.gene_mapping_dict = {k: v for k, v in gene_mapping_dict.items() if v in keys}
        self.gene_keys = list(self.gene_token_dict)
        self.genelist_dict = dict.fromkeys(self.gene_keys, True)

    # ------------------------------------------------------------------ official steps
    def tokenize_data(self, data_directory: str | Path) -> Dataset:
        """Tokenize every ``*.h5ad`` of the directory (``save_to_disk`` left out)."""
        cells, metadata = self.tokenize_files(Path(data_directory))
        return self.create_dataset(cells, metadata)

    def tokenize_files(self, data_directory: Path) -> tuple[list, dict | None]:
        cells: list[np.ndarray] = []
        metadata = None
        if self.custom_attr_name_dict is not None:
            metadata = {name: [] for name in self.custom_attr_name_dict.values()}
        found = False
        for path in data_directory.glob("*.h5ad"):
            found = True
            file_cells, file_metadata = self.tokenize_anndata(path)
            cells += file_cells
            if metadata is not None:
                for key, name in self.custom_attr_name_dict.items():
                    metadata[name] += file_metadata[key]
        if not found:
            raise FileNotFoundError(f"No .h5ad files in {data_directory}.")
        return cells, metadata

    def sum_ensembl_ids(self, path: Path) -> ad.AnnData:
        """Read the file and run the duplicate-ID check (the no-duplicate branch)."""
        data = sc.read_h5ad(str(path))
        assert "ensembl_id" in data.var.columns
        assert "ensembl_id_collapsed" not in data.var.columns
        assert "n_counts" in data.obs.columns
        for label in self.custom_attr_name_dict or ():
            assert label in data.obs.columns
        ensembl_ids = data.var.ensembl_id
        in_map = [gene for gene in ensembl_ids if gene in self.gene_mapping_dict.keys()]
        mapped = [self.gene_mapping_dict.get(gene) for gene in in_map]
        if len(set(in_map)) != len(set(mapped)):
            raise NotImplementedError("the official column collapse is not reproduced here")
        data.var["ensembl_id_collapsed"] = data.var.ensembl_id.str.upper().map(
            self.gene_mapping_dict
        )
        return data

    def tokenize_anndata(self, path: Path, target_sum: float = 10_000) -> tuple[list, dict]:
        if self.backed:
            adata = ad.read_h5ad(path, backed="r")
            id_column = "ensembl_id"
        else:
            adata = self.sum_ensembl_ids(path)
            id_column = "ensembl_id_collapsed"
        file_metadata = None
        if self.custom_attr_name_dict is not None:
            file_metadata = {key: [] for key in self.custom_attr_name_dict}

        ids = adata.var[id_column]
        loc = np.where([self.genelist_dict.get(i, False) for i in ids])[0]
        norm_factor_vector = np.array([self.gene_median_dict[i] for i in ids.iloc[loc]])
        gene_tokens = np.array([self.gene_token_dict[i] for i in ids.iloc[loc]])

        if "filter_pass" in adata.obs.columns:
            passing = np.where([i == 1 for i in adata.obs["filter_pass"]])[0]
        else:
            passing = np.array(list(range(adata.shape[0])))

        cells = []
        for start in range(0, len(passing), self.chunk_size):
            idx = passing[start : start + self.chunk_size]
            n_counts = adata[idx].obs["n_counts"].values[:, None]
            X_chunk = adata[idx, :].X
            X_view = X_chunk[:, loc]
            X_norm_unscaled = X_view / n_counts * target_sum
            X_norm = X_norm_unscaled / norm_factor_vector
            X_norm = sp.csr_matrix(X_norm)
            X_norm_unscaled = sp.csr_matrix(X_norm_unscaled)
            cells += [
                rank_genes(X_norm[i].data, gene_tokens[X_norm[i].indices])
                for i in range(X_norm.shape[0])
            ]
            if file_metadata is not None:
                for key in file_metadata:
                    file_metadata[key] += adata[idx].obs[key].tolist()

        empty = [i for i, cell in enumerate(cells) if cell.size == 0]
        for i in sorted(empty, reverse=True):
            del cells[i]
            for values in (file_metadata or {}).values():
                del values[i]
        return cells, file_metadata

    def create_dataset(self, cells: list, metadata: dict | None) -> Dataset:
        dataset_dict = {"input_ids": cells}
        if metadata is not None:
            dataset_dict.update(metadata)
        dataset = Dataset.from_dict(dataset_dict)

        def format_cell_features(example):
            if self.special_token:
                example["input_ids"] = example["input_ids"][0 : self.model_input_size - 2]
                example["input_ids"] = np.insert(
                    example["input_ids"], 0, self.gene_token_dict.get("<cls>")
                )
                example["input_ids"] = np.insert(
                    example["input_ids"],
                    len(example["input_ids"]),
                    self.gene_token_dict.get("<eos>"),
                )
            else:
                example["input_ids"] = example["input_ids"][0 : self.model_input_size]
            example["length"] = len(example["input_ids"])
            return example

        num_proc = None if self.map_in_process else self.nproc
        return dataset.map(format_cell_features, num_proc=num_proc)
