"""scFoundation tokenizer: expressed genes with their values, then the depth tokens T and S.

scFoundation (xTrimoGene) reads a cell as the values of its 19,264 genes followed by two
read-depth tokens: **T**, the target depth, and **S**, ``log10`` of the cell's total count. Its
encoder only sees the non-zero entries. :func:`tokenize_scfoundation` reproduces the official
``get_embedding.py`` preprocessing and ``gatherData`` on whole CSR batches at once:

1. ``main_gene_selection``: each cell is aligned to the model's gene list; columns outside the
   list are dropped and missing genes are zero. When several columns map to the same gene,
   the **first** one is used. All totals below are therefore sums over the model's genes only;
2. the gene values and the T and S tokens are computed in float64 with the official formulas
   (see :func:`tokenize_scfoundation`); the official input tensor is float64 too, because
   the NumPy ``float64`` depth values make ``torch.tensor`` infer that dtype;
3. ``gatherData``: the genes with a value > 0 are kept in ascending position order, followed
   by T and S; the values are then rounded to float32 (the official ``.float()`` before the
   value embedding).

The official script aligns inputs only when they have fewer than 19,264 columns and otherwise
uses the columns by position; here the alignment always goes through ``gene_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from ._panel import panel_columns
from ._utils import as_csr, csr_rows

InputType = Literal["singlecell", "bulk"]
PreNormalized = Literal["F", "T", "A"]

#: Scale of the single-cell normalisation in mode ``"F"`` (counts per 10,000).
TARGET_SUM = 1e4

_N_LISTED = 5
_DEPTH_FORMS = (
    "'tN' (T = N), 'fN' (T = log10(total * N)) or 'aN' (T = S + N) with a number N, e.g. "
    "'t4', 't4.5', 'f1', 'a0.5', or a tuple such as ('t', 4.0)"
)


@dataclass(frozen=True)
class SCFoundationTokens:
    """A padded batch of scFoundation encoder inputs.

    Row ``i`` holds ``lengths[i]`` real tokens: the cell's expressed genes in ascending
    position order, then T, then S; the rest is padding.

    Attributes
    ----------
    values
        ``float32`` ``[n_cells, L]``: gene values, then the T and S values, then 0.
    positions
        ``int64`` ``[n_cells, L]``: the position of each gene in the model's gene list, then
        ``n_genes`` (T), ``n_genes + 1`` (S), then ``n_genes + 2`` at padding.
    lengths
        ``int64`` ``[n_cells]``: number of real tokens, i.e. expressed genes + 2. T sits at
        ``lengths - 2`` and S at ``lengths - 1``.

    """

    values: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    @property
    def padding_mask(self) -> np.ndarray:
        """Boolean ``[n_cells, L]``, `True` at padded positions."""
        return np.arange(self.values.shape[1])[None, :] >= self.lengths[:, None]

    def __len__(self) -> int:
        return self.values.shape[0]


# ----------------------------------------------------------------------------- checks
def _check_n_genes(n_genes: int) -> int:
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(
            f"n_genes must be an integer >= 1 (19,264 for scFoundation), got {n_genes!r}."
        )
    return int(n_genes)


def _check_modes(input_type: str, pre_normalized: str) -> None:
    if input_type not in ("singlecell", "bulk"):
        raise ValueError(f"input_type must be 'singlecell' or 'bulk', got {input_type!r}.")
    allowed = ("F", "T", "A") if input_type == "singlecell" else ("F", "T")
    if pre_normalized not in allowed:
        raise ValueError(
            f"pre_normalized must be one of {', '.join(map(repr, allowed))} for input_type="
            f"{input_type!r}, got {pre_normalized!r}. 'F': raw counts, 'T': normalised + "
            "log1p values"
            + (
                ", 'A': normalised + log1p values with total counts given."
                if input_type == "singlecell"
                else "."
            )
        )


def _parse_target_depth(target_depth) -> tuple[str, float]:
    """``(kind, N)`` of a target depth given as ``"t4"`` or ``("t", 4.0)``."""
    if isinstance(target_depth, str):
        kind, amount = target_depth[:1], target_depth[1:]
    elif isinstance(target_depth, tuple) and len(target_depth) == 2:
        kind, amount = target_depth
    else:
        raise ValueError(f"target_depth must be {_DEPTH_FORMS}; got {target_depth!r}.")
    if isinstance(amount, bool) or kind not in ("t", "f", "a"):
        raise ValueError(f"target_depth must be {_DEPTH_FORMS}; got {target_depth!r}.")
    try:
        value = float(amount)
    except (TypeError, ValueError):
        raise ValueError(f"target_depth must be {_DEPTH_FORMS}; got {target_depth!r}.") from None
    if not np.isfinite(value):
        raise ValueError(f"target_depth needs a finite number N, got {target_depth!r}.")
    if kind == "f" and value <= 0:
        raise ValueError(
            f"target_depth {target_depth!r}: the fold N of 'fN' must be > 0 (T = log10(total * N))."
        )
    return kind, value


def _first_columns(gene_ids, n_cols: int, n_genes: int | None) -> np.ndarray:
    """Gene position of every column with only the first of duplicated positions kept."""
    ids = np.asarray(gene_ids)
    if ids.ndim != 1 or ids.shape[0] != n_cols:
        raise ValueError(
            f"gene_ids must have one entry per column of X ({n_cols}), got shape {ids.shape}. "
            "Pass the position of each column's gene in the model's gene list, -1 where the "
            "gene is not in the list (e.g. `match_genes(names, vocab).token_ids`)."
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"gene_ids must be integers (-1 = not in the gene list), got {ids.dtype}.")
    if n_genes is None:
        n_genes = int(ids.max(initial=-1)) + 1
    return panel_columns(ids.astype(np.int64), max(n_genes, 1))


def _matched(
    X, gene_ids, n_genes: int | None
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Canonical float64 CSR of ``X`` and its stored entries in the model's genes.

    Returns ``(X, rows, positions, values)``; entries are in CSR (row, column) order.
    """
    if np.ndim(X) != 2:
        raise ValueError(f"X must be a 2-D cells × genes matrix, got shape {np.shape(X)}.")
    cols = _first_columns(gene_ids, np.shape(X)[1], n_genes)
    X = as_csr(X)
    pos = cols[X.indices]
    keep = pos >= 0
    return X, csr_rows(X.indptr)[keep], pos[keep], X.data[keep]


