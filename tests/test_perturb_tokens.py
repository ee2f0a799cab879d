from __future__ import annotations

import numpy as np
import pytest

from cellformers.tokenize._perturb import drop_last_gene, perturb_rank_tokens


def _naive(seq, token, mode, n_front, n_back, max_len):
    """One cell, one gene, written the plain way (list operations)."""
    front, genes, back = (
        seq[:n_front],
        list(seq[n_front : len(seq) - n_back]),
        seq[len(seq) - n_back :],
    )
    m = len(genes)
    if token not in genes:
        if mode != "overexpress":
            return list(seq), False
        genes = [token, *genes]
        if n_front + len(genes) + n_back > max_len:
            return front + genes[:-1] + back, True
        return front + genes + back, False
    r = genes.index(token)
    genes.remove(token)
    if mode == "delete":
        return front + genes + back, False
    if mode == "overexpress":
        dest = 0
    elif mode == "activate":
        dest = 0 if 4 * r < m else m // 8
    else:
        dest = m - 1 if 4 * r >= 3 * m else min(7 * m // 8, m - 1)
    genes.insert(dest, token)
    return front + genes + back, False


@pytest.mark.parametrize("mode", ["delete", "overexpress", "activate", "inhibit"])
@pytest.mark.parametrize("specials", [0, 1])
def test_matches_naive_implementation(mode, specials):
    rng = np.random.default_rng(3)
    max_len = 12
    cells = []
    for _ in range(40):
        n_genes = rng.integers(1, max_len - 2 * specials + 1)
        genes = list(rng.choice(np.arange(5, 30), n_genes, replace=False))
        cells.append([2] * specials + genes + [3] * specials)
    lengths = np.array([len(c) for c in cells])
    ids = np.zeros((len(cells), lengths.max()), dtype=np.int64)
    for i, c in enumerate(cells):
        ids[i, : len(c)] = c
    tokens = np.array([5, 11, 17, 29, 40])
    out = perturb_rank_tokens(
        ids, lengths, tokens, mode, n_front=specials, n_back=specials, max_len=max_len
    )
    for i, cell in enumerate(cells):
        for g, token in enumerate(tokens):
            row = i * len(tokens) + g
            expected, overflow = _naive(cell, int(token), mode, specials, specials, max_len)
            got = out.input_ids[row, : out.lengths[row]].tolist()
            assert got == expected, (mode, cell, token)
            assert (out.input_ids[row, out.lengths[row] :] == 0).all()
            assert out.expressed[i, g] == (token in cell[specials : len(cell) - specials])
            assert out.changed[i, g] == (got != cell)
            assert out.overflow[i, g] == overflow


def test_drop_last_gene_keeps_trailing_specials():
    ids = np.array([[2, 7, 8, 9, 3], [2, 7, 3, 0, 0]])
    out, lengths = drop_last_gene(ids, np.array([5, 3]), n_back=1)
    assert out[0, :4].tolist() == [2, 7, 8, 3]
    assert out[1, :2].tolist() == [2, 3]
    assert lengths.tolist() == [4, 2]


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        perturb_rank_tokens(np.zeros((1, 3), dtype=int), np.array([3]), np.array([1]), "swap")
