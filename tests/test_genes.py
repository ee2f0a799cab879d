from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest

from cellformers.genes import (
    GeneMatch,
    GeneVocab,
    _table,
    ensembl_to_symbol,
    gene_table,
    match_genes,
    strip_ensembl_version,
    symbol_to_ensembl,
)

SPECIALS = ["<pad>", "<cls>", "<eoc>"]


# ----------------------------------------------------------------------------- GeneVocab
@pytest.fixture
def vocab_json(tmp_path):
    genes = [f"GENE{i}" for i in range(30)]
    items = list(zip(genes, range(len(genes)), strict=True))
    np.random.default_rng(0).shuffle(items)  # arbitrary key order, as in scGPT's vocab.json
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(dict(items), indent=2))
    return path, genes


def test_vocab_from_file_sorts_by_id_and_appends_specials(vocab_json):
    path, genes = vocab_json
    vocab = GeneVocab.from_file(path)
    assert vocab.tokens == genes + SPECIALS
    assert len(vocab) == 33
    assert (vocab.pad_id, vocab.cls_id, vocab["<eoc>"]) == (30, 31, 32)
    assert vocab["GENE7"] == 7
    assert "GENE7" in vocab and "NOPE" not in vocab and 7 not in vocab
    # unknown tokens map to <pad>: scGPT's default index
    assert vocab["NOT_A_GENE"] == vocab.pad_id
    np.testing.assert_array_equal(vocab.lookup(["GENE3", "NOPE", "<cls>"]), [3, -1, 31])
    assert vocab.lookup(np.array(["GENE1"], dtype=object)).dtype == np.int64


def test_vocab_keeps_present_specials_and_appends_missing_in_order():
    # <cls> already present: only <pad> and <eoc> are appended, in that order
    vocab = GeneVocab.from_dict({"<cls>": 2, "B": 1, "A": 0})
    assert vocab.tokens == ["A", "B", "<cls>", "<pad>", "<eoc>"]
    assert (vocab.cls_id, vocab.pad_id) == (2, 3)
    vocab = GeneVocab.from_tokens(["A", "B"], specials=["<eoc>", "<pad>", "<cls>"])
    assert vocab.tokens == ["A", "B", "<eoc>", "<pad>", "<cls>"]


def test_vocab_round_trips(vocab_json, tmp_path):
    path, _ = vocab_json
    vocab = GeneVocab.from_file(path)
    assert GeneVocab.from_dict(vocab.to_dict()) == vocab
    assert GeneVocab(vocab.to_dict()) == vocab
    out = tmp_path / "saved.json"
    vocab.save(out)
    assert GeneVocab.from_file(out) == vocab
    assert json.loads(out.read_text()) == vocab.to_dict()
    blob = pickle.dumps(vocab)
    assert pickle.loads(blob) == vocab
    assert len(blob) < 2_000
    assert vocab != GeneVocab.from_tokens(vocab.tokens[:-1], specials=())
    assert "n_tokens=33" in repr(vocab)


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({"A": 0, "B": 2}, "exactly 0..1"),
        ({"A": 0, "B": 0}, "duplicated ids: \\[0\\]"),
        ({"A": -1, "B": 0}, "exactly 0..1"),
        ({"A": 0.0, "B": 1.0}, "integers"),
    ],
)
def test_vocab_rejects_invalid_ids(mapping, match):
    with pytest.raises(ValueError, match=match):
        GeneVocab.from_dict(mapping)


