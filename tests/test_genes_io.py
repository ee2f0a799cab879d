"""Safe reading of gene dictionaries, the Geneformer V1 registry entries, shared-token matching."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from cellformers.data import DATASETS, fetch_file, geneformer_v1_dictionaries, is_available
from cellformers.genes import GeneVocab, match_genes, read_gene_dict

V1_KEYS = ("token_dictionary", "gene_median_dictionary", "gene_name_id_dict")


@pytest.fixture(scope="module")
def v1_paths():
    if not all(is_available(f"geneformer_v1_{key}") for key in V1_KEYS):
        pytest.skip("Geneformer V1 dictionaries not found: set CELLFORMERS_DATA")
    return geneformer_v1_dictionaries()


# ----------------------------------------------------------------------------- real files
def test_registry_entries_and_paths(v1_paths):
    assert set(v1_paths) == set(V1_KEYS)
    for key, path in v1_paths.items():
        entry = DATASETS[f"geneformer_v1_{key}"]
        assert path.name == os.path.basename(entry.fname) and path.is_file()
        assert entry.license == "Apache-2.0"
        assert entry.url.startswith("https://huggingface.co/ctheodoris/Geneformer/resolve/main/")
        assert fetch_file(f"geneformer_v1_{key}") == path  # sha256 verified


def test_read_real_token_dictionary(v1_paths):
    tokens = read_gene_dict(v1_paths["token_dictionary"])
    assert len(tokens) == 25_426
    assert list(tokens.items())[:2] == [("<pad>", 0), ("<mask>", 1)]
    assert all(type(v) is int for v in tokens.values())  # np.int16 in the file
    genes = list(tokens)[2:]
    assert genes == sorted(genes) and all(g.startswith("ENSG") for g in genes)
    assert [tokens[g] for g in genes] == list(range(2, 25_426))
    GeneVocab(tokens, pad_token="<pad>", cls_token=None)  # a valid vocabulary


def test_read_real_medians_and_names(v1_paths):
    tokens = read_gene_dict(v1_paths["token_dictionary"])
    medians = read_gene_dict(v1_paths["gene_median_dictionary"])
    assert len(medians) == 25_424 and set(medians) == set(tokens) - {"<pad>", "<mask>"}
    values = np.array(list(medians.values()))
    assert all(type(v) is float for v in medians.values())
    assert 0.09 < values.min() < 0.1 and 634 < values.max() < 635
    names = read_gene_dict(v1_paths["gene_name_id_dict"])
    assert len(names) == 40_248
    assert all(type(k) is str and type(v) is str for k, v in names.items())
    assert names["MT-TF"] == "ENSG00000210049"


# ----------------------------------------------------------------------------- formats
def test_read_json_and_plain_pickles(tmp_path):
    content = {"ENSG00000000003": 2, "ENSG00000000005": 3}
    (tmp_path / "tokens.json").write_text(json.dumps(content))
    assert read_gene_dict(tmp_path / "tokens.json") == content
    numpy_values = {"A": np.int16(4), "B": np.float64(0.5), "C": np.float32(2.0), "D": "x"}
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(numpy_values, protocol=2))
    out = read_gene_dict(tmp_path / "d.pkl")
    assert out == {"A": 4, "B": 0.5, "C": 2.0, "D": "x"}
    assert [type(v) for v in out.values()] == [int, float, float, str]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2, 3], "not a dictionary"),
        ({1: "a"}, "keys must be strings"),
        ({"a": [1, 2]}, "numbers or strings"),
    ],
)
def test_read_rejects_non_dictionaries(tmp_path, obj, match):
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match=match):
        read_gene_dict(tmp_path / "bad.pkl")
    (tmp_path / "bad.json").write_text(json.dumps(obj if not isinstance(obj, dict) else {"a": [1]}))
    with pytest.raises(ValueError):
        read_gene_dict(tmp_path / "bad.json")


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gene_dict(tmp_path / "missing.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(pickle.UnpicklingError, match="could not be read"):
        read_gene_dict(tmp_path / "junk.pkl")
    (tmp_path / "junk.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_gene_dict(tmp_path / "junk.json")


# ----------------------------------------------------------------------------- malicious files
class _RunsCommand:
    """Unpickling this object calls os.system: the classic malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": 2, "x": _RunsCommand(marker)}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load"):
        read_gene_dict(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_Evals(), protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load .*eval"):
        read_gene_dict(path)


def test_numpy_objects_beyond_scalars_are_refused(tmp_path):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"a": np.arange(3)}))  # arrays need numpy's _reconstruct
    with pytest.raises(pickle.UnpicklingError, match="Refusing"):
        read_gene_dict(path)
    # An object-dtype scalar could carry an arbitrary object: refused too.
    raw = pickle.dumps({"a": np.float64(1.0)}, protocol=4)
    assert raw.count(b"\x8c\x02f8") == 1
    path.write_bytes(raw.replace(b"\x8c\x02f8", b"\x8c\x02O8"))
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        read_gene_dict(path)
    # _codecs.encode (bytes in old protocols) only turns text into latin-1 bytes
    path.write_bytes(pickle.dumps({"a": np.float64(1.0)}, protocol=2).replace(b"latin1", b"utf_7 "))
    with pytest.raises(pickle.UnpicklingError):
        read_gene_dict(path)


# ----------------------------------------------------------------------------- matching
def test_match_keep_duplicates_shares_tokens():
    vocab = GeneVocab.from_tokens(["CD3E", "MS4A1", "LYZ"])
    genes = ["CD3E", "MS4A1", "CD3E", "NOPE", "LYZ", "CD3E"]
    with pytest.warns(UserWarning, match="already taken"):
        default = match_genes(genes, vocab, min_coverage=0)
    np.testing.assert_array_equal(default.token_ids, [0, 1, -1, -1, 2, -1])
    kept = match_genes(genes, vocab, min_coverage=0, keep_duplicates=True)  # no warning
    np.testing.assert_array_equal(kept.token_ids, [0, 1, 0, -1, 2, 0])
    assert kept.duplicated == ["CD3E", "CD3E"] == default.duplicated
    assert kept.n_matched == 5 and kept.unmatched == ["NOPE"]
