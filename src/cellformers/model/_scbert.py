"""scBERT as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.utils import setup_anndata_dsp

from ..genes import GeneVocab, match_genes, read_gene_list
from ..module import SCBERTModule
from ..pretrained import load_scbert_state_dict, read_scbert_checkpoint, resolve_pretrained
from ..tokenize import scbert_sequence_lengths, tokenize_scbert
from ._base import FoundationModelBase

logger = logging.getLogger(__name__)

_POOLINGS = ("mean", "expressed", "last")
_POSITION_NAMES = {
    True: "gene2vec positions",
    False: "no position table",
    "learned": "learned positions",
}


@dataclass(frozen=True)
class _SCBERTTokenizer:
    """Picklable scBERT tokenizer bound to one AnnData's column -> panel-position map."""

    gene_ids: np.ndarray
    n_genes: int
    n_bins: int

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return scbert_sequence_lengths(X, n_genes=self.n_genes)

    def __call__(self, X: sp.csr_matrix) -> dict:
        tokens = tokenize_scbert(X, self.gene_ids, n_genes=self.n_genes, n_bins=self.n_bins)
        return {"input_ids": tokens}


def _read_gene2vec(gene2vec) -> np.ndarray | torch.Tensor:
    if isinstance(gene2vec, str | os.PathLike):
        path = Path(gene2vec)
        if not path.is_file():
            raise FileNotFoundError(f"gene2vec file {path} does not exist (expected a .npy file).")
        return np.load(path, allow_pickle=False)
    return gene2vec