def test_vocab_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="pad_token='<pad>' is not in the vocabulary"):
        GeneVocab({"A": 0, "<cls>": 1})
    vocab = GeneVocab({"A": 0}, pad_token=None, cls_token=None)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab["B"]
    with pytest.raises(ValueError, match="no padding token"):
        _ = vocab.pad_id
    with pytest.raises(ValueError, match="must be unique"):
        GeneVocab.from_tokens(["A", "B", "A"])
    bad = tmp_path / "vocab.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="token: id"):
        GeneVocab.from_file(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        GeneVocab.from_file(bad)


# ----------------------------------------------------------------------------- gene table
def test_gene_table_conversions():
    table = gene_table()
    assert list(table.columns) == ["ensembl_id", "symbol"]
    assert table["ensembl_id"].is_unique
    assert len(table) > 40_000
    np.testing.assert_array_equal(
        ensembl_to_symbol(["ENSG00000141510.17", "ENSG00000141510", "ENSG99999999999", "foo"]),
        np.array(["TP53", "TP53", None, None], dtype=object),
    )
    np.testing.assert_array_equal(
        symbol_to_ensembl(["TP53", "tp53", "NOT_A_GENE"]),
        np.array(["ENSG00000141510", None, None], dtype=object),
    )
    # an ambiguous symbol maps to its lowest Ensembl ID
    ids = table.loc[table["symbol"] == "DNAJC9-AS1", "ensembl_id"]
    assert len(ids) == 2
    assert symbol_to_ensembl(["DNAJC9-AS1"])[0] == min(ids)
    np.testing.assert_array_equal(
        strip_ensembl_version(["ENSG00000141510.17", "ENSMUSG00000059552.8", "TP53", "A.1"]),
        np.array(["ENSG00000141510", "ENSMUSG00000059552", "TP53", "A.1"], dtype=object),
    )


# ----------------------------------------------------------------------------- match_genes
@pytest.fixture
def symbol_vocab(cellbench):
    symbols = cellbench.var["gene_symbol"]
    return GeneVocab.from_tokens(sorted(set(symbols[symbols != ""])))


def test_match_by_symbol(cellbench, symbol_vocab, caplog):
    _table._load_table.cache_clear()
    with caplog.at_level(logging.INFO, logger="cellformers.genes"):
        m = match_genes(cellbench.var_names, symbol_vocab)
    # symbols against symbols: the conversion table is not even loaded
    assert _table._load_table.cache_info().currsize == 0
    assert isinstance(m, GeneMatch)
    assert m.token_ids.dtype == np.int64 and m.token_ids.shape == (cellbench.n_vars,)
    # 14,055 genes have a GENCODE symbol; DNAJC9-AS1-1 (made unique) is not a vocab token
    assert (m.n_genes, m.n_matched, m.n_converted) == (15_073, 14_054, 0)
    assert m.fraction == pytest.approx(14_054 / 15_073)
    assert len(m.unmatched) == 15_073 - 14_054 and "DNAJC9-AS1-1" in m.unmatched
    assert m.duplicated == []
    matched_names = cellbench.var_names[m.matched]
    np.testing.assert_array_equal(m.token_ids[m.matched], symbol_vocab.lookup(matched_names))
    assert (m.token_ids[~m.matched] == -1).all()
    summary = m.summary()
    assert "14,054 of 15,073 genes (93.2%)" in summary and "\n" not in summary
    assert "14,054 of 15,073" in caplog.text


def test_match_by_ensembl_through_table(cellbench, symbol_vocab):
    by_symbol = match_genes(cellbench.var_names, symbol_vocab)
    versioned = cellbench.var["ensembl_id"] + ".3"
    with pytest.warns(UserWarning, match="already taken"):
        m = match_genes(versioned, symbol_vocab)
    # ENSG00000227540 is the second DNAJC9-AS1: same token as an earlier column -> dropped
    assert m.duplicated == ["ENSG00000227540.3"]
    assert m.n_matched == by_symbol.n_matched == m.n_converted
    np.testing.assert_array_equal(m.token_ids, by_symbol.token_ids)
    assert "through the GENCODE v44" in m.summary() and "1 duplicated" in m.summary()

    # the other direction: symbols against a vocabulary of Ensembl IDs
    ens_vocab = GeneVocab.from_tokens(sorted(cellbench.var["ensembl_id"]))
    m = match_genes(cellbench.var_names, ens_vocab)
    assert m.vocab_id_type == "ensembl"
    ok = cellbench.var["symbol_status"].to_numpy() == "gencode_v44_symbol"
    expected = ens_vocab.lookup(cellbench.var["ensembl_id"])
    # un-named genes are Ensembl IDs in var_names: matched directly
    assert (m.token_ids[~ok] == expected[~ok]).all()
    # named genes map to their own ID through the table, except 4 ambiguous symbols (they
    # take the lowest ID: LINC01605, Y_RNA, SNORA72 -> not in the data; DNAJC9-AS1 -> the
    # other DNAJC9-AS1 gene) and the made-unique name DNAJC9-AS1-1
    wrong = cellbench.var_names[ok & (m.token_ids != expected)].tolist()
    assert sorted(wrong) == sorted(["LINC01605", "Y_RNA", "SNORA72", "DNAJC9-AS1", "DNAJC9-AS1-1"])
    assert (m.n_matched, m.n_converted) == (15_069, 14_051)


def test_match_below_threshold_names_unmatched(cellbench, symbol_vocab):
    half = GeneVocab.from_tokens(symbol_vocab.tokens[:-3][::2])
    with pytest.raises(ValueError, match=r"min_coverage=0\.9") as err:
        match_genes(cellbench.var_names, half, min_coverage=0.9)
    msg = str(err.value)
    first_unmatched = match_genes(cellbench.var_names, half, min_coverage=0).unmatched[:10]
    assert all(name in msg for name in first_unmatched)
    assert "gene_key=" in msg and "of 15,073 genes" in msg
    mouse = [f"ENSMUSG{i:011d}" for i in range(20)]
    with pytest.raises(ValueError, match="look like Ensembl IDs"):
        match_genes(mouse, symbol_vocab)


def test_match_duplicates_and_edge_cases(symbol_vocab):
    names = ["TP53", "GAPDH", "TP53", "ENSG00000141510", None, "", "<pad>"]
    with pytest.warns(UserWarning, match="2 gene"):
        m = match_genes(names, symbol_vocab, min_coverage=0)
    assert m.token_ids[0] == symbol_vocab["TP53"] and m.token_ids[1] == symbol_vocab["GAPDH"]
    assert (m.token_ids[2:] == -1).all()
    assert m.duplicated == ["TP53", "ENSG00000141510"]
    assert m.unmatched == ["None", "", "<pad>"]  # specials never match
    assert m.n_matched == 2
    with pytest.raises(ValueError, match="id_type"):
        match_genes(names, symbol_vocab, id_type="entrez")
    with pytest.raises(ValueError, match="No genes"):
        match_genes([], symbol_vocab)
    forced = match_genes(["ENSG00000141510"], symbol_vocab, id_type="symbol", min_coverage=0)
    assert forced.n_matched == 0
