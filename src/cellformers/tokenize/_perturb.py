"""In-silico perturbation: of rank-value token sequences (Geneformer) and of expression matrices.

Both are vectorised over cells and genes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

PerturbMode = Literal["delete", "overexpress", "inhibit", "activate"]
PERTURB_MODES: tuple[str, ...] = ("delete", "overexpress", "inhibit", "activate")


@dataclass(frozen=True)
class RankPerturbation:
    """Perturbed sequences from :func:`perturb_rank_tokens`.

    Attributes
    ----------
    input_ids
        ``int64 [n_cells * n_genes, length]``, right-padded; row ``c * n_genes + g`` is cell ``c``
        with gene ``g`` perturbed.
    lengths
        ``int64 [n_cells * n_genes]`` tokens per perturbed sequence.
    expressed
        ``bool [n_cells, n_genes]``: the gene is among the cell's tokens.
    changed
        ``bool [n_cells, n_genes]``: the perturbed sequence differs from the cell's own (a gene
        that is not expressed cannot be deleted, inhibited or activated).
    overflow
        ``bool [n_cells, n_genes]``: overexpressing a gene absent from a cell of full length
        pushed the cell's last gene out; compare such rows with the cell truncated by one gene
        (:func:`drop_last_gene`), as the official Geneformer code does.

    """

    input_ids: np.ndarray
    lengths: np.ndarray
    expressed: np.ndarray
    changed: np.ndarray
    overflow: np.ndarray


def _gather(input_ids: np.ndarray, src: np.ndarray, tokens: np.ndarray, pad_id: int, lengths):
    """Rows ``input_ids[c][src[c, g]]`` with ``-1`` meaning the perturbed gene's token."""
    n_cells, n_genes, width = src.shape
    rows = np.broadcast_to(np.arange(n_cells)[:, None, None], src.shape)
    out = input_ids[rows, np.clip(src, 0, input_ids.shape[1] - 1)]
    out = np.where(src == -1, tokens[None, :, None], out)
    out[np.arange(width)[None, None, :] >= lengths[:, :, None]] = pad_id
    return out.reshape(n_cells * n_genes, width), lengths.reshape(-1)