def _check_positive_totals(totals: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~(totals > 0))
    if bad.size:
        listed = ", ".join(map(str, bad[:_N_LISTED].tolist()))
        more = ", ..." if bad.size > _N_LISTED else ""
        raise ValueError(
            f"{bad.size} cell(s) have {what} of 0 in the model's genes (rows {listed}{more} of "
            "this batch); their depth token S = log10(total) would be -inf. Remove cells "
            "without counts in the model's genes first, e.g. `sc.pp.filter_cells(adata, "
            "min_counts=1)` on the data restricted to the matched genes."
        )


def _check_total_counts(total_counts, n_cells: int) -> np.ndarray:
    totals = np.asarray(total_counts)
    if totals.ndim == 2 and 1 in totals.shape:
        totals = totals.reshape(-1)
    if totals.shape != (n_cells,):
        raise ValueError(
            f"total_counts must hold one total count per cell ({n_cells}), got shape "
            f"{totals.shape}."
        )
    if not np.issubdtype(totals.dtype, np.number) or np.issubdtype(
        totals.dtype, np.complexfloating
    ):
        raise ValueError(f"total_counts must be real numbers, got dtype {totals.dtype}.")
    totals = totals.astype(np.float64)
    bad = np.flatnonzero(~(np.isfinite(totals) & (totals > 0)))
    if bad.size:
        listed = ", ".join(f"{i} ({totals[i]:g})" for i in bad[:_N_LISTED].tolist())
        raise ValueError(
            f"total_counts must be finite and > 0 (S = log10(total)); {bad.size} cell(s) are "
            f"not, e.g. rows {listed}. Pass each cell's raw total count (e.g. "
            "`adata.obs['total_counts']`) and remove cells without counts."
        )
    return totals


def _check_target_sum(target_sum) -> float:
    if isinstance(target_sum, bool) or not isinstance(target_sum, int | float | np.number):
        raise ValueError(f"bulk_target_sum must be a number > 0, got {target_sum!r}.")
    value = float(target_sum)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"bulk_target_sum must be finite and > 0, got {target_sum!r}.")
    return value


def _median_total(totals: np.ndarray) -> float:
    positive = totals[totals > 0]
    if positive.size == 0:
        raise ValueError(
            "No sample has counts in the model's genes, so there is no median total to scale to."
        )
    return float(np.median(positive))


