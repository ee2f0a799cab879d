"""Read gene dictionaries (token ids, gene medians, name maps) without running pickled code.

Geneformer publishes its dictionaries as Python pickles whose values are NumPy scalars
(``numpy.int16`` token ids, ``numpy.float64`` medians). :func:`read_gene_dict` reads them with
a restricted unpickler that can rebuild NumPy scalars and nothing else, so a tampered file
cannot execute code; JSON files with the same ``{key: value}`` content are read as well.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Globals a dictionary pickle may name: NumPy's scalar constructor (under its NumPy 1 and
#: NumPy 2 module paths) and :class:`numpy.dtype` (plus ``_codecs.encode``, which old pickle
#: protocols use to store bytes).
_SCALAR_PATHS = (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"))
_DTYPE_PATH = ("numpy", "dtype")


class _RefusedError(pickle.UnpicklingError):
    """A pickle names something a gene dictionary may not contain."""


def _scalar_constructor():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _safe_dtype(*args):
    """:class:`numpy.dtype`, refusing object dtypes (which could smuggle in arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _RefusedError("Refusing to unpickle an object dtype in a gene dictionary.")
    return dtype


def _safe_scalar(dtype, *args):
    """NumPy's scalar constructor restricted to plain (non-object) dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedError(
            "Refusing to unpickle a NumPy scalar that is not a plain number in a gene dictionary."
        )
    return _scalar_constructor()(dtype, *args)


def _safe_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol 0-2 pickles use it for bytes: str -> latin-1 bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedError("Refusing an unexpected _codecs.encode call in a pickle.")
    return text.encode("latin-1")


class _NumpyScalarUnpickler(pickle.Unpickler):
    """Unpickler that only admits the globals needed to rebuild NumPy number scalars."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SCALAR_PATHS:
            return _safe_scalar
        if (module, name) == _DTYPE_PATH:
            return _safe_dtype
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol 0-2 pickles
            return _safe_encode
        raise _RefusedError(
            f"Refusing to load {module}.{name}: a gene dictionary pickle may only contain "
            "strings, numbers and NumPy number scalars. The file is not a plain dictionary (it "
            "may be corrupt or tampered with); obtain it again from the official source."
        )


def _plain(value, key, path: Path):
    """Convert a dictionary value to a plain Python ``int``, ``float`` or ``str``."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, str):
        return value
    raise ValueError(
        f"{path.name}: the value of {key!r} is a {type(value).__name__}; gene dictionaries "
        "must map names to numbers or strings."
    )


def read_gene_dict(path: str | os.PathLike) -> dict:
    """Read a gene dictionary from a pickle or JSON file, safely.

    Pickles (``.pkl``, ``.pickle``, or any suffix other than ``.json``) are read with a
    restricted unpickler that rebuilds only built-in containers, strings, numbers and NumPy
    number scalars; any other global (a class or a function such as ``os.system``) is refused
    with a :class:`pickle.UnpicklingError` before anything runs. This reads the official
    Geneformer files (``token_dictionary``, ``gene_median_dictionary``, ``gene_name_id_dict``,
    ``ensembl_mapping_dict``). ``.json`` files must hold one ``{key: value}`` object.

    Parameters
    ----------
    path
        The file to read.

    Returns
    -------
    The dictionary, with ``str`` keys and plain Python values: NumPy integers (e.g. the
    ``int16`` token ids of Geneformer V1) become ``int``, NumPy floats become ``float``.

    Examples
    --------
    >>> import cellformers as cf
    >>> paths = cf.data.geneformer_v1_dictionaries()  # doctest: +SKIP
    >>> tokens = cf.genes.read_gene_dict(paths["token_dictionary"])  # doctest: +SKIP
    >>> tokens["<pad>"], tokens["ENSG00000000003"]  # doctest: +SKIP
    (0, 2)

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene dictionary {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path.name} is not valid JSON: {err}") from err
    else:
        try:
            obj = _NumpyScalarUnpickler(io.BytesIO(raw)).load()
        except _RefusedError:
            raise
        except Exception as err:  # truncated or non-pickle content
            raise pickle.UnpicklingError(
                f"{path.name} could not be read as a pickled dictionary ({type(err).__name__}: "
                f"{err}). Pass a .pkl file as published, or a .json file with a .json suffix."
            ) from err
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path.name} holds a {type(obj).__name__}, not a dictionary of gene names."
        )
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise ValueError(
            f"{path.name}: dictionary keys must be strings (gene names or IDs); found "
            f"{len(bad)} other key(s), e.g. {bad[:3]!r}."
        )
    return {k: _plain(v, k, path) for k, v in obj.items()}