def perturb_rank_tokens(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    tokens: np.ndarray,
    mode: PerturbMode,
    *,
    n_front: int = 0,
    n_back: int = 0,
    max_len: int | None = None,
    pad_id: int = 0,
) -> RankPerturbation:
    """Perturb every gene of ``tokens`` in every cell of a rank-value token batch.

    Genes are ordered by decreasing normalised expression between ``n_front`` leading and
    ``n_back`` trailing special tokens (``<cls>``/``<eos>`` for Geneformer V2, none for V1).

    * ``"delete"`` removes the gene's token.
    * ``"overexpress"`` moves the gene to the front (right after the leading specials); a gene
      the cell does not express is inserted there, and a cell already at ``max_len`` loses its
      last gene (``overflow``).
    * ``"activate"`` moves the gene to the middle of the top quartile of the cell's ranks, or to
      the front if it is already in the top quartile.
    * ``"inhibit"`` moves the gene to the middle of the bottom quartile, or to the end if it is
      already in the bottom quartile.

    Parameters
    ----------
    input_ids
        ``[n_cells, length]`` token ids, right-padded with ``pad_id``.
    lengths
        Tokens per cell (specials included).
    tokens
        Token ids of the genes to perturb, one perturbation each.
    mode
        One of ``"delete"``, ``"overexpress"``, ``"inhibit"``, ``"activate"``.
    n_front
        Special tokens before the genes.
    n_back
        Special tokens after the genes.
    max_len
        Maximum sequence length (needed for ``"overexpress"``); defaults to ``input_ids``' width
        plus one.
    pad_id
        Padding token id.

    Returns
    -------
    The perturbed sequences and, per cell and gene, whether the gene was expressed.

    """
    if mode not in PERTURB_MODES:
        raise ValueError(f"mode must be one of {PERTURB_MODES}, got {mode!r}.")
    input_ids = np.asarray(input_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
        raise ValueError("input_ids must be [n_cells, length] with one length per cell.")
    n_cells, width = input_ids.shape
    n_genes = len(tokens)
    positions = np.arange(width)
    gene_region = (positions[None, :] >= n_front) & (
        positions[None, :] < (lengths - n_back)[:, None]
    )
    hits = (input_ids[:, None, :] == tokens[None, :, None]) & gene_region[:, None, :]
    expressed = hits.any(-1)
    pos = np.where(expressed, hits.argmax(-1), -1)  # [cells, genes]
    n = np.broadcast_to(lengths[:, None], (n_cells, n_genes))
    m = n - n_front - n_back  # genes per cell

    if mode == "overexpress":
        max_len = width + 1 if max_len is None else int(max_len)
        width += 1
    j = np.arange(width)[None, None, :]
    dest = pos[..., None]
    p = pos[..., None]
    src = np.broadcast_to(j, (n_cells, n_genes, width)).copy()
    new_len = n.copy()
    overflow = np.zeros((n_cells, n_genes), dtype=bool)

    if mode == "delete":
        src = np.where(expressed[..., None] & (j >= p), j + 1, src)
        new_len = np.where(expressed, n - 1, n)
        changed = expressed
    else:
        if mode == "overexpress":
            dest_r = np.zeros_like(pos)
        elif mode == "activate":
            r = pos - n_front
            dest_r = np.where(4 * r < m, 0, m // 8)
        else:  # inhibit
            r = pos - n_front
            dest_r = np.where(4 * r >= 3 * m, m - 1, np.minimum((7 * m) // 8, m - 1))
        dest = (dest_r + n_front)[..., None]
        move = expressed[..., None]
        up = move & (dest < p) & (j > dest) & (j <= p)
        down = move & (dest > p) & (j >= p) & (j < dest)
        src = np.where(up, j - 1, src)
        src = np.where(down, j + 1, src)
        src = np.where(move & (j == dest), p, src)
        changed = expressed & (dest[..., 0] != pos)
        if mode == "overexpress":
            insert = ~expressed
            overflow = insert & (n + 1 > max_len)
            d = n_front
            shifted = insert[..., None] & (j > d)
            # a full cell keeps its trailing specials in place and drops its last gene
            keep_tail = overflow[..., None] & (j >= (n - n_back)[..., None])
            src = np.where(shifted & ~keep_tail, j - 1, src)
            src = np.where(insert[..., None] & (j == d), -1, src)
            new_len = np.where(insert & ~overflow, n + 1, n)
            changed = changed | insert
    ids, out_len = _gather(input_ids, src, tokens, pad_id, new_len)
    return RankPerturbation(
        input_ids=ids[:, : max(int(out_len.max(initial=1)), 1)],
        lengths=out_len,
        expressed=expressed,
        changed=changed,
        overflow=overflow,
    )


def drop_last_gene(
    input_ids: np.ndarray, lengths: np.ndarray, *, n_back: int = 0, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each cell's lowest-ranked gene (the one before the ``n_back`` trailing specials).

    This is the reference a cell is compared with when overexpressing a gene pushed its last
    gene out of a full-length sequence.

    Parameters
    ----------
    input_ids
        ``[n_cells, length]`` token ids, right-padded with ``pad_id``.
    lengths
        Tokens per cell.
    n_back
        Special tokens after the genes.
    pad_id
        Padding token id.

    Returns
    -------
    The shortened ``input_ids`` and ``lengths``.

    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    j = np.arange(input_ids.shape[1])[None, :]
    cut = (lengths - 1 - n_back)[:, None]
    src = np.where(j >= cut, j + 1, j)
    out = np.take_along_axis(input_ids, np.clip(src, 0, input_ids.shape[1] - 1), axis=1)
    new_len = lengths - 1
    out[j >= new_len[:, None]] = pad_id
    return out, new_len


COUNT_PERTURB_MODES: tuple[str, ...] = ("delete", "knockdown", "overexpress")


def perturb_counts(
    X, columns, mode: str, factor: float | None = None
) -> tuple[sp.csr_matrix, np.ndarray]:
    """In-silico perturbation of genes on the expression matrix itself (any tokenizer).

    * ``"delete"``: the genes' values become 0 (a knockout);
    * ``"knockdown"``: the genes' values are multiplied by ``factor`` (default 0.5);
    * ``"overexpress"``: the genes' values become ``factor`` (default 2) times the cell's
      largest value, so they lead every rank- or bin-based encoding.

    Parameters
    ----------
    X
        Cells × genes (CSR preferred), non-negative.
    columns
        Column positions of the genes to perturb together (e.g. both genes of a combination,
        or several columns of one gene); empty: nothing changes.
    mode
        ``"delete"``, ``"knockdown"`` or ``"overexpress"``.
    factor
        See above.

    Returns
    -------
    The perturbed matrix (CSR, float64, a new object) and a boolean per cell: whether any of
    its values changed.

    """
    if mode not in COUNT_PERTURB_MODES:
        raise ValueError(f"mode must be one of {COUNT_PERTURB_MODES}, got {mode!r}.")
    if factor is None:
        factor = {"delete": 0.0, "knockdown": 0.5, "overexpress": 2.0}[mode]
    factor = float(factor)
    if mode == "delete" and factor != 0.0:
        raise ValueError("mode='delete' takes no factor (the values become 0).")
    if mode == "knockdown" and not 0.0 <= factor < 1.0:
        raise ValueError(f"A knockdown factor must be in [0, 1), got {factor}.")
    if mode == "overexpress" and not factor > 0.0:
        raise ValueError(f"An overexpression factor must be > 0, got {factor}.")
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    n_cells, n_cols = X.shape
    columns = np.unique(np.asarray(columns, dtype=np.int64).reshape(-1))
    if columns.size and (columns.min() < 0 or columns.max() >= n_cols):
        raise IndexError(f"columns out of range for a matrix with {n_cols} columns.")
    target = np.zeros(n_cols, dtype=bool)
    target[columns] = True
    rows = np.repeat(np.arange(n_cells), np.diff(X.indptr))
    hit = target[X.indices] & (X.data != 0)
    changed = np.zeros(n_cells, dtype=bool)
    if mode in ("delete", "knockdown"):
        changed[rows[hit]] = True
        X.data[hit] *= factor
        X.eliminate_zeros()
        return X, changed
    top = np.asarray(X.max(axis=1).todense()).reshape(-1) * factor
    value = np.repeat(top, len(columns))
    cells = np.repeat(np.arange(n_cells), len(columns))
    new = sp.csr_matrix((value, (cells, np.tile(columns, n_cells))), shape=X.shape)
    old = X.multiply(sp.csr_matrix(target.astype(np.float64)[None, :]))
    diff = (new - old).tocsr()
    diff.eliminate_zeros()
    changed[np.repeat(np.arange(n_cells), np.diff(diff.indptr))] = True
    X = (X - old + new).tocsr()
    X.eliminate_zeros()
    return X, changed
