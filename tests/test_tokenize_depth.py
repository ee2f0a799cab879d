from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from cellformers.genes import read_gene_index
from cellformers.tokenize import (
    SCFoundationTokens,
    scfoundation_bulk_target_sum,
    scfoundation_sequence_lengths,
    tokenize_scfoundation,
)

PAD_VALUE = 103  # official pad_token_id


# ----------------------------------------------------------------------------- reference
def _main_gene_selection(X_df: pd.DataFrame, gene_list: list[str]) -> pd.DataFrame:
    """Official get_embedding.py: zero columns for missing genes, then the gene-list order."""
    to_fill = list(set(gene_list) - set(X_df.columns))
    padding = pd.DataFrame(
        np.zeros((X_df.shape[0], len(to_fill))), columns=to_fill, index=X_df.index
    )
    X_df = pd.DataFrame(
        np.concatenate([X_df.values, padding.values], axis=1),
        index=X_df.index,
        columns=list(X_df.columns) + list(padding.columns),
    )
    return X_df[gene_list]


def _gather(data: torch.Tensor, labels: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Official gatherData: the labelled entries in ascending position order, padded."""
    max_num = int(labels.sum(1).max())
    fake_data = torch.full((data.shape[0], max_num), pad_token_id)
    data = torch.hstack([data, fake_data])
    fake_label = torch.full((labels.shape[0], max_num), 1)
    none_labels = ~labels
    labels = labels.float()
    labels[none_labels] = torch.tensor(-float("inf"))
    labels += torch.tensor([(i + 1) * 20000 for i in range(labels.shape[1], 0, -1)])
    labels = torch.hstack([labels, fake_label])
    idx = labels.topk(max_num).indices
    return torch.gather(data, 1, idx)


def _official(
    X,
    columns,
    gene_list,
    *,
    input_type="singlecell",
    pre_normalized="F",
    tgthighres="t4",
    total_counts=None,
):
    """Per-cell re-creation of get_embedding.py's preprocessing and token gathering.

    Returns one (values, positions) pair of 1-d arrays per cell.
    """
    df = pd.DataFrame(X.toarray(), columns=columns)
    df = df.loc[:, ~df.columns.duplicated(keep="first")]  # first column of a repeated gene
    df = _main_gene_selection(df, gene_list)
    if pre_normalized == "A":
        df = df.copy()
        df["total_count"] = np.asarray(total_counts, dtype=np.float64)
    if input_type == "bulk" and pre_normalized == "F":
        adata = sc.AnnData(df)
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
        df = pd.DataFrame(adata.X, index=adata.obs_names, columns=adata.var_names)
    n_pos = len(gene_list) + 2
    out = []
    for i in range(df.shape[0]):
        if input_type == "bulk":
            if pre_normalized == "T":
                totalcount = df.iloc[i, :].sum()
            else:
                totalcount = np.log10(df.iloc[i, :].sum())
            x = torch.tensor([*df.iloc[i, :].tolist(), totalcount, totalcount]).unsqueeze(0)
        else:
            if pre_normalized == "F":
                tmpdata = np.log1p(df.iloc[i, :] / (df.iloc[i, :].sum()) * 1e4).tolist()
            elif pre_normalized == "T":
                tmpdata = df.iloc[i, :].tolist()
            else:
                tmpdata = df.iloc[i, :-1].tolist()
            if pre_normalized == "A":
                totalcount = df.iloc[i, -1]
            else:
                totalcount = df.iloc[i, :].sum()
            n = float(tgthighres[1:])
            if tgthighres[0] == "f":
                depth = [np.log10(totalcount * n), np.log10(totalcount)]
            elif tgthighres[0] == "a":
                depth = [np.log10(totalcount) + n, np.log10(totalcount)]
            else:
                depth = [n, np.log10(totalcount)]
            x = torch.tensor(tmpdata + depth).unsqueeze(0)
        labels = x > 0
        values = _gather(x, labels, PAD_VALUE).float()  # as before token_emb
        positions = _gather(torch.arange(n_pos).unsqueeze(0), labels, PAD_VALUE)
        out.append((values[0].numpy(), positions[0].numpy()))
    return out


def _check_against(tokens: SCFoundationTokens, expected, n_genes: int) -> None:
    assert tokens.values.dtype == np.float32 and tokens.positions.dtype == np.int64
    lengths = np.array([len(v) for v, _ in expected])
    n_differ = 0
    np.testing.assert_array_equal(tokens.lengths, lengths)
    assert tokens.values.shape == tokens.positions.shape == (len(expected), lengths.max())
    for i, (values, positions) in enumerate(expected):
        n = lengths[i]
        np.testing.assert_array_equal(tokens.positions[i, :n], positions)
        np.testing.assert_array_max_ulp(tokens.values[i, :n], values, 1)
        n_differ += int((tokens.values[i, :n] != values).sum())
        assert (tokens.positions[i, n:] == n_genes + 2).all()
        assert (tokens.values[i, n:] == 0).all()
    # float64 sums taken in another order may round differently, but only rarely
    assert n_differ <= lengths.sum() // 1000


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def setting(cellbench_path):
    """CellBench cells, column names, and a shuffled gene list with genes absent from the data.

    The data holds one gene symbol on two columns (DNAJC9-AS1); both map to one position and
    the first column must be used. Cells where the two columns differ are included.
    """
    adata = ad.read_h5ad(cellbench_path)
    symbols = adata.var["gene_symbol"].astype(str).to_numpy()
    columns = np.where(symbols != "", symbols, adata.var["ensembl_id"].astype(str).to_numpy())
    dup = np.flatnonzero(columns == "DNAJC9-AS1")
    assert len(dup) == 2
    rng = np.random.default_rng(0)
    named = np.unique(symbols[symbols != ""])
    genes = set(rng.choice(named, 3000, replace=False).tolist()) | {"DNAJC9-AS1"}
    gene_list = rng.permutation([*sorted(genes), *(f"NOT_IN_DATA_{i}" for i in range(40))])
    gene_list = gene_list.tolist()
    where = {g: i for i, g in enumerate(gene_list)}
    gene_ids = np.array([where.get(c, -1) for c in columns], dtype=np.int64)

    X_all = adata.X.tocsr()
    dense_dup = X_all[:, dup].toarray()
    differ = np.flatnonzero(dense_dup[:, 0] != dense_dup[:, 1])[:6]
    others = rng.choice(np.setdiff1d(np.arange(adata.n_obs), differ), 30, replace=False)
    cells = np.concatenate([differ, others])
    X = X_all[cells]
    lognorm = ad.AnnData(X_all.copy())
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    return {
        "X": X,
        "X_log": lognorm.X[cells].tocsr(),
        "total_counts": adata.obs["total_counts"].to_numpy()[cells],
        "columns": columns,
        "gene_list": gene_list,
        "gene_ids": gene_ids,
        "dup": dup,
    }


# ----------------------------------------------------------------------------- tests
def test_small_example_by_hand():
    # columns: gene 4, unlisted, gene 0, gene 2 (listed in reverse of the gene order)
    X = sp.csr_matrix(np.array([[1.0, 5.0, 3.0, 2.0], [0.0, 7.0, 0.0, 4.0]]))
    tokens = tokenize_scfoundation(X, np.array([4, -1, 0, 2]), n_genes=5, target_depth="f2")
    np.testing.assert_array_equal(tokens.positions, [[0, 2, 4, 5, 6], [2, 5, 6, 7, 7]])
    np.testing.assert_array_equal(tokens.lengths, [5, 3])
    expected = np.array(
        [
            [
                np.log1p(3 / 6 * 1e4),
                np.log1p(2 / 6 * 1e4),
                np.log1p(1 / 6 * 1e4),
                np.log10(12),
                np.log10(6),
            ],
            [np.log1p(1e4), np.log10(8), np.log10(4), 0, 0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(tokens.values, expected)
    np.testing.assert_array_equal(tokens.padding_mask[1], [False, False, False, True, True])
    assert len(tokens) == 2


@pytest.mark.parametrize(
    ("pre_normalized", "target"),
    [("F", "t4"), ("F", "f1"), ("F", "a0.5"), ("F", "t4.5"), ("T", "t4"), ("T", "f2"),
     ("A", "a1"), ("A", "t3")],
)  # fmt: skip
def test_single_cell_matches_official(setting, pre_normalized, target):
    X = setting["X"] if pre_normalized == "F" else setting["X_log"]
    totals = setting["total_counts"] if pre_normalized == "A" else None
    tokens = tokenize_scfoundation(
        X,
        setting["gene_ids"],
        n_genes=len(setting["gene_list"]),
        pre_normalized=pre_normalized,
        target_depth=target,
        total_counts=totals,
    )
    expected = _official(
        X,
        setting["columns"],
        setting["gene_list"],
        pre_normalized=pre_normalized,
        tgthighres=target,
        total_counts=totals,
    )
    _check_against(tokens, expected, len(setting["gene_list"]))
    assert tokens.lengths.min() > 100  # real cells with many expressed listed genes


def test_target_depth_as_tuple(setting):
    kwargs = {"n_genes": len(setting["gene_list"])}
    a = tokenize_scfoundation(setting["X"], setting["gene_ids"], target_depth="a0.5", **kwargs)
    b = tokenize_scfoundation(setting["X"], setting["gene_ids"], target_depth=("a", 0.5), **kwargs)
    np.testing.assert_array_equal(a.values, b.values)
    # T = S + 0.5 for every cell, S = log10 of the total over listed genes
    rows = np.arange(len(a))
    t, s = a.values[rows, a.lengths - 2], a.values[rows, a.lengths - 1]
    listed = setting["gene_ids"] >= 0
    listed[setting["dup"][1]] = False
    total = np.asarray(setting["X"][:, listed].sum(1)).ravel()
    np.testing.assert_allclose(s, np.log10(total), rtol=1e-6)
    np.testing.assert_allclose(t, s + 0.5, rtol=1e-6)


@pytest.mark.parametrize("pre_normalized", ["F", "T"])
def test_bulk_matches_official(setting, pre_normalized):
    X = setting["X"] if pre_normalized == "F" else setting["X_log"]
    n_genes = len(setting["gene_list"])
    tokens = tokenize_scfoundation(
        X, setting["gene_ids"], n_genes=n_genes, input_type="bulk", pre_normalized=pre_normalized
    )
    expected = _official(
        X,
        setting["columns"],
        setting["gene_list"],
        input_type="bulk",
        pre_normalized=pre_normalized,
    )
    _check_against(tokens, expected, n_genes)
    rows = np.arange(len(tokens))
    np.testing.assert_array_equal(
        tokens.values[rows, tokens.lengths - 2], tokens.values[rows, tokens.lengths - 1]
    )


def test_bulk_target_sum_makes_batches_consistent(setting):
    X, ids = setting["X"], setting["gene_ids"]
    n_genes = len(setting["gene_list"])
    target = scfoundation_bulk_target_sum(X, ids)
    listed = ids >= 0
    listed[setting["dup"][1]] = False
    assert target == np.median(np.asarray(X[:, listed].sum(1)).ravel())
    whole = tokenize_scfoundation(X, ids, n_genes=n_genes, input_type="bulk")
    for part in (slice(0, 7), slice(7, None)):
        alone = tokenize_scfoundation(
            X[part], ids, n_genes=n_genes, input_type="bulk", bulk_target_sum=target
        )
        width = alone.values.shape[1]
        np.testing.assert_array_equal(alone.values, whole.values[part, :width])
        np.testing.assert_array_equal(alone.lengths, whole.lengths[part])
    # a different target changes the values, so the argument is used
    other = tokenize_scfoundation(
        X[:7], ids, n_genes=n_genes, input_type="bulk", bulk_target_sum=target * 2
    )
    assert not np.array_equal(other.values, whole.values[:7, : other.values.shape[1]])


def test_first_duplicated_column_wins(setting):
    X, ids = setting["X"], setting["gene_ids"]
    n_genes = len(setting["gene_list"])
    first_only = ids.copy()
    first_only[setting["dup"][1]] = -1
    second_only = ids.copy()
    second_only[setting["dup"][0]] = -1
    tokens = tokenize_scfoundation(X, ids, n_genes=n_genes)
    np.testing.assert_array_equal(
        tokens.values, tokenize_scfoundation(X, first_only, n_genes=n_genes).values
    )
    second = tokenize_scfoundation(X, second_only, n_genes=n_genes)
    assert not np.array_equal(tokens.lengths, second.lengths)


def test_invariant_to_column_order(setting):
    X, ids = setting["X"], setting["gene_ids"].copy()
    ids[setting["dup"][1]] = -1  # with one column per gene, the column order must not matter
    n_genes = len(setting["gene_list"])
    perm = np.random.default_rng(3).permutation(X.shape[1])
    a = tokenize_scfoundation(X, ids, n_genes=n_genes, target_depth="f1")
    b = tokenize_scfoundation(X[:, perm], ids[perm], n_genes=n_genes, target_depth="f1")
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_invariant_to_batch_composition(setting):
    X, ids = setting["X"], setting["gene_ids"]
    n_genes = len(setting["gene_list"])
    batch = tokenize_scfoundation(X, ids, n_genes=n_genes)
    order = np.random.default_rng(4).permutation(X.shape[0])
    shuffled = tokenize_scfoundation(X[order], ids, n_genes=n_genes)
    np.testing.assert_array_equal(shuffled.values, batch.values[order])
    np.testing.assert_array_equal(shuffled.positions, batch.positions[order])
    for i in (0, 5, 17):
        alone = tokenize_scfoundation(X[i], ids, n_genes=n_genes)
        n = alone.lengths[0]
        assert alone.values.shape == (1, n) and n == batch.lengths[i]
        np.testing.assert_array_equal(alone.values[0], batch.values[i, :n])
        np.testing.assert_array_equal(alone.positions[0], batch.positions[i, :n])


def test_dense_and_integer_input(setting):
    X, ids = setting["X"][:5], setting["gene_ids"]
    n_genes = len(setting["gene_list"])
    a = tokenize_scfoundation(X, ids, n_genes=n_genes)
    b = tokenize_scfoundation(X.toarray().astype(np.int64), ids, n_genes=n_genes)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.positions, b.positions)


def test_non_canonical_csr():
    # an explicitly stored zero is not an expressed gene; duplicate entries are summed
    X = sp.csr_matrix(
        (np.array([0.0, 2.0, 1.0, 1.0]), np.array([0, 1, 2, 2]), np.array([0, 4])), shape=(1, 3)
    )
    tokens = tokenize_scfoundation(X, IDS, n_genes=3)
    dense = tokenize_scfoundation(np.array([[0.0, 2.0, 2.0]]), IDS, n_genes=3)
    np.testing.assert_array_equal(tokens.positions, [[1, 2, 3, 4]])
    np.testing.assert_array_equal(tokens.values, dense.values)
    np.testing.assert_array_equal(scfoundation_sequence_lengths(X, IDS), [4])


def test_sequence_lengths(setting):
    X, ids = setting["X"], setting["gene_ids"]
    lengths = scfoundation_sequence_lengths(X, ids)
    tokens = tokenize_scfoundation(X, ids, n_genes=len(setting["gene_list"]))
    np.testing.assert_array_equal(lengths, tokens.lengths)
    listed = ids >= 0
    listed[setting["dup"][1]] = False
    expected = (X[:, listed].toarray() > 0).sum(1) + 2
    np.testing.assert_array_equal(lengths, expected)
    assert lengths.dtype == np.int64


# ----------------------------------------------------------------------------- errors
def _counts():
    return sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0], [5.0, 0.0, 1.0]]))


IDS = np.array([0, 1, 2])


def test_cells_without_counts_are_refused():
    X = _counts().toarray()
    X[[0, 2]] = 0
    X[2, 2] = 9.0  # counts only in a column outside the gene list
    ids = np.array([0, 1, -1])
    for kwargs in ({}, {"pre_normalized": "T"}, {"input_type": "bulk"}):
        with pytest.raises(ValueError, match=r"2 cell\(s\) .* 0 in the model's genes \(rows 0, 2 "):
            tokenize_scfoundation(X, ids, n_genes=3, **kwargs)
    with pytest.raises(ValueError, match="filter_cells"):
        tokenize_scfoundation(X, ids, n_genes=3)


@pytest.mark.parametrize(
    ("bad", "match"), [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")]
)
def test_bad_values_are_refused(bad, match):
    X = _counts().toarray()
    X[1, 0] = bad
    with pytest.raises(ValueError, match=match):
        tokenize_scfoundation(X, IDS, n_genes=3)
    with pytest.raises(ValueError, match=match):
        scfoundation_sequence_lengths(X, IDS)


@pytest.mark.parametrize("target", ["x4", "t", "tfoo", "4", "", 4, ("t",), ("q", 1.0), ("t", True)])
def test_bad_target_depth(target):
    with pytest.raises(ValueError, match=r"target_depth must be 'tN' .*'fN'.*'aN'"):
        tokenize_scfoundation(_counts(), IDS, n_genes=3, target_depth=target)


@pytest.mark.parametrize("target", ["tinf", "fnan", "f0", "f-1"])
def test_bad_target_depth_numbers(target):
    with pytest.raises(ValueError, match="target_depth"):
        tokenize_scfoundation(_counts(), IDS, n_genes=3, target_depth=target)


def test_total_counts_checks():
    X = _counts()
    with pytest.raises(ValueError, match="needs total_counts"):
        tokenize_scfoundation(X, IDS, n_genes=3, pre_normalized="A")
    with pytest.raises(ValueError, match=r"one total count per cell \(3\)"):
        tokenize_scfoundation(X, IDS, n_genes=3, pre_normalized="A", total_counts=[10.0, 20.0])
    for bad in (0.0, -5.0, np.nan):
        with pytest.raises(ValueError, match=r"finite and > 0.*rows 1 "):
            tokenize_scfoundation(
                X, IDS, n_genes=3, pre_normalized="A", total_counts=[10.0, bad, 30.0]
            )
    with pytest.raises(ValueError, match="only used with .*pre_normalized='A'"):
        tokenize_scfoundation(X, IDS, n_genes=3, total_counts=[1.0, 2.0, 3.0])
    tokens = tokenize_scfoundation(
        X, IDS, n_genes=3, pre_normalized="A", total_counts=np.array([[10.0], [100.0], [1e3]])
    )
    np.testing.assert_allclose(tokens.values[np.arange(3), tokens.lengths - 1], [1, 2, 3])


def test_gene_ids_checks():
    X = _counts()
    with pytest.raises(ValueError, match=r"one entry per column of X \(3\)"):
        tokenize_scfoundation(X, np.array([0, 1]), n_genes=3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        tokenize_scfoundation(X, np.array([0, 1, 3]), n_genes=3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        tokenize_scfoundation(X, np.array([0, -2, 1]), n_genes=3)
    with pytest.raises(ValueError, match="must be integers"):
        tokenize_scfoundation(X, np.array([0.0, 1.0, 2.0]), n_genes=3)
    with pytest.raises(ValueError, match="one entry per column"):
        scfoundation_sequence_lengths(X, np.array([0, 1]))


def test_mode_checks():
    X = _counts()
    with pytest.raises(ValueError, match="input_type must be 'singlecell' or 'bulk'"):
        tokenize_scfoundation(X, IDS, n_genes=3, input_type="cells")
    with pytest.raises(ValueError, match="pre_normalized must be one of 'F', 'T' for"):
        tokenize_scfoundation(X, IDS, n_genes=3, input_type="bulk", pre_normalized="A")
    with pytest.raises(ValueError, match="pre_normalized must be one of 'F', 'T', 'A'"):
        tokenize_scfoundation(X, IDS, n_genes=3, pre_normalized="raw")
    with pytest.raises(ValueError, match="n_genes must be an integer >= 1"):
        tokenize_scfoundation(X, IDS, n_genes=0)
    with pytest.raises(ValueError, match="bulk_target_sum is only used"):
        tokenize_scfoundation(X, IDS, n_genes=3, bulk_target_sum=1e4)
    for bad in (0, -1.0, np.inf):
        with pytest.raises(ValueError, match="bulk_target_sum must be"):
            tokenize_scfoundation(X, IDS, n_genes=3, input_type="bulk", bulk_target_sum=bad)
    with pytest.raises(ValueError, match="no median total"):
        scfoundation_bulk_target_sum(np.zeros((2, 3)), IDS)


# ----------------------------------------------------------------------------- gene index
def _write(tmp_path, text: str, name="genes.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_gene_index(tmp_path):
    path = _write(tmp_path, "gene_name\tindex\nA1BG\t0\nA1CF\t1\nNA\t2\nZZZ3\t3\n\n")
    assert read_gene_index(path) == ["A1BG", "A1CF", "NA", "ZZZ3"]
    crlf = _write(tmp_path, "gene_name\tindex\r\nA1BG\t0\r\nA1CF\t1\r\n", "crlf.tsv")
    assert read_gene_index(str(crlf)) == ["A1BG", "A1CF"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ("gene\tindex\nA1BG\t0\n", "header must be 'gene_name<TAB>index'"),
        ("gene_name,index\nA1BG,0\n", "header must be"),
        ("gene_name\tindex\n", "no genes"),
        ("gene_name\tindex\nA1BG\t0\nA1CF\t2\n", r"line 3: .*expected 1 for gene 'A1CF', got '2'"),
        ("gene_name\tindex\nA1BG\t1\nA1CF\t0\n", "expected 0 for gene 'A1BG'"),
        ("gene_name\tindex\nA1BG\t0\nA1CF\n", r"line 3: expected 2 tab-separated fields"),
        ("gene_name\tindex\nA1BG\t0\t7\n", "expected 2 tab-separated fields"),
        ("gene_name\tindex\n\t0\n", "gene name is empty"),
        ("gene_name\tindex\nA1BG\t0\nTP53\t1\nA1BG\t2\n", r"unique; 1 repeated name\(s\), e.g. A1BG"),
    ],
)  # fmt: skip
def test_read_gene_index_malformed(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_gene_index(_write(tmp_path, text))


def test_read_gene_index_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_gene_index(tmp_path / "absent.tsv")
