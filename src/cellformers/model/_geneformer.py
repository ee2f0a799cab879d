"""Geneformer as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.utils import setup_anndata_dsp

from ..data import geneformer_v1_dictionaries, to_csr
from ..genes import GeneVocab, check_gene_dict, match_genes, read_gene_dict
from ..module import GeneformerModule
from ..pretrained import (
    geneformer_module_kwargs,
    load_geneformer_state_dict,
    read_geneformer_checkpoint,
    resolve_pretrained,
    save_geneformer_checkpoint,
)
from ..tokenize import (
    drop_last_gene,
    geneformer_sequence_lengths,
    perturb_rank_tokens,
    tokenize_geneformer,
)
from ..tokenize._perturb import PERTURB_MODES
from ._base import _CHUNK_CELLS, FoundationModelBase, _resolve_indices

logger = logging.getLogger(__name__)

N_COUNTS_KEY = "n_counts"  # registry key of the optional per-cell total counts
_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
_V1_VOCAB_SIZE = 25_426


@dataclass(frozen=True)
class _GeneformerTokenizer:
    """Picklable rank-value tokenizer bound to one AnnData's column -> token map."""

    gene_ids: np.ndarray
    medians: np.ndarray
    max_len: int
    pad_id: int
    cls_id: int | None
    eos_id: int | None
    registry_keys: tuple[str, ...] = ()

    @property
    def n_specials(self) -> int:
        return int(self.cls_id is not None) + int(self.eos_id is not None)

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return geneformer_sequence_lengths(
            X, self.gene_ids, max_len=self.max_len, special_tokens=self.n_specials > 0
        )

    def __call__(self, X: sp.csr_matrix, n_counts: np.ndarray | None = None) -> dict:
        if n_counts is not None:
            n_counts = np.asarray(n_counts, dtype=np.float64).reshape(-1)
        tokens = tokenize_geneformer(
            X,
            self.gene_ids,
            self.medians,
            n_counts=n_counts,
            max_len=self.max_len,
            pad_id=self.pad_id,
            cls_id=self.cls_id,
            eos_id=self.eos_id,
        )
        return {"input_ids": tokens.input_ids, "lengths": tokens.lengths}


def _read_dict(source: Mapping | str | os.PathLike, what: str, values: str) -> dict:
    if isinstance(source, Mapping):
        out = dict(source)
    elif isinstance(source, str | os.PathLike):
        out = read_gene_dict(source)
    else:
        raise TypeError(f"{what} must be a dict or a file path, got {type(source).__name__}.")
    if not out:
        raise ValueError(f"{what} is empty.")
    return check_gene_dict(
        out, values=values, source=what if isinstance(source, Mapping) else source
    )


def _find_in_folder(folder: Path, stem: str) -> Path | None:
    hits = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in (".pkl", ".json"))
    if len(hits) > 1:
        raise ValueError(
            f"Several {stem} files in {folder}: {[p.name for p in hits]}; pass the one to use."
        )
    return hits[0] if hits else None