class SCBERT(FoundationModelBase):
    """scBERT (Yang et al. 2022) as an scvi-tools model.

    scBERT reads every cell on a fixed, ordered gene panel: the counts of each panel gene are
    scaled to 10,000 per cell over the panel, transformed with ``log2(1 + x)`` and cut into the
    integer tokens ``0 .. n_bins`` (:func:`~cellformers.tokenize.tokenize_scbert`); one extra
    token 0 follows. Position ``i`` of the sequence is panel gene ``i``; the published model
    adds the gene2vec vector of that gene (a frozen position table); a model built from scratch
    without gene2vec learns its table. A Performer encoder
    (:class:`~cellformers.module.SCBERTModule`) reads the ``n_genes + 1`` tokens.

    The model holds one head at a time, as the official network does: the masked-expression
    head for pretraining, or the official fine-tuning head (a ``1 x dim`` convolution and three
    linear layers over all positions) once :meth:`train` runs with ``mode="finetune"`` (which
    replaces the masked-expression head, as ``finetune.py`` does) or when built with
    ``n_labels``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`); pass ``adata`` instead.
    gene_panel
        The ordered gene panel: a list of gene names or a text file with one name per line
        (for the published model, the 16,906 ``var_names`` of the official
        ``panglao_10000.h5ad``, in that order; the list is not distributed with the code). The
        data's genes (``var_names`` or ``var[gene_key]``) are matched to it by name, with
        human symbols and Ensembl IDs converted into each other. By default the panel is the
        registered genes (unique, non-empty names in ``var`` order): an scBERT-architecture
        model for this gene set.
    gene2vec
        Position table (the official gene2vec vectors): an array ``[len(gene_panel), dim]`` (a
        zero row is appended for the extra position, as the official constructor does) or
        ``[len(gene_panel) + 1, dim]``, or a ``.npy`` file. Kept frozen in float64. Without it a
        model built from scratch learns its position table (see ``position_embedding``).
    position_embedding
        The position table. By default a frozen ``gene2vec`` table when ``gene2vec`` is given,
        else ``"learned"``: a table learned with the network (from random vectors, or from
        ``gene2vec`` when given). Without a table (``False``, the official
        ``g2v_position_emb=False``) the encoder cannot tell genes apart: a cell whose values
        are shuffled across genes gets the same pooled embedding, so only pass ``False`` to
        rebuild a network that has none. ``True`` without ``gene2vec`` builds a zero table
        that a checkpoint fills (:meth:`from_pretrained` reads the checkpoint's setting).
    n_bins
        Highest expression token (official ``bin_num`` = 5); the vocabulary has ``n_bins + 2``
        tokens, the last being ``[MASK]``.
    dim
        Model dimension.
    depth
        Performer layers.
    heads
        Attention heads.
    dim_head
        Dimension of one head (64 in scBERT, not ``dim / heads``).
    ff_mult
        Feed-forward width is ``dim * ff_mult``.
    nb_features
        Random features of the Performer attention; by default ``int(dim_head * ln(dim_head))``.
    emb_dropout
        Dropout after the embeddings (training only).
    ff_dropout
        Dropout in the feed-forward blocks (training only).
    attn_dropout
        Dropout after attention (training only).
    n_labels
        Build the fine-tuning head with this many classes right away (e.g. to load fine-tuned
        weights); by default the masked-expression head is built and the classifier is added
        by ``train(mode="finetune")``.
    classifier_hidden
        Widths of ``fc1`` and ``fc2`` of the fine-tuning head (official: 512, 128).
    classifier_dropout
        Dropout inside the fine-tuning head (official: 0).
    mlm_probability
        Fraction of each cell's non-zero tokens chosen for prediction in pretraining.
    replace_prob
        Fraction of the chosen tokens replaced by ``[MASK]`` (the others stay unchanged).
    min_coverage
        Smallest acceptable fraction of the panel genes found in the data. Panel genes the
        data lacks are read as 0 (unexpressed), as the official preprocessing does, so low
        coverage silently degrades a pretrained model.
    stabilizer
        Performer key stabiliser: ``"cell"`` (default; a cell's outputs do not depend on the
        rest of its batch) or ``"batch"`` (the official batch-wide maximum; equal for batches of
        one cell, as ``predict.py`` runs).

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.cellbench_2platform()[::4]  # 113 cells for a quick run
    >>> adata = adata[:, (adata.X > 0).sum(0).A1 >= 100].copy()  # the most detected genes
    >>> cf.model.SCBERT.setup_anndata(adata, gene_key="gene_symbol", labels_key="cell_line")
    >>> # from scratch: a learned position table tells the panel genes apart
    >>> model = cf.model.SCBERT(adata, dim=16, depth=2, heads=2, dim_head=8)
    >>> model.train(max_epochs=1)  # masked-expression pretraining
    >>> model.train(mode="finetune", max_epochs=2)  # cell-line classification
    >>> adata.obs["prediction"] = model.predict_celltype(unknown_threshold=0.5)

    """

    _module_cls = SCBERTModule

    _unknown_label = "Unassigned"  # predict.py's label for low-confidence cells

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        gene_panel: Sequence[str] | str | os.PathLike | None = None,
        gene2vec: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
        position_embedding: bool | Literal["learned"] | None = None,
        n_bins: int = 5,
        dim: int = 200,
        depth: int = 6,
        heads: int = 10,
        dim_head: int = 64,
        ff_mult: int = 4,
        nb_features: int | None = None,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        n_labels: int | None = None,
        classifier_hidden: tuple[int, int] = (512, 128),
        classifier_dropout: float = 0.0,
        mlm_probability: float = 0.15,
        replace_prob: float = 0.9,
        min_coverage: float = 0.5,
        stabilizer: Literal["cell", "batch"] = "cell",
    ):
        super().__init__(adata, registry)
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}.")
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
        if gene_panel is None:
            if adata is None:
                raise ValueError("Pass `gene_panel` when building a model without AnnData.")
            names = pd.Index(self._gene_names(adata))
            gene_panel = names[(names != "") & ~names.duplicated()].tolist()
        gene_panel = read_gene_list(gene_panel, what="gene_panel")
        gene2vec = _read_gene2vec(gene2vec)
        if position_embedding is None:  # a network must tell its genes apart
            position_embedding = True if gene2vec is not None else "learned"
        if n_labels is None:
            n_labels = 0
        self.gene_panel = gene_panel
        self.vocab = GeneVocab.from_tokens(gene_panel, specials=(), pad_token=None, cls_token=None)
        self.min_coverage = float(min_coverage)
        self.n_bins = int(n_bins)
        self._module_kwargs = {
            "n_genes": len(gene_panel),
            "position_embedding": (
                position_embedding if position_embedding == "learned" else bool(position_embedding)
            ),
            "num_tokens": self.n_bins + 2,
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "dim_head": dim_head,
            "ff_mult": ff_mult,
            "nb_features": nb_features,
            "emb_dropout": emb_dropout,
            "ff_dropout": ff_dropout,
            "attn_dropout": attn_dropout,
            "classifier_hidden": tuple(classifier_hidden),
            "classifier_dropout": classifier_dropout,
            "mlm_probability": mlm_probability,
            "replace_prob": replace_prob,
            "stabilizer": stabilizer,
        }
        self.module = self._module_cls(
            gene2vec=gene2vec, n_labels=int(n_labels), **self._module_kwargs
        )
        self.finetuned_ = False
        if adata is not None:
            self._gene_panel_ids(adata)  # coverage check before any work starts
        self._model_summary_string = (
            f"scBERT with a {len(gene_panel):,}-gene panel, dim={dim}, {depth} layers, "
            f"{heads} heads x {dim_head}, {self.n_bins + 2} tokens, "
            f"{_POSITION_NAMES[self._module_kwargs['position_embedding']]}, "
            + (f"{n_labels}-class fine-tuning head" if n_labels else "masked-expression head")
        )
        # the position table travels in the module's state dict, not in the init parameters
        gene2vec = None
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
        *,
        spatial_key: str | None = None,
        **kwargs,
    ):
        """%(summary)s.

        scBERT reads raw counts (normalised per cell over the gene panel when tokenized): the
        expression input must hold non-negative integers (checked before registration, as are
        duplicated ``var_names`` and missing keys).

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        gene_key
            Column of ``adata.var`` with the gene names to match to the gene panel (symbols for
            the published panel; Ensembl IDs are converted); ``None`` uses ``adata.var_names``.
            Of several columns with the same panel gene the first is used, as the official
            preprocessing does.
        %(param_labels_key)s
        %(param_batch_key)s
        spatial_key
            Key of ``adata.obsm`` with each cell's 2-D or 3-D coordinates (``"spatial"`` in
            squidpy and spatialdata tables); checked (one finite row per cell) and registered.

        """
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register_anndata(
            adata,
            setup_method_args=setup_method_args,
            spatial_key=spatial_key,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            is_count_data=True,
            **kwargs,
        )

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: AnnData,
        *,
        gene_panel: Sequence[str] | str | os.PathLike | None = None,
        gene2vec: np.ndarray | torch.Tensor | str | os.PathLike | None = None,
        min_coverage: float = 0.5,
        stabilizer: Literal["cell", "batch"] = "cell",
    ) -> SCBERT:
        """Build a model from an official scBERT checkpoint (``.pth``).

        Reads ``panglao_pretrain.pth`` or a fine-tuned ``*_best.pth`` (the training wrapper
        ``{"model_state_dict": ...}`` or a bare state dict) with
        :func:`~cellformers.pretrained.read_scbert_checkpoint`; the network sizes come from the
        tensor shapes and every weight is loaded strictly, the Performer's random features and
        the gene2vec table included. A fine-tuned checkpoint keeps its classification head; its
        classes are the registered labels in sorted order (the official ``label_dict`` is
        ``np.unique`` of the training labels). A pretrained checkpoint keeps its
        masked-expression head; ``train(mode="finetune")`` replaces it.

        Parameters
        ----------
        path
            Registered name (:func:`cellformers.pretrained.available`, e.g. ``"scbert"``, downloaded once with pinned sha256), checkpoint file, or Hugging Face repository id.
        adata
            AnnData registered with :meth:`setup_anndata`.
        gene_panel
            The checkpoint's ordered gene panel (list, text file with one name per line, or an
            ``.h5ad`` file whose ``var_names`` it is): for the published model the 16,906
            ``var_names`` of the official ``panglao_10000.h5ad``. It is not shipped with the
            weights, and a wrong order makes the model meaningless. Registered names bring it.
        gene2vec
            Optional gene2vec vectors (array or ``.npy``) to check against the checkpoint's
            position table: a mismatch means the panel or its order is not the checkpoint's.
            Registered names bring it.
        min_coverage
            Smallest acceptable fraction of the panel genes found in the data.
        stabilizer
            ``"cell"`` (batch-invariant, default) or ``"batch"`` (official).

        Returns
        -------
        The model, in evaluation mode.

        """
        path, files = resolve_pretrained(path, cls)
        gene_panel = files.get("gene_panel") if gene_panel is None else gene_panel
        gene2vec = files.get("gene2vec") if gene2vec is None else gene2vec
        if gene_panel is None:
            raise ValueError(
                "Pass the checkpoint's ordered gene panel as `gene_panel=` (the 16,906 var_names "
                "of panglao_10000.h5ad for panglao_pretrain.pth)."
            )
        ckpt = read_scbert_checkpoint(path)
        config = ckpt.config
        panel = read_gene_list(gene_panel, what="gene_panel")
        if config["n_genes"] is not None and config["n_genes"] != len(panel):
            raise ValueError(
                f"The checkpoint reads {config['n_genes']:,} genes (+1 position) but gene_panel "
                f"has {len(panel):,}; pass the panel the checkpoint was trained on (16,906 genes, "
                "the var_names of panglao_10000.h5ad, for panglao_pretrain.pth)."
            )
        n_labels = int(config["n_labels"])
        if n_labels:
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
            gene_panel=panel,
            position_embedding=config["position_embedding"],
            n_bins=config["num_tokens"] - 2,
            dim=config["dim"],
            depth=config["depth"],
            heads=config["heads"],
            dim_head=config["dim_head"],
            ff_mult=config["ff_mult"],
            nb_features=config["nb_features"],
            n_labels=n_labels,
            classifier_hidden=config["classifier_hidden"],
            min_coverage=min_coverage,
            stabilizer=stabilizer,
        )
        load_scbert_state_dict(model.module, ckpt.state_dict)
        if gene2vec is not None:
            model._check_gene2vec(_read_gene2vec(gene2vec))
        model.module.eval()
        model.is_trained_ = True
        model.finetuned_ = n_labels > 0
        return model

    def _check_gene2vec(self, gene2vec) -> None:
        if self.module.pos_emb is None:
            raise ValueError(
                "gene2vec was given but the checkpoint has no position table "
                "(g2v_position_emb=False)."
            )
        given = torch.as_tensor(np.asarray(gene2vec), dtype=torch.float64)
        table = self.module.pos_emb.emb.weight.detach().cpu()
        n = self.module.n_genes
        if given.dim() != 2 or given.shape[0] not in (n, n + 1) or given.shape[1] != table.shape[1]:
            raise ValueError(
                f"gene2vec has shape {tuple(given.shape)}; the checkpoint's table is "
                f"{tuple(table.shape)}."
            )
        if not torch.allclose(given, table[: given.shape[0]], rtol=1e-6, atol=1e-6):
            raise ValueError(
                "gene2vec differs from the checkpoint's position table: the gene panel or its "
                "order is probably not the one the checkpoint was trained with."
            )

    # ------------------------------------------------------------------ genes and tokens
    def _gene_panel_ids(self, adata: AnnData) -> np.ndarray:
        """Panel position of every column of ``adata`` (-1 outside the panel), coverage-checked."""
        names = self._gene_names(adata)
        match = match_genes(names, self.vocab, min_coverage=0.0, keep_duplicates=True)
        ids = match.token_ids
        n_found = len(np.unique(ids[ids >= 0]))
        fraction = n_found / len(self.vocab)
        if n_found == 0 or fraction < self.min_coverage:
            found = np.zeros(len(self.vocab), dtype=bool)
            found[ids[ids >= 0]] = True
            missing = [self.vocab.tokens[i] for i in np.flatnonzero(~found)[:10]]
            raise ValueError(
                f"Only {n_found:,} of the {len(self.vocab):,} panel genes ({fraction:.1%}) are "
                f"in the data, below min_coverage={self.min_coverage:g}; the missing ones would "
                f"be read as unexpressed. First missing: {', '.join(missing[:10])}. First data "
                f"genes not in the panel: {', '.join(match.unmatched[:10])}. Pass `gene_key=` in "
                "setup_anndata naming a var column with gene symbols, or lower `min_coverage`."
            )
        return ids

    def _tokenizer(self, adata: AnnData) -> _SCBERTTokenizer:
        return _SCBERTTokenizer(
            gene_ids=self._gene_panel_ids(adata), n_genes=len(self.vocab), n_bins=self.n_bins
        )

    # ------------------------------------------------------------------ heads
    def _replace_head(self, n_labels: int) -> None:
        """Swap ``to_out`` for a fresh head (``n_labels`` classes, or 0: masked expression)."""
        module = self._module_cls(n_labels=n_labels, **self._module_kwargs)
        load_scbert_state_dict(module, self.module.state_dict(), init_missing_head=True)
        self._replace_module(module, n_labels=n_labels)
        self._model_summary_string = self._model_summary_string.rsplit(", ", 1)[0] + (
            f", {n_labels}-class fine-tuning head" if n_labels else ", masked-expression head"
        )

    # ------------------------------------------------------------------ training
    _train_summary = "Masked-expression pretraining or cell classification fine-tuning."
    _train_notes = """
    ``mode="pretrain"`` masks, per cell, ``ceil(mlm_probability * n)`` of its ``n``
    non-zero tokens (90 % become ``[MASK]``, 10 % stay) and learns to predict their
    expression bins, as ``pretrain.py`` does. ``mode="finetune"`` trains the official
    classification head on the registered ``labels_key``; a model with the
    masked-expression head gets a fresh classification head first (the encoder weights are
    kept), as ``finetune.py`` replaces ``to_out``. The official recipe uses Adam at 1e-4
    without weight decay and batches of 3 with 60 gradient-accumulation steps
    (``trainer_kwargs={"accumulate_grad_batches": 60}``).
    """
    _train_official_freeze = (
        '; ``"official"`` trains only what ``finetune.py`` unfreezes: the second-to-last '
        "Performer layer, the final norm and the head"
    )
    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 8,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_ratio": 0.05,
    }

    def _backbone_layers(self):
        return self.module.performer.net.layers

    def _head_modules(self):
        return [self.module.to_out]

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.classify(tensors["input_ids"])

    def _prepare_classifier(self, n_classes: int) -> None:
        if self.module.n_labels == 0:
            self._replace_head(n_classes)  # finetune.py replaces the masked-expression head
        super()._prepare_classifier(n_classes)

    def _frozen_parameters(self, freeze_layers: int | str) -> list[torch.nn.Parameter]:
        if freeze_layers != "official":
            return super()._frozen_parameters(freeze_layers)
        layers = self._backbone_layers()
        # finetune.py trains only the second-to-last Performer layer, the final norm and the head
        parts = (
            layers[-2] if len(layers) > 1 else layers[-1],
            self.module.norm,
            self.module.to_out,
        )
        trainable = {id(p) for part in parts for p in part.parameters()}
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in trainable]

    # ------------------------------------------------------------------ embeddings
    def _pool(self, input_ids: torch.Tensor, pooling: str) -> torch.Tensor:
        hidden = self.module.encode(input_ids)  # [B, n_genes + 1, dim], after the final norm
        if pooling == "last":
            return hidden[:, -1]
        genes = hidden[:, :-1]
        if pooling == "mean":
            return genes.mean(1)
        expressed = (input_ids[:, :-1] > 0).unsqueeze(-1).to(genes.dtype)
        count = expressed.sum(1)
        pooled = (genes * expressed).sum(1) / count.clamp_min(1.0)
        return torch.where(count > 0, pooled, genes.mean(1))  # no expressed gene: all genes

    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._pool(tensors["input_ids"], "mean")

    def _cell_embedding_dim(self) -> int:
        return self.module.dim

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Literal["mean", "expressed", "last"] = "mean",
        *,
        empty_cells: Literal["raise", "nan"] = "raise",
    ) -> np.ndarray:
        """Cell embeddings from the encoder's final states (after the final LayerNorm).

        The official code defines no cell embedding; the usual choice, and the default here, is
        the average of the final states of the gene positions (``model(x,
        return_encodings=True)[:, :-1].mean(1)``).

        Parameters
        ----------
        adata
            AnnData to embed; any gene set works (genes are matched to the panel). Defaults to
            the AnnData the model was built with.
        indices
            Cells to embed (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64). With ``stabilizer="cell"`` each cell's
            embedding depends only on that cell.
        pooling
            ``"mean"``: average over the ``n_genes`` panel positions (the extra last position
            excluded); ``"expressed"``: average over the positions with a non-zero token (all
            panel positions for a cell without any); ``"last"``: the state of the extra last
            position.
        empty_cells
            What to do with cells that have no counts in the model's genes (they have no
            tokens): ``"raise"`` (default) an error naming them; ``"nan"`` a warning naming
            them, and NaN rows for them.

        Returns
        -------
        Array of shape ``(n_cells, dim)``, float32, in the order of ``indices``.

        """
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
        return self._map_cells(
            adata,
            indices,
            batch_size,
            lambda t: self._pool(t["input_ids"], pooling),
            empty_cells=empty_cells,
        )
