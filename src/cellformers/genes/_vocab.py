"""Gene vocabularies: a plain-dict replacement for scGPT's torchtext-based ``GeneVocab``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

#: Specials appended by scGPT's pretraining and downstream code, in this order.
SCGPT_SPECIALS: tuple[str, ...] = ("<pad>", "<cls>", "<eoc>")


def _rebuild_vocab(tokens: list[str], pad_token: str | None, cls_token: str | None) -> GeneVocab:
    """Unpickle helper: rebuild a :class:`GeneVocab` from its token list."""
    return GeneVocab(
        dict(zip(tokens, range(len(tokens)), strict=True)),
        pad_token=pad_token,
        cls_token=cls_token,
    )


class GeneVocab:
    """Mapping between gene tokens (symbols, Ensembl IDs or specials) and integer ids.

    A plain-dictionary re-implementation of scGPT's ``GeneVocab`` (which subclasses the
    abandoned ``torchtext.vocab.Vocab``). As in scGPT, looking up an unknown token with
    ``vocab[token]`` returns the id of the padding token (the official "default index").

    Parameters
    ----------
    token_to_id
        Mapping from token to id. Ids must be exactly ``0, ..., n - 1``, each used once.
    pad_token
        The padding token. Must be in the vocabulary unless `None`. Unknown tokens map to its id.
    cls_token
        The cell (``<cls>``) token. Must be in the vocabulary unless `None`.

    Examples
    --------
    >>> vocab = GeneVocab.from_tokens(["CD3E", "MS4A1"])
    >>> vocab.tokens
    ['CD3E', 'MS4A1', '<pad>', '<cls>', '<eoc>']
    >>> vocab["CD3E"], vocab["NOT_A_GENE"], vocab.pad_id
    (0, 2, 2)

    """

    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        token_to_id: Mapping[str, int],
        *,
        pad_token: str | None = "<pad>",
        cls_token: str | None = "<cls>",
    ) -> None:
        if not isinstance(token_to_id, Mapping):
            raise TypeError(
                f"`token_to_id` must be a mapping from token to id, got {type(token_to_id).__name__}. "
                "Use `GeneVocab.from_tokens(...)` to build a vocabulary from a list of genes."
            )
        tokens = list(token_to_id.keys())
        bad = [t for t in tokens if not isinstance(t, str)]
        if bad:
            raise ValueError(
                f"Vocabulary tokens must be strings; found {len(bad)} non-string token(s), "
                f"e.g. {bad[:5]!r}."
            )
        ids = np.asarray(list(token_to_id.values()))
        n = len(tokens)
        if n and not (
            np.issubdtype(ids.dtype, np.integer)
            or (ids.dtype == object and all(isinstance(i, int | np.integer) for i in ids))
        ):
            raise ValueError("Vocabulary ids must be integers.")
        ids = ids.astype(np.int64)
        if n and not np.array_equal(np.sort(ids), np.arange(n)):
            uniq, counts = np.unique(ids, return_counts=True)
            dup = uniq[counts > 1][:5].tolist()
            missing = np.setdiff1d(np.arange(n), ids)[:5].tolist()
            raise ValueError(
                f"Vocabulary ids must be exactly 0..{n - 1}, each used once; "
                f"duplicated ids: {dup}, missing ids: {missing}, min {ids.min()}, max {ids.max()}. "
                "Renumber the tokens consecutively (e.g. `GeneVocab.from_tokens(tokens)`)."
            )
        order = np.argsort(ids, kind="stable")
        self._tokens: list[str] = [tokens[i] for i in order]
        self._stoi: dict[str, int] = {t: i for i, t in enumerate(self._tokens)}
        self._index: pd.Index | None = None
        for name, tok in (("pad_token", pad_token), ("cls_token", cls_token)):
            if tok is not None and tok not in self._stoi:
                raise ValueError(
                    f"{name}={tok!r} is not in the vocabulary. Add it (e.g. "
                    f"`GeneVocab.from_dict(mapping, specials={SCGPT_SPECIALS})` appends missing "
                    f"specials) or pass {name}=None."
                )
        self._pad_token = pad_token
        self._cls_token = cls_token

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        genes: Iterable[str],
        specials: Sequence[str] = SCGPT_SPECIALS,
        *,
        pad_token: str | None = "<pad>",
        cls_token: str | None = "<cls>",
    ) -> GeneVocab:
        """Build a vocabulary from a gene list: genes first, then missing `specials` in order.

        This is the layout of scGPT's pretraining script (genes ``0..n-1``, then
        ``<pad>``, ``<cls>``, ``<eoc>``).

        Parameters
        ----------
        genes
            Gene tokens, unique.
        specials
            Special tokens appended after the genes (those already present are skipped).
        pad_token
            See :class:`GeneVocab`.
        cls_token
            See :class:`GeneVocab`.

        """
        genes = [str(g) for g in genes] if not isinstance(genes, list) else genes
        idx = pd.Index(genes)
        if not idx.is_unique:
            dup = idx[idx.duplicated()].unique()[:10].tolist()
            raise ValueError(
                f"Gene tokens must be unique; {int(idx.duplicated().sum())} duplicate(s), e.g. {dup}. "
                "Deduplicate the list before building a vocabulary."
            )
        return cls.from_dict(
            dict(zip(genes, range(len(genes)), strict=True)),
            specials,
            pad_token=pad_token,
            cls_token=cls_token,
        )

    @classmethod
    def from_dict(
        cls,
        token_to_id: Mapping[str, int],
        specials: Sequence[str] = SCGPT_SPECIALS,
        *,
        pad_token: str | None = "<pad>",
        cls_token: str | None = "<cls>",
    ) -> GeneVocab:
        """Build a vocabulary from a ``{token: id}`` mapping and append missing `specials`.

        Tokens are ordered by id (ids must be consecutive from 0), then each special not yet
        present is appended in order, exactly as scGPT's downstream code does after loading
        ``vocab.json``.

        Parameters
        ----------
        token_to_id
            Mapping from token to id, in any key order.
        specials
            Special tokens appended when missing.
        pad_token
            See :class:`GeneVocab`.
        cls_token
            See :class:`GeneVocab`.

        """
        base = cls(token_to_id, pad_token=None, cls_token=None)
        tokens = base._tokens + [s for s in dict.fromkeys(specials) if s not in base._stoi]
        return cls(
            dict(zip(tokens, range(len(tokens)), strict=True)),
            pad_token=pad_token,
            cls_token=cls_token,
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        specials: Sequence[str] = SCGPT_SPECIALS,
        *,
        pad_token: str | None = "<pad>",
        cls_token: str | None = "<cls>",
    ) -> GeneVocab:
        """Read a scGPT ``vocab.json`` (``{token: id}``) and append missing `specials`.

        Parameters
        ----------
        path
            Path to a JSON file holding a ``{token: id}`` object.
        specials
            Special tokens appended when missing.
        pad_token
            See :class:`GeneVocab`.
        cls_token
            See :class:`GeneVocab`.

        """
        path = Path(path)
        try:
            with path.open(encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} is not a JSON file ({e}). A vocabulary file must hold a "
                '{"token": id, ...} object, as scGPT\'s vocab.json does.'
            ) from e
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} holds a JSON {type(data).__name__}, expected a {{token: id}} object."
            )
        return cls.from_dict(data, specials, pad_token=pad_token, cls_token=cls_token)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, int]:
        """Return the ``{token: id}`` mapping (the content of a scGPT ``vocab.json``)."""
        return dict(self._stoi)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as a ``{token: id}`` JSON file readable by :meth:`from_file`.

        Parameters
        ----------
        path
            Output file.

        """
        with Path(path).open("w", encoding="utf-8") as f:
            json.dump(self._stoi, f, indent=2)

    def __reduce__(self):
        return _rebuild_vocab, (list(self._tokens), self._pad_token, self._cls_token)

    # ------------------------------------------------------------------ access
    @property
    def tokens(self) -> list[str]:
        """Tokens ordered by id."""
        return list(self._tokens)

    @property
    def pad_token(self) -> str | None:
        """The padding token."""
        return self._pad_token

    @property
    def cls_token(self) -> str | None:
        """The cell token."""
        return self._cls_token

    @property
    def pad_id(self) -> int:
        """Id of the padding token (also returned for unknown tokens)."""
        if self._pad_token is None:
            raise ValueError("This vocabulary has no padding token (pad_token=None).")
        return self._stoi[self._pad_token]

    @property
    def cls_id(self) -> int:
        """Id of the ``<cls>`` token."""
        if self._cls_token is None:
            raise ValueError("This vocabulary has no cell token (cls_token=None).")
        return self._stoi[self._cls_token]

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and token in self._stoi

    def __getitem__(self, token: str) -> int:
        try:
            return self._stoi[token]
        except KeyError:
            if self._pad_token is None:
                raise KeyError(
                    f"{token!r} is not in the vocabulary (and it has no padding token to "
                    "fall back on)."
                ) from None
            return self._stoi[self._pad_token]

    def __iter__(self):
        return iter(self._tokens)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneVocab):
            return NotImplemented
        return (
            self._tokens == other._tokens
            and self._pad_token == other._pad_token
            and self._cls_token == other._cls_token
        )

    def __repr__(self) -> str:
        parts = [f"n_tokens={len(self)}"]
        if self._pad_token is not None:
            parts.append(f"pad={self._pad_token!r}->{self.pad_id}")
        if self._cls_token is not None:
            parts.append(f"cls={self._cls_token!r}->{self.cls_id}")
        return f"GeneVocab({', '.join(parts)})"

    def lookup(self, names: Iterable[str]) -> np.ndarray:
        """Ids of many tokens at once (vectorised); unknown tokens give ``-1``.

        Parameters
        ----------
        names
            Tokens to look up (list, array or :class:`pandas.Index`).

        Returns
        -------
        Array of ``int64`` ids, ``-1`` where the token is not in the vocabulary.

        """
        if self._index is None:
            self._index = pd.Index(self._tokens, dtype=object)
        if isinstance(names, str):
            raise TypeError("`lookup` takes a sequence of tokens; use `vocab[token]` for one.")
        if not hasattr(names, "__len__"):
            names = list(names)
        return self._index.get_indexer(pd.Index(np.asarray(names, dtype=object))).astype(np.int64)