def check_gene_dict(
    mapping: dict, *, values: str, source: str | os.PathLike = "dictionary"
) -> dict:
    """Check the values of a gene dictionary and return it with plain Python values.

    Parameters
    ----------
    mapping
        ``{gene or token: value}``.
    values
        ``"token ids"`` (non-negative integers, each used once) or ``"medians"`` (finite
        positive numbers).
    source
        Where the dictionary comes from (file or argument name), for messages.

    Returns
    -------
    ``{str: int}`` or ``{str: float}``.

    """
    if values not in ("token ids", "medians"):
        raise ValueError(f"values must be 'token ids' or 'medians', got {values!r}.")
    out = {}
    for key, value in mapping.items():
        if values == "token ids":
            ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
            ok = ok and value >= 0
            kind = "a non-negative integer"
        else:
            ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
                value, bool | np.bool_
            )
            ok = ok and np.isfinite(value) and value > 0
            kind = "a finite positive number"
        if not ok:
            raise ValueError(
                f"{source}: the {values[:-1]} of {key!r} must be {kind}, got {value!r}."
            )
        out[str(key)] = int(value) if values == "token ids" else float(value)
    if values == "token ids":
        repeated = [i for i, n in Counter(out.values()).items() if n > 1]
        if repeated:
            raise ValueError(f"{source}: token ids {repeated[:5]} are given to several tokens.")
    return out


_GENE_INDEX_HEADER = ("gene_name", "index")


def read_gene_index(path: str | os.PathLike) -> list[str]:
    r"""Read a gene list stored as a ``gene_name``/``index`` table, such as scFoundation's.

    scFoundation publishes its 19,264 genes as ``OS_scRNA_gene_index.19264.tsv``: a
    tab-separated file with the header ``gene_name\tindex`` and one row per gene
    (``A1BG\t0``, ``A1CF\t1``, …), in index order. The index is the gene's position in the
    model input.

    Parameters
    ----------
    path
        The file to read.

    Returns
    -------
    The gene names in index order: ``names[i]`` is the gene at position ``i``.

    Raises
    ------
    ValueError
        If the header is not ``gene_name``, ``index``, a row does not hold two fields, the
        indices are not ``0 .. n - 1`` in order, or a name is empty or repeated.

    Examples
    --------
    >>> import cellformers as cf
    >>> genes = cf.genes.read_gene_index("OS_scRNA_gene_index.19264.tsv")  # doctest: +SKIP
    >>> len(genes), genes[:2]  # doctest: +SKIP
    (19264, ['A1BG', 'A1CF'])

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene index {str(path)!r} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path.name} is not a UTF-8 text file: {err}") from err
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path.name} is empty; expected a header 'gene_name<TAB>index'.")
    header = tuple(field.strip() for field in lines[0].split("\t"))
    if header != _GENE_INDEX_HEADER:
        raise ValueError(
            f"{path.name}: the header must be 'gene_name<TAB>index' (tab-separated), got "
            f"{lines[0]!r}."
        )
    names: list[str] = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(
                f"{path.name}, line {line_no}: expected 2 tab-separated fields (gene name and "
                f"index), got {len(fields)}: {line!r}."
            )
        name, index = fields[0].strip(), fields[1].strip()
        expected = line_no - 2
        if index != str(expected):
            raise ValueError(
                f"{path.name}, line {line_no}: the index must run 0, 1, 2, … in file order; "
                f"expected {expected} for gene {name!r}, got {index!r}."
            )
        if not name:
            raise ValueError(f"{path.name}, line {line_no}: the gene name is empty.")
        names.append(name)
    if not names:
        raise ValueError(f"{path.name} holds a header but no genes.")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(
            f"{path.name}: gene names must be unique; {len(repeated)} repeated name(s), e.g. "
            f"{', '.join(repeated[:5])}."
        )
    return names


def read_gene_list(
    source: Sequence[str] | str | os.PathLike, *, what: str = "gene list"
) -> list[str]:
    """Read an ordered gene list: a sequence of names or a file.

    A file is either a ``gene_name``/``index`` table (:func:`read_gene_index`, e.g.
    scFoundation's ``OS_scRNA_gene_index.19264.tsv``) or plain text with one name per line
    (blank lines skipped). The order is kept: position ``i`` of a model is ``names[i]``.

    Parameters
    ----------
    source
        Gene names, or the path of a file holding them.
    what
        How to call the list in error messages (e.g. ``"gene_panel"``).

    Returns
    -------
    The gene names, each once.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    ValueError
        If the list is empty or names a gene twice.

    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} file {path} does not exist (expected a text file with one gene name per "
                "line, or a gene_name/index table, in the order of the model's positions)."
            )
        with path.open(encoding="utf-8-sig") as handle:
            first = handle.readline()
        if tuple(f.strip() for f in first.split("\t")) == _GENE_INDEX_HEADER:
            return read_gene_index(path)
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        names = [n for n in names if n]
    else:
        names = [str(g) for g in np.asarray(list(source), dtype=object).ravel()]
    if not names:
        raise ValueError(f"{what} is empty.")
    counts = Counter(names)
    repeated = [n for n, c in counts.items() if c > 1]
    if repeated:
        raise ValueError(
            f"{what} must hold each gene once; {sum(counts[n] - 1 for n in repeated)} "
            f"duplicate(s), e.g. {repeated[:10]}."
        )
    return names