class Geneformer(FoundationModelBase):
    """Geneformer (Theodoris et al. 2023) as an scvi-tools model.

    Each cell becomes the list of its genes ranked by expression normalised by the cell's total
    counts and by each gene's non-zero median over the pretraining corpus (rank-value encoding,
    :func:`~cellformers.tokenize.tokenize_geneformer`); a BERT encoder reads the ranked gene
    tokens. Version 1 models read the top 2,048 genes; version 2 models read ``<cls>``, the top
    4,094 genes and ``<eos>``. :meth:`from_pretrained` loads the published Hugging Face
    checkpoints strictly.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`); pass ``adata`` instead.
    token_dictionary
        ``{token: id}`` (a dict or the official pickle/JSON file). By default one is built from
        the registered genes: ``<pad>``, ``<mask>`` (and ``<cls>``, ``<eos>`` with
        ``special_tokens``) followed by the genes in sorted order.
    gene_medians
        ``{gene token: non-zero median}`` of ``counts / total counts * 10,000`` (a dict or the
        official ``gene_median_dictionary`` file). By default computed from the registered
        AnnData, as the official recipe for a new corpus does.
    special_tokens
        With a new token dictionary: frame each cell with ``<cls>`` and ``<eos>`` (version 2
        layout).
    hidden_size
        Hidden size of the BERT encoder.
    num_hidden_layers
        Transformer layers.
    num_attention_heads
        Attention heads.
    intermediate_size
        Feed-forward size.
    max_position_embeddings
        Positions the network knows (the longest possible input).
    max_input_size
        Tokens per cell, specials included (the official ``model_input_size``); defaults to
        ``max_position_embeddings``.
    hidden_dropout_prob
        Dropout on embeddings and residual branches (training only).
    attention_probs_dropout_prob
        Dropout on attention weights (training only).
    hidden_act
        Feed-forward activation (``"relu"`` in every published model).
    layer_norm_eps
        Layer-norm epsilon.
    type_vocab_size
        Token-type embeddings (only type 0 is used; kept for checkpoint compatibility).
    n_labels
        Classes of the cell-classification head; by default the number of categories of the
        registered ``labels_key`` (no head without one).
    classifier_dropout
        Dropout before the classifier; ``None`` uses ``hidden_dropout_prob`` (as BERT does).
    mlm_head
        Build the masked-gene prediction head (needed for pretraining).
    mlm_probability
        Fraction of gene tokens masked in pretraining (80 % ``<mask>``, 10 % random, 10 % kept).
    min_coverage
        Minimum fraction of the AnnData's genes found in the token dictionary.

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.cellbench_2platform()[::4].copy()  # 113 cells for a quick run
    >>> cf.model.Geneformer.setup_anndata(adata, gene_key="ensembl_id", labels_key="cell_line")
    >>> model = cf.model.Geneformer(
    ...     adata, hidden_size=32, num_hidden_layers=2, intermediate_size=64, max_input_size=128
    ... )
    >>> model.train(max_epochs=1)  # masked-gene pretraining
    >>> model.train(mode="finetune", max_epochs=2)  # cell-line classification
    >>> adata.obs["prediction"] = model.predict_celltype()

    """

    _module_cls = GeneformerModule

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        token_dictionary: Mapping[str, int] | str | os.PathLike | None = None,
        gene_medians: Mapping[str, float] | str | os.PathLike | None = None,
        special_tokens: bool = False,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 2048,
        max_input_size: int | None = None,
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.02,
        hidden_act: str = "relu",
        layer_norm_eps: float = 1e-12,
        type_vocab_size: int = 2,
        n_labels: int | None = None,
        classifier_dropout: float | None = None,
        mlm_head: bool = True,
        mlm_probability: float = 0.15,
        min_coverage: float = 0.5,
    ):
        super().__init__(adata, registry)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})."
            )
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}.")
        max_input_size = max_position_embeddings if max_input_size is None else max_input_size
        if not 1 <= max_input_size <= max_position_embeddings:
            raise ValueError(
                f"max_input_size must be in [1, max_position_embeddings={max_position_embeddings}], "
                f"got {max_input_size}."
            )
        if token_dictionary is None:
            if adata is None:
                raise ValueError("Pass `token_dictionary` when building a model without AnnData.")
            genes = sorted(set(self._gene_names(adata)) - set(_SPECIALS))
            specials = _SPECIALS if special_tokens else _SPECIALS[:2]
            token_dictionary = {t: i for i, t in enumerate([*specials, *genes])}
        token_dictionary = _read_dict(token_dictionary, "token_dictionary", "token ids")
        if gene_medians is None:
            if adata is None:
                raise ValueError("Pass `gene_medians` when building a model without AnnData.")
            gene_medians = self._corpus_medians(adata, token_dictionary)
        gene_medians = _read_dict(gene_medians, "gene_medians", "medians")
        special_tokens = "<cls>" in token_dictionary
        if special_tokens and "<eos>" not in token_dictionary:
            raise ValueError("A token dictionary with <cls> must also hold <eos> (Geneformer V2).")
        if n_labels is None:
            n_labels = len(self._label_names()) if self._has_labels() else 0
        self.vocab = GeneVocab.from_dict(
            token_dictionary,
            specials=(),
            pad_token="<pad>",
            cls_token="<cls>" if special_tokens else None,
        )
        self.min_coverage = min_coverage
        self.max_input_size = int(max_input_size)
        self._medians = np.full(len(self.vocab), np.nan)
        known = [g for g in gene_medians if g in self.vocab]
        self._medians[self.vocab.lookup(known)] = [gene_medians[g] for g in known]
        self.module = self._module_cls(
            len(self.vocab),
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            hidden_dropout_prob=hidden_dropout_prob,
            attention_probs_dropout_prob=attention_probs_dropout_prob,
            layer_norm_eps=layer_norm_eps,
            type_vocab_size=type_vocab_size,
            hidden_act=hidden_act,
            pad_token_id=self.vocab.pad_id,
            mask_token_id=self.vocab["<mask>"],
            mlm_head=mlm_head,
            n_labels=n_labels,
            classifier_dropout=classifier_dropout,
            mlm_probability=mlm_probability,
        )
        self.finetuned_ = False
        if adata is not None:
            self._gene_token_ids(adata)  # coverage check before any work starts
        self._model_summary_string = (
            f"Geneformer ({'V2 layout: <cls> genes <eos>' if special_tokens else 'V1 layout'}) with "
            f"hidden_size={hidden_size}, {num_hidden_layers} layers, {num_attention_heads} heads, "
            f"{len(self.vocab)} tokens, max_input_size={max_input_size}"
            + (f", {n_labels}-class head" if n_labels else "")
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(  # noqa: D417 (parameters come from scvi-tools' docrep placeholders)
        cls,
        adata: AnnData,
        layer: str | None = None,
        gene_key: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        n_counts_key: str | None = None,
        *,
        spatial_key: str | None = None,
        **kwargs,
    ):
        """%(summary)s.

        Geneformer reads raw counts: the expression input must hold non-negative integers
        (checked before registration, as are duplicated ``var_names`` and missing keys).

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        gene_key
            Column of ``adata.var`` with the gene names to match to the token dictionary
            (Ensembl IDs, as Geneformer's dictionaries use, or symbols, which are converted);
            ``None`` uses ``adata.var_names``. Columns that map to the same Ensembl ID are
            summed, as the official tokenizer does.
        %(param_labels_key)s
        %(param_batch_key)s
        n_counts_key
            Column of ``adata.obs`` with each cell's total counts over all genes (the official
            ``n_counts``). Give it when ``adata`` holds a subset of the measured genes; by default
            the totals are the row sums of the registered matrix.
        spatial_key
            Key of ``adata.obsm`` with each cell's 2-D or 3-D coordinates (``"spatial"`` in
            squidpy and spatialdata tables); checked (one finite row per cell) and registered.

        """
        setup_method_args = cls._get_setup_method_args(**locals())
        extra = []
        if n_counts_key is not None:
            extra.append(
                cls._total_counts_field(
                    adata, n_counts_key, N_COUNTS_KEY, name="n_counts_key", strictly_positive=False
                )
            )
        cls._register_anndata(
            adata,
            setup_method_args=setup_method_args,
            spatial_key=spatial_key,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            is_count_data=True,
            extra_fields=extra,
            **kwargs,
        )

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: AnnData,
        *,
        token_dictionary: Mapping[str, int] | str | os.PathLike | None = None,
        gene_medians: Mapping[str, float] | str | os.PathLike | None = None,
        max_input_size: int | None = None,
        min_coverage: float = 0.5,
    ) -> Geneformer:
        """Build a model from an official Geneformer checkpoint folder.

        The folder is a Hugging Face model directory (``config.json`` and ``model.safetensors``
        or ``pytorch_model.bin``), e.g. ``Geneformer-V1-10M`` or ``Geneformer-V2-104M``.
        ``BertForMaskedLM`` and fine-tuned ``BertForSequenceClassification`` checkpoints load
        strictly. With a registered ``labels_key`` a masked-LM checkpoint gets a freshly
        initialised classification head, as in the official fine-tuning.

        The token and gene-median dictionaries are taken from the arguments, else from files
        named ``token_dictionary*`` / ``gene_median_dictionary*`` (``.pkl`` or ``.json``) in the
        folder, else, for version 1 checkpoints, from the published V1 dictionaries (downloaded
        once with a pinned hash).

        Parameters
        ----------
        path
            Registered name (:func:`cellformers.pretrained.available`, e.g. ``"geneformer-v2-104m"``, downloaded once with pinned sha256), checkpoint folder, or Hugging Face repository id.
        adata
            AnnData registered with :meth:`setup_anndata`.
        token_dictionary
            Token dictionary (dict or official file).
        gene_medians
            Gene-median dictionary (dict or official file).
        max_input_size
            Tokens per cell; defaults to the checkpoint's maximum (2,048 for V1, 4,096 for V2).
        min_coverage
            Minimum fraction of the AnnData's genes found in the token dictionary.

        """
        folder, _ = resolve_pretrained(path, cls)
        ckpt = read_geneformer_checkpoint(folder)
        kwargs = geneformer_module_kwargs(ckpt.config)
        vocab_size = kwargs.pop("vocab_size")
        for key in ("pad_token_id", "mask_token_id", "n_labels", "mlm_head", "initializer_range"):
            kwargs.pop(key, None)  # set from the dictionary and the checkpoint's heads below
        sources = {"token_dictionary": token_dictionary, "gene_median_dictionary": gene_medians}
        for stem, value in sources.items():
            if value is None:
                sources[stem] = _find_in_folder(folder, stem)
        if any(v is None for v in sources.values()):
            if vocab_size != _V1_VOCAB_SIZE:
                missing = [k for k, v in sources.items() if v is None]
                raise ValueError(
                    f"No {' or '.join(missing)} for this checkpoint ({vocab_size} tokens). Pass "
                    "the files published with it (for Geneformer V2: geneformer/"
                    "token_dictionary_gc104M.pkl and gene_median_dictionary_gc104M.pkl of the "
                    "official repository) as `token_dictionary=` and `gene_medians=`."
                )
            v1 = geneformer_v1_dictionaries()
            for stem in sources:
                if sources[stem] is None:
                    sources[stem] = v1[stem]
        tokens = _read_dict(sources["token_dictionary"], "token_dictionary", "token ids")
        if len(tokens) != vocab_size:
            raise ValueError(
                f"The token dictionary has {len(tokens):,} entries but the checkpoint's vocabulary "
                f"has {vocab_size:,}: they do not belong together."
            )
        n_labels = None
        has_head = ckpt.n_labels > 0
        if has_head:
            n_labels = ckpt.n_labels
            manager = cls._get_most_recent_anndata_manager(adata, required=True)
            if manager.registry["setup_args"].get("labels_key") is not None:
                n_registered = len(
                    manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
                )
                if n_registered != n_labels:
                    raise ValueError(
                        f"The checkpoint classifies {n_labels} classes but the registered "
                        f"labels_key has {n_registered}."
                    )
        model = cls(
            adata,
            token_dictionary=tokens,
            gene_medians=sources["gene_median_dictionary"],
            max_input_size=max_input_size,
            n_labels=n_labels,
            mlm_head=any(k.startswith("cls.predictions.") for k in ckpt.state_dict),
            min_coverage=min_coverage,
            **kwargs,
        )
        load_geneformer_state_dict(model.module, ckpt.state_dict, init_missing_head=not has_head)
        model.module.eval()
        model.is_trained_ = True
        model.finetuned_ = has_head
        return model

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the network and dictionaries as an official-style checkpoint folder.

        The folder holds ``config.json`` and ``model.safetensors`` (a Hugging Face BERT that
        ``transformers`` loads as ``BertForMaskedLM``, or ``BertForSequenceClassification``
        with the label names when the model has a classification head) next to
        ``token_dictionary.json`` and ``gene_median_dictionary.json``, so that
        :meth:`from_pretrained` and the official tools can read it back.

        Parameters
        ----------
        path
            Folder to write (created if needed).

        Returns
        -------
        The folder.

        """
        extra = {}
        if self.module.n_labels:
            names = (
                self._label_names()
                if self._has_labels()
                else np.arange(self.module.n_labels).astype(str)
            )
            extra = {
                "id2label": {str(i): str(n) for i, n in enumerate(names)},
                "label2id": {str(n): i for i, n in enumerate(names)},
            }
        medians = {
            t: float(m)
            for t, m in zip(self.vocab.tokens, self._medians, strict=True)
            if np.isfinite(m)
        }
        dictionaries = {
            "token_dictionary.json": self.vocab.to_dict(),
            "gene_median_dictionary.json": medians,
        }
        return save_geneformer_checkpoint(
            self.module, path, config_extra=extra, json_files=dictionaries
        )

    # ------------------------------------------------------------------ genes and tokens
    def _corpus_medians(self, adata: AnnData, token_dictionary: dict[str, int]) -> dict[str, float]:
        """Non-zero median of ``counts / total * 10,000`` per gene of ``adata`` (a new corpus)."""
        manager = self.get_anndata_manager(adata, required=True)
        source = manager.get_from_registry(REGISTRY_KEYS.X_KEY)  # may be backed: read in chunks
        X = sp.vstack(
            [to_csr(source[i : i + _CHUNK_CELLS]) for i in range(0, adata.n_obs, _CHUNK_CELLS)],
            format="csr",
        )
        totals = self._n_counts(adata, np.arange(adata.n_obs), X)
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        norm = sp.csc_matrix(sp.diags(scale) @ X)
        names = np.asarray(self._gene_names(adata))
        medians: dict[str, float] = {}
        for j, name in enumerate(names):
            values = norm.data[norm.indptr[j] : norm.indptr[j + 1]]
            if name in token_dictionary and len(values) and name not in medians:
                medians[name] = float(np.median(values))
        return medians

    def _gene_token_ids(self, adata: AnnData) -> np.ndarray:
        """Token id of every column of ``adata`` (-1 where unmatched; duplicates share one)."""
        ids = match_genes(
            self._gene_names(adata),
            self.vocab,
            min_coverage=self.min_coverage,
            keep_duplicates=True,
        ).token_ids.copy()
        known = ids >= 0
        ids[known & ~np.isfinite(self._medians[np.maximum(ids, 0)])] = -1  # specials / no median
        return ids

    def _n_counts(self, adata: AnnData, indices: np.ndarray, X=None) -> np.ndarray:
        manager = self.get_anndata_manager(adata, required=True)
        if N_COUNTS_KEY in manager.data_registry:
            return np.asarray(manager.get_from_registry(N_COUNTS_KEY), dtype=np.float64).reshape(
                -1
            )[indices]
        if X is None:
            X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        return np.asarray(X[indices].sum(1), dtype=np.float64).reshape(-1)

    def _tokenizer(self, adata: AnnData) -> _GeneformerTokenizer:
        manager = self.get_anndata_manager(adata, required=True)
        with_counts = N_COUNTS_KEY in manager.data_registry
        return _GeneformerTokenizer(
            gene_ids=self._gene_token_ids(adata),
            medians=self._medians,
            max_len=self.max_input_size,
            pad_id=self.vocab.pad_id,
            cls_id=self.vocab["<cls>"] if self._special_tokens else None,
            eos_id=self.vocab["<eos>"] if self._special_tokens else None,
            registry_keys=(N_COUNTS_KEY,) if with_counts else (),
        )

    @property
    def _special_tokens(self) -> bool:
        return "<cls>" in self.vocab

    # ------------------------------------------------------------------ training
    _train_summary = (
        "Masked-gene pretraining or cell classification fine-tuning on the registered AnnData."
    )
    _train_notes = """
    ``mode="pretrain"`` masks ``mlm_probability`` of each cell's tokens (80 % become
    ``<mask>``, 10 % a random token, 10 % stay) and learns to predict the genes at those
    ranks, as the official pretraining does. ``mode="finetune"`` trains the classification
    head (``tanh`` pooler on the first token, then a linear layer, as Hugging Face's
    ``BertForSequenceClassification``) and the encoder on the registered ``labels_key``.
    ``freeze_layers`` works as the official ``Classifier(freeze_layers=...)``. The defaults
    follow the official recipes (the V1 pretraining and the fine-tuning examples).
    """
    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 12,
        "lr": {"pretrain": 1e-3, "finetune": 5e-5},
        "weight_decay": 0.001,
        "warmup_ratio": 0.05,
    }

    def _train(self, *, mode: str, **kwargs):
        if mode == "pretrain" and self.module.mlm_head is None:
            raise ValueError(
                "This model has no masked-gene head (a classifier checkpoint); use mode='finetune'."
            )
        if (
            kwargs.get("strategy") == "ddp"
            and self.module.mlm_head is not None
            and self.module.classifier is not None
        ):
            kwargs["strategy"] = "ddp_find_unused_parameters_true"  # one head idles per objective
        return super()._train(mode=mode, **kwargs)

    # ------------------------------------------------------------------ embeddings
    def _layer_depth(self, layer: int) -> int:
        n = len(self.module.encoder.layers)
        if not isinstance(layer, int | np.integer) or not -n <= layer <= 0:
            raise ValueError(
                f"layer must be an integer in [-{n}, 0] (0 = last layer, -1 = penultimate, the "
                f"official default), got {layer!r}."
            )
        return n + int(layer)

    def _resolve_pooling(self, pooling: str | None) -> str:
        pooling = ("cls" if self._special_tokens else "mean") if pooling is None else pooling
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}.")
        if pooling == "cls" and not self._special_tokens:
            raise ValueError(
                "pooling='cls' needs a <cls> token (Geneformer V2 layout); this model has none, "
                "use pooling='mean'."
            )
        return pooling

    def _pool(self, input_ids, lengths, depth: int, pooling: str) -> torch.Tensor:
        hidden = self.module.hidden_states(input_ids, lengths, n_layers=depth)
        if pooling == "cls":
            return hidden[:, 0]
        front = int(self._special_tokens)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        keep = (positions[None, :] >= front) & (positions[None, :] < (lengths - front)[:, None])
        keep = keep.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Literal["cls", "mean"] | None = None,
        layer: int = -1,
        *,
        empty_cells: Literal["raise", "nan"] = "raise",
    ) -> np.ndarray:
        """Cell embeddings as the official ``EmbExtractor`` computes them.

        Parameters
        ----------
        adata
            AnnData to embed; any gene set works (genes are matched to the token dictionary).
            Defaults to the AnnData the model was built with.
        indices
            Cells to embed (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64). Cells are batched by length; each cell's
            embedding depends only on that cell.
        pooling
            ``"cls"``: the ``<cls>`` token's state (V2 models, their default); ``"mean"``: the
            average over the gene tokens, ``<cls>``/``<eos>`` and padding excluded (V1 default).
        layer
            Which layer's output, with the official meaning: ``-1`` (default) is the
            penultimate layer, ``0`` the last, ``-k`` the output of layer ``n_layers - k``
            (``-n_layers`` is the embedding layer).
        empty_cells
            What to do with cells that express no gene of the token dictionary (an empty rank
            encoding): ``"raise"`` (default) an error naming them; ``"nan"`` a warning naming
            them, and NaN rows for them.

        Returns
        -------
        Array of shape ``(n_cells, hidden_size)``, float32, in the order of ``indices``.

        """
        pooling = self._resolve_pooling(pooling)
        depth = self._layer_depth(layer)
        return self._embed(adata, indices, batch_size, pooling, depth, empty_cells=empty_cells)

    def _embed(
        self, adata, indices, batch_size, pooling: str, depth: int, empty_cells: str = "raise"
    ) -> np.ndarray:
        return self._map_cells(
            adata,
            indices,
            batch_size,
            lambda t: self._pool(t["input_ids"], t["lengths"], depth, pooling),
            empty_cells=empty_cells,
        )

    # ------------------------------------------------------------------ classification
    def _backbone_layers(self):
        return self.module.encoder.layers

    def _head_modules(self):
        return [m for m in (self.module.pooler, self.module.classifier) if m is not None]

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.classify(tensors["input_ids"], tensors["lengths"])

    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        # the default embedding (official layer -1 and pooling), e.g. for batch_adversarial
        depth = self._layer_depth(-1)
        return self._pool(
            tensors["input_ids"], tensors["lengths"], depth, self._resolve_pooling(None)
        )

    def _cell_embedding_dim(self) -> int:
        return self.module.hidden_size

    # ------------------------------------------------------------------ perturbation
    def perturb(
        self,
        adata: AnnData | None = None,
        genes: str | Sequence[str] = (),
        mode: Literal["delete", "overexpress", "inhibit", "activate"] = "delete",
        *,
        cell_states: Mapping | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Literal["cls", "mean"] | None = None,
        layer: int = -1,
    ) -> AnnData:
        """In-silico perturbation of genes in each cell's rank encoding.

        For every cell and gene the perturbed cell is embedded next to the original, and the
        cosine shift ``1 - cos(perturbed, original)`` is recorded (0 = no change). All
        perturbations of a batch of cells run together.

        * ``"delete"`` removes the gene's token;
        * ``"overexpress"`` moves it to the front (inserting it if the cell does not express
          it; a full-length cell then loses its last gene, and is compared with itself
          truncated the same way, as the official code does);
        * ``"activate"`` / ``"inhibit"`` move it to the middle of the top / bottom quartile of
          the cell's ranks (to the very front / end if it is already there); the official code
          documents but does not implement these two.

        A gene a cell does not express cannot be deleted, activated or inhibited: its shift is
        0 and ``layers["expressed"]`` is ``False``.

        Parameters
        ----------
        adata
            Cells to perturb; defaults to the model's AnnData.
        genes
            Genes to perturb one at a time (symbols or Ensembl IDs, matched like the data's).
        mode
            ``"delete"``, ``"overexpress"``, ``"inhibit"`` or ``"activate"``.
        cell_states
            ``{"state_key": obs column, "start_state": ..., "goal_state": ..., "alt_states":
            [...]}`` (optional): perturb only cells in ``start_state`` and also record, per
            state, the official shift toward it, ``cos(perturbed, state) - cos(original,
            state)``, where a state's embedding is the mean embedding of its cells in ``adata``.
        indices
            Cells to perturb; all by default.
        batch_size
            Cells per forward pass (default 16); the perturbed copies of those cells are
            embedded in batches of the same size.
        pooling
            Cell embedding, as in :meth:`get_latent_representation`.
        layer
            Layer, as in :meth:`get_latent_representation` (official default -1).

        Returns
        -------
        AnnData of cells x perturbed genes: ``X`` the cosine shift, ``layers["expressed"]``,
        with ``cell_states`` ``layers["shift_to_<state>"]`` for the goal, start and alternative
        states; ``var`` holds each gene's token, the number of cells expressing it and the
        mean shift over those cells (``mean_shift``; ``mean_shift_to_goal`` with states), and
        ``uns["perturb"]`` the settings.

        """
        if mode not in PERTURB_MODES:
            raise ValueError(f"mode must be one of {PERTURB_MODES}, got {mode!r}.")
        genes = [genes] if isinstance(genes, str) else list(genes)
        if not genes:
            raise ValueError("Pass the genes to perturb as `genes=[...]`.")
        combos = [g for g in genes if not isinstance(g, str)]
        if combos:
            raise TypeError(
                f"Geneformer.perturb perturbs one gene at a time; pass gene names, not "
                f"combinations such as {combos[0]!r} (the shared `perturb` of SCGPT, SCBERT and "
                "SCFoundation takes tuples of genes perturbed together)."
            )
        if len(set(genes)) != len(genes):
            raise ValueError("`genes` holds duplicates.")
        match = match_genes(pd.Index(genes), self.vocab, min_coverage=0.0)
        tokens = match.token_ids
        bad = [
            g
            for g, t in zip(genes, tokens, strict=True)
            if t < 0 or not np.isfinite(self._medians[t])
        ]
        if bad:
            raise ValueError(f"Genes not in the Geneformer token dictionary: {bad[:10]}.")
        pooling = self._resolve_pooling(pooling)
        depth = self._layer_depth(layer)
        adata = self._validate_anndata(adata)
        indices = _resolve_indices(indices, adata.n_obs)
        states: dict[str, np.ndarray] = {}
        if cell_states is not None:
            indices, states = self._state_embeddings(
                adata, indices, cell_states, batch_size, pooling, depth
            )
        self._check_empty_cells(adata, indices)
        batch_size = 16 if batch_size is None else int(batch_size)
        state_names = list(states)
        state_matrix = (
            torch.as_tensor(np.stack([states[s] for s in state_names]), device=self.device)
            if states
            else None
        )
        n_front = int(self._special_tokens)

        def embed_in_batches(ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
            parts = []
            for start in range(0, len(lengths), batch_size):
                sl = slice(start, start + batch_size)
                width = int(lengths[sl].max())
                parts.append(
                    self._pool(
                        torch.as_tensor(ids[sl, :width], device=self.device),
                        torch.as_tensor(lengths[sl], device=self.device),
                        depth,
                        pooling,
                    )
                )
            return torch.cat(parts) if parts else torch.empty(0, self.module.hidden_size)

        def run(t: dict[str, torch.Tensor]) -> torch.Tensor:
            ids, lengths = t["input_ids"].cpu().numpy(), t["lengths"].cpu().numpy()
            n_cells = len(lengths)
            original = self._pool(t["input_ids"], t["lengths"], depth, pooling)
            pert = perturb_rank_tokens(
                ids, lengths, tokens, mode, n_front=n_front, n_back=n_front,
                max_len=self.max_input_size, pad_id=self.vocab.pad_id,
            )  # fmt: skip
            rows = np.flatnonzero(pert.changed.reshape(-1))
            perturbed = original.repeat_interleave(len(tokens), 0).clone()
            reference = perturbed.clone()
            if len(rows):
                perturbed[rows] = embed_in_batches(pert.input_ids[rows], pert.lengths[rows])
            overflow = np.flatnonzero(pert.overflow.reshape(-1))
            if len(overflow):
                cut_ids, cut_len = drop_last_gene(
                    ids, lengths, n_back=n_front, pad_id=self.vocab.pad_id
                )
                cells = np.unique(overflow // len(tokens))
                truncated = embed_in_batches(cut_ids[cells], cut_len[cells])
                lookup = {c: i for i, c in enumerate(cells)}
                reference[overflow] = truncated[[lookup[c] for c in overflow // len(tokens)]]
            out = [1.0 - F.cosine_similarity(perturbed, reference, dim=-1)]
            if state_matrix is not None:
                for s in range(len(state_names)):
                    goal = state_matrix[s][None, :]
                    out.append(
                        F.cosine_similarity(perturbed, goal, dim=-1)
                        - F.cosine_similarity(reference, goal, dim=-1)
                    )
            changed = torch.as_tensor(pert.changed.reshape(-1), device=self.device)
            out = [torch.where(changed, v, 0.0) for v in out]  # unchanged cells: exactly 0
            out.append(torch.as_tensor(pert.expressed.reshape(-1), device=self.device).float())
            return torch.stack(out, -1).view(n_cells, len(tokens), -1)

        result = self._map_cells(adata, indices, batch_size, run)
        shift, expressed = result[..., 0], result[..., -1] > 0.5
        var = pd.DataFrame(
            {
                "token": [self.vocab.tokens[t] for t in tokens],
                "n_cells_expressed": expressed.sum(0),
            },
            index=pd.Index(genes, name="gene"),
        )
        counted = expressed if mode != "overexpress" else np.ones_like(expressed)
        with np.errstate(invalid="ignore"):
            var["mean_shift"] = np.where(counted, shift, 0).sum(0) / counted.sum(0)
        out = AnnData(
            X=shift.astype(np.float32),
            obs=adata.obs.iloc[indices].drop(
                columns=[c for c in adata.obs if str(c).startswith("_scvi_")]
            ),
            var=var,
        )
        out.layers["expressed"] = expressed
        for s, name in enumerate(state_names):
            out.layers[f"shift_to_{name}"] = result[..., 1 + s].astype(np.float32)
        if cell_states is not None:
            goal = out.layers[f"shift_to_{state_names[0]}"]
            with np.errstate(invalid="ignore"):
                out.var["mean_shift_to_goal"] = np.where(counted, goal, 0).sum(0) / counted.sum(0)
        out.uns["perturb"] = {
            "mode": mode,
            "pooling": pooling,
            "layer": int(layer),
            "states": state_names,
            "cell_states": {
                k: (list(v) if k == "alt_states" else v) for k, v in (cell_states or {}).items()
            },
        }
        return out

    def _state_embeddings(self, adata, indices, cell_states, batch_size, pooling, depth):
        """Cells of the start state among ``indices`` and the mean embedding of every state."""
        if not isinstance(cell_states, Mapping):
            raise TypeError(
                "cell_states must be a dict with state_key, start_state and goal_state."
            )
        missing = {"state_key", "start_state", "goal_state"} - set(cell_states)
        unknown = set(cell_states) - {"state_key", "start_state", "goal_state", "alt_states"}
        if missing or unknown:
            raise ValueError(
                "cell_states needs the keys state_key, start_state, goal_state (and optionally "
                f"alt_states); missing {sorted(missing)}, unknown {sorted(unknown)}."
            )
        key = cell_states["state_key"]
        if key not in adata.obs:
            raise KeyError(f"cell_states['state_key'] {key!r} is not a column of adata.obs.")
        labels = adata.obs[key].astype(str).to_numpy()
        wanted = [
            cell_states["goal_state"],
            cell_states["start_state"],
            *cell_states.get("alt_states", []),
        ]
        wanted = [str(s) for s in wanted]
        absent = [s for s in wanted if s not in set(labels)]
        if absent:
            raise ValueError(f"No cells of state(s) {absent} in adata.obs[{key!r}].")
        states = {}
        for s in dict.fromkeys(wanted):
            emb = self._embed(adata, np.flatnonzero(labels == s), batch_size, pooling, depth)
            states[s] = emb.mean(0)
        start = indices[labels[indices] == str(cell_states["start_state"])]
        if len(start) == 0:
            raise ValueError("No selected cell is in the start state.")
        return start, states