# ----------------------------------------------------------------------------- assembly
def _assemble(
    rows: np.ndarray,
    pos: np.ndarray,
    values: np.ndarray,
    t_value: np.ndarray,
    s_value: np.ndarray,
    n_cells: int,
    n_genes: int,
) -> SCFoundationTokens:
    """Build the padded arrays: kept genes by ascending position, then T and S, then padding."""
    keep = values > 0  # gatherData runs on the float64 values; `.float()` comes after it
    rows, pos, values = rows[keep], pos[keep], values[keep].astype(np.float32)
    counts = np.bincount(rows, minlength=n_cells).astype(np.int64)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    if ((rows[1:] == rows[:-1]) & (pos[1:] < pos[:-1])).any():
        # the columns are not in gene-list order: sort positions within each row with two
        # linear, stable transpositions (CSR -> CSC -> CSR) of the cells x positions matrix
        by_pos = sp.csr_matrix((values, pos, indptr), shape=(n_cells, n_genes)).tocsc().tocsr()
        pos, values = by_pos.indices.astype(np.int64), by_pos.data
    lengths = counts + 2
    width = int(lengths.max(initial=0))
    out_values = np.zeros((n_cells, width), dtype=np.float32)
    out_pos = np.full((n_cells, width), n_genes + 2, dtype=np.int64)
    flat = np.arange(len(rows), dtype=np.int64) + (rows * width - indptr[:-1][rows])
    out_values.ravel()[flat] = values
    out_pos.ravel()[flat] = pos
    cells = np.arange(n_cells)
    out_values[cells, counts] = t_value.astype(np.float32)
    out_pos[cells, counts] = n_genes
    out_values[cells, counts + 1] = s_value.astype(np.float32)
    out_pos[cells, counts + 1] = n_genes + 1
    return SCFoundationTokens(values=out_values, positions=out_pos, lengths=lengths)


# ----------------------------------------------------------------------------- public
def tokenize_scfoundation(
    X,
    gene_ids: np.ndarray,
    *,
    n_genes: int,
    input_type: InputType = "singlecell",
    pre_normalized: PreNormalized = "F",
    target_depth: str | tuple[str, float] = "t4",
    total_counts: np.ndarray | None = None,
    bulk_target_sum: float | None = None,
) -> SCFoundationTokens:
    """Turn a batch of cells into padded scFoundation encoder inputs.

    Each cell is aligned to the model's gene list (``x_g``: its values in the listed genes, the
    first column winning where several map to one gene) and turned into gene values ``g``, a
    total ``total`` and the depth tokens ``S = log10(total)`` and T, as the official
    ``get_embedding.py`` does.

    ``input_type="singlecell"``:

    * ``pre_normalized="F"`` (raw counts): ``g = log1p(x_g / sum(x_g) * 1e4)``,
      ``total = sum(x_g)``;
    * ``"T"`` (already normalised and log1p-transformed): ``g = x_g``, ``total = sum(x_g)``,
      i.e. the sum of the *log-normalised* values, not a count: an official quirk, kept
      because the published models were used that way;
    * ``"A"`` (normalised + log1p, total counts known): ``g = x_g``,
      ``total = total_counts[i]`` (officially an appended last column).

    T is set by `target_depth`: ``"tN"`` gives ``T = N``, ``"fN"`` gives
    ``T = log10(total * N)`` and ``"aN"`` gives ``T = S + N``.

    ``input_type="bulk"`` (`target_depth` is ignored):

    * ``"F"`` (raw counts): each sample is scaled to `bulk_target_sum` total counts over the
      model's genes and log1p-transformed (the official code runs ``sc.pp.normalize_total``
      with its default median target and ``sc.pp.log1p`` on the matrix *after* aligning it
      to the gene list); ``T = S = log10(sum(g))``;
    * ``"T"`` (already normalised + log1p): ``g = x_g`` and ``T = S = sum(g)``, without log.

    Everything is computed in float64, genes with a value > 0 are kept (``gatherData``), and
    the values are rounded to float32 at the end, as the official code does; they equal the
    official ones up to float32 rounding of sums taken in another order. Unlike
    ``gatherData``, T and S are always kept: the official code drops them when they are <= 0
    (a total <= 1, or a target <= 0), after which its cell embedding reads the wrong tokens.

    Parameters
    ----------
    X
        Cells × genes, sparse (CSR preferred) or dense, finite and non-negative.
    gene_ids
        Position of each column's gene in the model's gene list, ``-1`` for genes not in the
        list.
    n_genes
        Length of the model's gene list (19,264 for the published models).
    input_type
        ``"singlecell"`` or ``"bulk"``.
    pre_normalized
        ``"F"``, ``"T"`` or ``"A"`` (single-cell only), see above.
    target_depth
        Target depth of single-cell inputs: ``"tN"``, ``"fN"`` or ``"aN"`` with any number
        ``N`` (``"t4"``, ``"t4.5"``, ``"f1"``, ``"a0.5"``), or a tuple such as ``("t", 4.0)``.
    total_counts
        Total raw count of each cell, required with ``pre_normalized="A"``.
    bulk_target_sum
        Total each bulk sample is scaled to with ``pre_normalized="F"``. `None` uses the median
        total of the samples in `X`, which is what the official code does with the whole
        dataset; when tokenizing in batches, compute it once over all samples with
        :func:`scfoundation_bulk_target_sum` and pass it, so a sample's tokens do not depend
        on its batch.

    Returns
    -------
    Values, positions and lengths of the padded batch.

    Examples
    --------
    >>> import numpy as np
    >>> import cellformers as cf
    >>> X = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> tokens = cf.tokenize.tokenize_scfoundation(X, np.array([2, 0, -1]), n_genes=3)
    >>> tokens.positions
    array([[0, 3, 4],
           [2, 3, 4]])
    >>> tokens.lengths
    array([3, 3])

    """
    n_genes = _check_n_genes(n_genes)
    _check_modes(input_type, pre_normalized)
    kind, amount = _parse_target_depth(target_depth)
    single = input_type == "singlecell"
    if total_counts is not None and not (single and pre_normalized == "A"):
        raise ValueError(
            "total_counts is only used with input_type='singlecell' and pre_normalized='A'; "
            f"got input_type={input_type!r}, pre_normalized={pre_normalized!r}."
        )
    if single and pre_normalized == "A" and total_counts is None:
        raise ValueError(
            "pre_normalized='A' needs total_counts: the raw total count of every cell (e.g. "
            "`adata.obs['total_counts']`)."
        )
    if bulk_target_sum is not None:
        if single or pre_normalized != "F":
            raise ValueError(
                "bulk_target_sum is only used with input_type='bulk' and pre_normalized='F'."
            )
        bulk_target_sum = _check_target_sum(bulk_target_sum)

    X, rows, pos, x = _matched(X, gene_ids, n_genes)
    n_cells = X.shape[0]
    sums = np.bincount(rows, weights=x, minlength=n_cells)

    if single:
        if pre_normalized == "A":
            totals = _check_total_counts(total_counts, n_cells)
        else:
            _check_positive_totals(sums, "a total" if pre_normalized == "F" else "a sum")
            totals = sums
        values = np.log1p(x / totals[rows] * TARGET_SUM) if pre_normalized == "F" else x
        s_value = np.log10(totals)
        if kind == "t":
            t_value = np.full(n_cells, amount)
        elif kind == "f":
            t_value = np.log10(totals * amount)
        else:
            t_value = s_value + amount
    else:
        _check_positive_totals(sums, "a total")
        if pre_normalized == "F":
            target = _median_total(sums) if bulk_target_sum is None else bulk_target_sum
            # scanpy's normalize_total: x / (total / target), then log1p
            values = np.log1p(x / (sums / target)[rows])
            t_value = np.log10(np.bincount(rows, weights=values, minlength=n_cells))
        else:
            values = x
            t_value = sums
        s_value = t_value
    return _assemble(rows, pos, values, t_value, s_value, n_cells, n_genes)


def scfoundation_sequence_lengths(X, gene_ids: np.ndarray) -> np.ndarray:
    """Count the tokens :func:`tokenize_scfoundation` gives each cell: expressed genes + 2.

    Cheap (no normalisation): use it to bucket cells of similar length into batches. Genes
    count when their value is > 0 and they are in the gene list (the first of several
    columns of one gene), as in the tokenizer.

    Parameters
    ----------
    X
        Cells × genes matrix, finite and non-negative.
    gene_ids
        Position of each column's gene in the model's gene list, ``-1`` for other genes.

    Returns
    -------
    ``int64`` array with one length per cell.

    """
    X, rows, _, _ = _matched(X, gene_ids, None)
    return np.bincount(rows, minlength=X.shape[0]).astype(np.int64) + 2


def scfoundation_bulk_target_sum(X, gene_ids: np.ndarray) -> float:
    """Median total count of the samples over the model's genes: the bulk scaling target.

    The official bulk preprocessing (``input_type="bulk"``, ``pre_normalized="F"``) aligns
    the matrix to the gene list and then scales every sample to the median total of all
    samples (``sc.pp.normalize_total`` without ``target_sum``). Compute it here once over the
    whole dataset and pass it as ``bulk_target_sum`` to :func:`tokenize_scfoundation`.
    Samples without counts in the model's genes are left out of the median.

    Parameters
    ----------
    X
        Samples × genes raw counts, finite and non-negative (all samples of the dataset).
    gene_ids
        Position of each column's gene in the model's gene list, ``-1`` for other genes.

    Returns
    -------
    The median of the positive per-sample totals.

    """
    X, rows, _, x = _matched(X, gene_ids, None)
    return _median_total(np.bincount(rows, weights=x, minlength=X.shape[0]))
