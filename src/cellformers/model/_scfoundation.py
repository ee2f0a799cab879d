"""scFoundation as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.utils import setup_anndata_dsp

from ..genes import GeneVocab, match_genes, read_gene_list
from ..module import SCFoundationModule
from ..pretrained import load_scfoundation_state_dict, read_scfoundation_checkpoint
from ..tokenize import (
    panel_columns,
    scfoundation_bulk_target_sum,
    scfoundation_sequence_lengths,
    tokenize_scfoundation,
)
from ..tokenize._depth import _parse_target_depth
from ._base import FoundationModelBase, _resolve_indices

logger = logging.getLogger(__name__)

TOTAL_COUNTS_KEY = "total_counts"  # registry key of the per-cell total counts (mode "A")
_POOLINGS = ("all", "max", "mean")
_MODULE_ARGS = (
    "bin_num",
    "bin_alpha",
    "encoder_dim",
    "encoder_depth",
    "encoder_heads",
    "encoder_d_hid",
    "encoder_dropout",
    "decoder_dim",
    "decoder_depth",
    "decoder_heads",
    "decoder_dim_head",
    "decoder_ff_mult",
    "decoder_nb_features",
    "stabilizer",
    "downsample_prob",
    "min_depth_fraction",
    "value_mask_prob",
    "zero_mask_prob",
    "max_encoder_len",
    "n_labels",
    "classifier_hidden",
)


@dataclass(frozen=True)
class _SCFoundationTokenizer:
    """Picklable scFoundation tokenizer bound to one AnnData's column -> gene-position map."""

    gene_ids: np.ndarray
    n_genes: int
    input_type: str
    pre_normalized: str
    target_depth: str | tuple
    bulk_target_sum: float | None = None
    registry_keys: tuple[str, ...] = ()

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return scfoundation_sequence_lengths(X, self.gene_ids)

    def __call__(self, X: sp.csr_matrix, total_counts: np.ndarray | None = None) -> dict:
        if total_counts is not None:
            total_counts = np.asarray(total_counts, dtype=np.float64).reshape(-1)
        tokens = tokenize_scfoundation(
            X,
            self.gene_ids,
            n_genes=self.n_genes,
            input_type=self.input_type,
            pre_normalized=self.pre_normalized,
            target_depth=self.target_depth,
            total_counts=total_counts,
            bulk_target_sum=self.bulk_target_sum,
        )
        return {"values": tokens.values, "positions": tokens.positions, "lengths": tokens.lengths}


@dataclass(frozen=True)
class _AlignedCounts:
    """Training minibatches for read-depth-aware pretraining: counts in the model's gene order."""

    gene_ids: np.ndarray
    n_genes: int

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return scfoundation_sequence_lengths(X, self.gene_ids)

    def __call__(self, X: sp.csr_matrix) -> dict:
        cols = panel_columns(self.gene_ids, self.n_genes)  # the first column of a gene wins
        keep = np.flatnonzero(cols >= 0)
        counts = np.zeros((X.shape[0], self.n_genes), dtype=np.float32)
        counts[:, cols[keep]] = sp.csr_matrix(X)[:, keep].toarray()
        return {"counts": counts}


class SCFoundation(FoundationModelBase):
    """scFoundation (xTrimoGene, Hao et al. 2024) as an scvi-tools model.

    scFoundation reads every cell on a fixed, ordered gene list (19,264 genes for the published
    model). The expressed genes' normalised values (``log1p`` of counts per 10,000), each
    embedded by an auto-discretising value embedding plus its gene's position embedding, and two
    read-depth tokens go through a transformer encoder: S, the cell's ``log10`` total count,
    and T, the ``log10`` total count the model is asked to describe (``target_depth``; setting
    T above S asks for an embedding enhanced to a higher depth). A Performer decoder reads all
    genes (the encoder states scattered back, zeros elsewhere) and predicts every gene's
    expression. See :func:`~cellformers.tokenize.tokenize_scfoundation` for the exact
    preprocessing and :class:`~cellformers.module.SCFoundationModule` for the network.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`); pass ``adata`` instead.
    gene_list
        The model's ordered gene list: names, a text file with one name per line, or a
        ``gene_name``/``index`` table (the published ``OS_scRNA_gene_index.19264.tsv``). The
        data's genes (``var_names`` or ``var[gene_key]``) are matched to it by name, with human
        symbols and Ensembl IDs converted into each other; genes of the list that the data lack
        read as zero, as in the official preprocessing. By default the list is the registered
        genes (unique, non-empty names in ``var`` order): an scFoundation-architecture model
        for this gene set, to train from scratch.
    target_depth
        Default T token of single-cell inputs: ``"tN"`` (T = N, the official default ``"t4"``),
        ``"fN"`` (T = S + log10 N; ``"f1"`` gives T = S) or ``"aN"`` (T = S + N).
    min_coverage
        Smallest acceptable fraction of the data's genes found in the gene list.
    bin_num, bin_alpha, encoder_dim, encoder_depth, encoder_heads, encoder_d_hid, encoder_dropout, decoder_dim, decoder_depth, decoder_heads, decoder_dim_head, decoder_ff_mult, decoder_nb_features
        Network sizes (defaults: the published 100M model), see
        :class:`~cellformers.module.SCFoundationModule`.
    stabilizer
        Performer key stabiliser of the decoder: ``"cell"`` (default; a cell's outputs do not
        depend on its batch) or ``"batch"`` (official).
    downsample_prob, min_depth_fraction, value_mask_prob, zero_mask_prob, max_encoder_len
        Read-depth-aware masked pretraining settings (see
        :meth:`~cellformers.module.SCFoundationModule.corrupt`).
    n_labels
        Classes of the cell classification head (the official fine-tuning example's
        ``LinearProbingClassifier`` head on the max-pooled gene states); 0 builds none.
        ``train(mode="finetune")`` adds one for the registered labels when needed.
    classifier_hidden
        Hidden width of the classification head.

    Examples
    --------
    >>> import cellformers as cf
    >>> cf.model.SCFoundation.setup_anndata(adata)  # raw counts
    >>> model = cf.model.SCFoundation.from_pretrained(
    ...     "models.ckpt", adata, gene_list="OS_scRNA_gene_index.19264.tsv"
    ... )
    >>> adata.obsm["X_scfoundation"] = model.get_latent_representation()  # 3,072-d

    """

    _module_cls = SCFoundationModule

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        gene_list: Sequence[str] | str | os.PathLike | None = None,
        target_depth: str = "t4",
        min_coverage: float = 0.5,
        bin_num: int = 100,
        bin_alpha: float = 1.0,
        encoder_dim: int = 768,
        encoder_depth: int = 12,
        encoder_heads: int = 12,
        encoder_d_hid: int | None = 3072,
        encoder_dropout: float = 0.1,
        decoder_dim: int = 512,
        decoder_depth: int = 6,
        decoder_heads: int = 8,
        decoder_dim_head: int = 64,
        decoder_ff_mult: int = 4,
        decoder_nb_features: int | None = None,
        stabilizer: Literal["cell", "batch"] = "cell",
        downsample_prob: float = 0.5,
        min_depth_fraction: float = 0.1,
        value_mask_prob: float = 0.3,
        zero_mask_prob: float = 0.03,
        max_encoder_len: int | None = None,
        n_labels: int = 0,
        classifier_hidden: int = 256,
    ):
        super().__init__(adata, registry)
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}.")
        _parse_target_depth(target_depth)
        if gene_list is None:
            if adata is None:
                raise ValueError("Pass `gene_list` when building a model without AnnData.")
            names = pd.Index(self._gene_names(adata))
            gene_list = names[(names != "") & ~names.duplicated()].tolist()
        gene_list = read_gene_list(gene_list, what="gene_list")
        self.gene_list = gene_list
        self.vocab = GeneVocab.from_tokens(gene_list, specials=(), pad_token=None, cls_token=None)
        self.target_depth = target_depth
        self.min_coverage = float(min_coverage)
        module_kwargs = {k: v for k, v in locals().items() if k in _MODULE_ARGS}
        self.module = self._module_cls(len(gene_list), **module_kwargs)
        if adata is not None:
            self._gene_ids(adata)  # coverage check before any work starts
        self._model_summary_string = (
            f"scFoundation with a {len(gene_list):,}-gene list, encoder {encoder_dim} x "
            f"{encoder_depth} layers, Performer decoder {decoder_dim} x {decoder_depth} layers, "
            f"target depth {target_depth!r}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(  # noqa: D417 (parameters come from scvi-tools' docrep placeholders)
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_key: str | None = None,
        pre_normalized: Literal["F", "T", "A"] = "F",
        input_type: Literal["singlecell", "bulk"] = "singlecell",
        total_counts_key: str | None = None,
        **kwargs,
    ):
        """%(summary)s.

        The expression input is checked before registration (negative, NaN or infinite values;
        non-integer values when raw counts are declared; duplicated ``var_names``; missing
        keys).

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        %(param_batch_key)s
        %(param_labels_key)s
        gene_key
            Column of ``adata.var`` with the gene names to match to the model's gene list (HGNC
            symbols for the published model, or Ensembl IDs, which are converted); ``None``
            uses ``adata.var_names``.
        pre_normalized
            What the expression holds, as the official ``--pre_normalized``: ``"F"`` raw
            counts (normalised here); ``"T"`` already ``log1p`` of counts per 10,000 (S is then
            the sum of those values, an official quirk); ``"A"`` normalised as for ``"T"`` with
            the true total counts in ``adata.obs[total_counts_key]``.
        input_type
            ``"singlecell"`` or ``"bulk"`` (official ``--input_type``; bulk samples are scaled
            to the median total of the registered samples and ignore ``target_depth``).
        total_counts_key
            Column of ``adata.obs`` with each cell's raw total count; required with
            ``pre_normalized="A"``.

        """
        if pre_normalized not in ("F", "T", "A"):
            raise ValueError(f"pre_normalized must be 'F', 'T' or 'A', got {pre_normalized!r}.")
        if input_type not in ("singlecell", "bulk"):
            raise ValueError(f"input_type must be 'singlecell' or 'bulk', got {input_type!r}.")
        if input_type == "bulk" and pre_normalized == "A":
            raise ValueError("pre_normalized='A' is for single cells; use 'F' or 'T' for bulk.")
        if (pre_normalized == "A") != (total_counts_key is not None):
            raise ValueError(
                "total_counts_key is needed with pre_normalized='A' (and only then): name the "
                "adata.obs column with each cell's raw total count."
            )
        setup_method_args = cls._get_setup_method_args(**locals())
        extra = []
        if total_counts_key is not None:
            extra.append(
                cls._total_counts_field(
                    adata,
                    total_counts_key,
                    TOTAL_COUNTS_KEY,
                    name="total_counts_key",
                    strictly_positive=True,
                )
            )
        cls._register_anndata(
            adata,
            setup_method_args=setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            is_count_data=pre_normalized == "F",
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
        gene_list: Sequence[str] | str | os.PathLike,
        version: Literal["cell", "rde", "gene"] = "cell",
        target_depth: str = "t4",
        min_coverage: float = 0.5,
        stabilizer: Literal["cell", "batch"] = "cell",
    ) -> SCFoundation:
        """Build a model from the published ``models.ckpt`` (or one of its networks).

        ``models.ckpt`` holds three independently trained networks: ``"cell"`` for cell
        embeddings, ``"rde"`` for read-depth enhancement and ``"gene"`` for gene embeddings
        and expression (the official ``--version ce / rde`` and the gene outputs). The chosen
        one is read with ``torch.load(weights_only=True)`` and loaded strictly, the Performer's
        random features included (they are never redrawn).

        Parameters
        ----------
        path
            The checkpoint file.
        adata
            AnnData registered with :meth:`setup_anndata`.
        gene_list
            The checkpoint's ordered gene list (``OS_scRNA_gene_index.19264.tsv`` for the
            published model; it is not shipped with the weights).
        version
            Which network of ``models.ckpt`` to load.
        target_depth
            Default T token (official default ``"t4"``).
        min_coverage
            Smallest acceptable fraction of the data's genes found in the gene list.
        stabilizer
            ``"cell"`` (batch-invariant, default) or ``"batch"`` (official).

        Returns
        -------
        The model, in evaluation mode.

        """
        ckpt = read_scfoundation_checkpoint(path, version=version)
        kwargs = ckpt.module_kwargs()
        genes = read_gene_list(gene_list, what="gene_list")
        if kwargs["n_genes"] != len(genes):
            raise ValueError(
                f"The checkpoint reads {kwargs['n_genes']:,} genes but gene_list has "
                f"{len(genes):,}; pass the list the checkpoint was trained on (19,264 genes, "
                "OS_scRNA_gene_index.19264.tsv, for the published models)."
            )
        kwargs = {k: v for k, v in kwargs.items() if k in _MODULE_ARGS}
        kwargs["stabilizer"] = stabilizer
        model = cls(
            adata,
            gene_list=genes,
            target_depth=target_depth,
            min_coverage=min_coverage,
            **kwargs,
        )
        load_scfoundation_state_dict(model.module, ckpt.state_dict)
        model.module.eval()
        model.is_trained_ = True
        model.checkpoint_ = {"format": "scfoundation", "path": os.fspath(path), "version": version}
        return model

    # ------------------------------------------------------------------ genes and tokens
    def _gene_ids(self, adata: AnnData) -> np.ndarray:
        """Position of every column of ``adata`` in the gene list (-1 outside), coverage-checked."""
        match = match_genes(
            self._gene_names(adata),
            self.vocab,
            min_coverage=self.min_coverage,
            keep_duplicates=True,
        )
        return match.token_ids

    def _tokenizer(self, adata: AnnData, target_depth=None) -> _SCFoundationTokenizer:
        manager = self.get_anndata_manager(adata, required=True)
        gene_ids = self._gene_ids(adata)
        input_type = self._setup_arg(adata, "input_type") or "singlecell"
        pre_normalized = self._setup_arg(adata, "pre_normalized") or "F"
        target_sum = None
        if input_type == "bulk" and pre_normalized == "F":
            X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
            target_sum = scfoundation_bulk_target_sum(sp.csr_matrix(X[...]), gene_ids)
        return _SCFoundationTokenizer(
            gene_ids=gene_ids,
            n_genes=len(self.gene_list),
            input_type=input_type,
            pre_normalized=pre_normalized,
            target_depth=self.target_depth if target_depth is None else target_depth,
            bulk_target_sum=target_sum,
            registry_keys=(TOTAL_COUNTS_KEY,) if TOTAL_COUNTS_KEY in manager.data_registry else (),
        )

    def _map_tokens(self, adata, indices, batch_size, fn, *, target_depth=None, reduce=False):
        """:meth:`_map_cells` with a per-call ``target_depth``."""
        if target_depth is not None:
            _parse_target_depth(target_depth)
        previous = self.target_depth
        self.target_depth = previous if target_depth is None else target_depth
        try:
            return self._map_cells(adata, indices, batch_size, fn, reduce=reduce)
        finally:
            self.target_depth = previous

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        mode: Literal["pretrain", "finetune"] = "pretrain",
        freeze_layers: int | Literal["all", "official"] = 0,
        class_weight: str | Mapping[str, float] | None = None,
        batch_size: int = 8,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **kwargs,
    ):
        """Read-depth-aware masked pretraining (RDA), or cell-type annotation fine-tuning.

        ``mode="pretrain"``: every minibatch cell is randomly down-sampled (binomial thinning
        of its reads) for a fraction of cells, normalised, and a part of its expressed and of
        its zero genes is masked; the encoder reads the unmasked expressed genes with S (the
        input depth) and T (the original depth), the decoder predicts the full-depth normalised
        expression of every gene, and the loss is the mean squared error at the masked genes
        (:meth:`~cellformers.module.SCFoundationModule.corrupt`). It needs raw single-cell
        counts.

        ``mode="finetune"``: the classification head (batch norm and a two-layer MLP on the
        max-pooled gene states of the encoder, as the official fine-tuning example) is trained
        with cross-entropy on the registered ``labels_key``; the decoder is not used. A model
        without a head gets a fresh one first.

        Training runs through Lightning, so ``accelerator``, ``devices``, ``strategy`` and
        ``precision`` work as in any scvi-tools model.

        Parameters
        ----------
        max_epochs
            Passes through the data; scvi-tools' heuristic when ``None``.
        mode
            ``"pretrain"`` or ``"finetune"``.
        freeze_layers
            Keep the first ``freeze_layers`` encoder layers fixed (the embeddings still
            train); ``"all"`` trains only the classification head; ``"official"`` trains only
            what the official example unfreezes: the second-to-last encoder layer and the
            head.
        class_weight
            Fine-tuning only: ``"balanced"`` weights each class's cross-entropy by
            ``n_cells / (n_classes * n_cells_in_class)``, or a mapping label -> weight.
        batch_size
            Cells per minibatch (in pretraining the decoder reads every gene of the list for
            every cell).
        lr
            Peak learning rate of AdamW (official pretraining 1e-4).
        weight_decay
            AdamW weight decay (official: none).
        warmup_ratio
            Fraction of steps used for linear warm-up before the decay.
        plan_kwargs
            Other :class:`~cellformers.train.PretrainingPlan` arguments.
        datasplitter_kwargs
            Passed to scvi-tools' ``DataSplitter`` (e.g. ``num_workers``).
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` and Lightning's
            ``Trainer`` (``train_size``, ``accelerator``, ``max_time`` …). With
            ``early_stopping=True`` fine-tuning stops when the validation macro-F1
            (``macro_f1_validation``) stops improving.

        """
        if mode == "pretrain" and (
            (self._setup_arg(self.adata, "pre_normalized") or "F") != "F"
            or (self._setup_arg(self.adata, "input_type") or "singlecell") != "singlecell"
        ):
            raise ValueError(
                "Read-depth-aware pretraining down-samples reads, so it needs raw single-cell "
                "counts: set up the AnnData with pre_normalized='F' and input_type='singlecell'."
            )
        plan_kwargs = {
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup_ratio": warmup_ratio,
            **(plan_kwargs or {}),
        }
        return self._run_training(
            mode=mode,
            freeze_layers=freeze_layers,
            class_weight=class_weight,
            max_epochs=max_epochs,
            batch_size=batch_size,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **kwargs,
        )

    def _training_tokenizer(self):
        if self.module.objective == "classification":
            return self._tokenizer(self.adata)
        return _AlignedCounts(self._gene_ids(self.adata), len(self.gene_list))

    def _backbone_layers(self):
        return self.module.encoder.layers

    def _head_modules(self):
        return [self.module.classifier]

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.classify(tensors["values"], tensors["positions"], tensors["lengths"])

    def _prepare_classifier(self, n_classes: int) -> None:
        if self.module.n_labels == 0:
            kwargs = {
                **self.init_params_.get("non_kwargs", {}),
                **self.init_params_.get("kwargs", {}),
            }
            kwargs = {k: v for k, v in kwargs.items() if k in _MODULE_ARGS}
            module = self._module_cls(len(self.gene_list), **{**kwargs, "n_labels": n_classes})
            load_scfoundation_state_dict(module, self.module.state_dict(), init_missing_head=True)
            self._replace_module(module, n_labels=n_classes)
            self._model_summary_string += f", {n_classes}-class head"
        super()._prepare_classifier(n_classes)

    def _frozen_parameters(self, freeze_layers: int | str) -> list[torch.nn.Parameter]:
        if freeze_layers != "official":
            return super()._frozen_parameters(freeze_layers)
        layers = self._backbone_layers()
        # the official example trains only the second-to-last encoder layer and the head
        parts = (layers[-2] if len(layers) > 1 else layers[-1], self.module.classifier)
        trainable = {id(p) for part in parts for p in part.parameters()}
        return [p for p in self.module.parameters() if p.requires_grad and id(p) not in trainable]

    # ------------------------------------------------------------------ outputs
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Literal["all", "max", "mean"] = "all",
        target_depth: str | None = None,
    ) -> np.ndarray:
        """Cell embeddings from the encoder, as the official ``get_embedding.py`` computes them.

        Parameters
        ----------
        adata
            AnnData to embed; any gene set works (genes are matched to the gene list). Defaults
            to the AnnData the model was built with.
        indices
            Cells to embed (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64). Cells are batched by length and padding is
            masked, so a cell's embedding does not depend on its batch (the official script
            runs one cell at a time).
        pooling
            ``"all"`` (official default): ``[S, T, max over genes, mean over genes]`` of the
            encoder states, ``4 * encoder_dim`` (3,072) values; ``"max"``: the maximum over all
            tokens, T and S included (official ``pool_type max``); ``"mean"``: the mean over
            the gene tokens.
        target_depth
            T token for this call (e.g. ``"f1"`` for T = S, ``"a1"`` for a 10-fold deeper
            target); defaults to the model's ``target_depth``.

        Returns
        -------
        Array ``(n_cells, 4 * encoder_dim)`` (``"all"``) or ``(n_cells, encoder_dim)``, float32.

        """
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}.")
        return self._map_tokens(
            adata,
            indices,
            batch_size,
            lambda t: self.module.embed_cells(
                t["values"], t["positions"], t["lengths"], pooling=pooling
            ),
            target_depth=target_depth,
        )

    def _genes_in_data(self, adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Columns of ``adata`` in the gene list (first of duplicates) and their positions."""
        cols = panel_columns(self._gene_ids(adata), len(self.gene_list))
        columns = np.flatnonzero(cols >= 0)
        return columns, cols[columns]

    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.embed_cells(
            tensors["values"], tensors["positions"], tensors["lengths"], pooling="all"
        )

    def _perturbation_expression(self, adata: AnnData):
        columns, positions = self._genes_in_data(adata)
        index = torch.as_tensor(positions)

        def predict(t: dict[str, torch.Tensor]) -> torch.Tensor:
            pred = self.module.predict_expression(t["values"], t["positions"], t["lengths"])
            return pred[:, index.to(pred.device)]

        return predict, adata.var_names[columns]

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        target_depth: str | None = None,
        batch_size: int | None = None,
        all_genes: bool = False,
    ) -> pd.DataFrame:
        """Predicted normalised expression (``log1p`` of counts per 10,000) from the decoder.

        This is read-depth enhancement: with T above the cell's depth S (e.g.
        ``target_depth="a1"``, ten times deeper, or ``"t5"``), the model predicts the profile
        of a deeper sequencing of the cell. Use the ``"rde"`` (or ``"gene"``) network of the
        published checkpoint (:meth:`from_pretrained` with ``version="rde"``).

        Parameters
        ----------
        adata
            AnnData to predict (any gene set); defaults to the model's AnnData.
        indices
            Cells to predict; all by default.
        target_depth
            T token for this call; defaults to the model's ``target_depth``.
        batch_size
            Cells per forward pass (default 4: the decoder reads every gene of the list).
        all_genes
            Return every gene of the model's list instead of the data's genes that are in it.

        Returns
        -------
        DataFrame of cells x genes (columns: the data's ``var_names`` in the gene list, in data
        order, or the model's gene names with ``all_genes=True``), float32.

        """
        adata = self._validate_anndata(adata)
        idx = _resolve_indices(indices, adata.n_obs)
        batch_size = 4 if batch_size is None else batch_size
        pred = self._map_tokens(
            adata,
            idx,
            batch_size,
            lambda t: self.module.predict_expression(t["values"], t["positions"], t["lengths"]),
            target_depth=target_depth,
        )
        obs_names = adata.obs_names[idx]
        if all_genes:
            return pd.DataFrame(pred, index=obs_names, columns=pd.Index(self.gene_list))
        columns, positions = self._genes_in_data(adata)
        return pd.DataFrame(pred[:, positions], index=obs_names, columns=adata.var_names[columns])

    def get_gene_embeddings(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        target_depth: str | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Context gene embeddings from the decoder, averaged over cells, one row per data gene.

        The official ``--output_type gene`` gives, per cell, the decoder state of each of the
        19,264 genes (``[n_cells, 19264, 512]``; use the ``"gene"`` network of the published
        checkpoint). Here they are averaged over the selected cells, which keeps the memory
        small and gives one vector per gene, aligned with ``adata.var`` so that it can go into
        ``adata.varm`` directly.

        Parameters
        ----------
        adata
            AnnData whose cells give the context; defaults to the model's AnnData.
        indices
            Cells to average over; all by default.
        target_depth
            T token for this call; defaults to the model's ``target_depth``.
        batch_size
            Cells per forward pass (default 4).

        Returns
        -------
        Array ``(adata.n_vars, decoder_dim)``, float32; rows of genes that are not in the gene
        list (or later duplicates of a gene) are NaN.

        """
        adata = self._validate_anndata(adata)
        idx = _resolve_indices(indices, adata.n_obs)
        batch_size = 4 if batch_size is None else batch_size
        columns, positions = self._genes_in_data(adata)
        index = torch.as_tensor(positions)
        total = self._map_tokens(
            adata,
            idx,
            batch_size,
            lambda t: self.module.gene_embeddings(t["values"], t["positions"], t["lengths"])[
                :, index.to(t["values"].device)
            ],
            target_depth=target_depth,
            reduce=True,
        )  # [matched genes, dim], summed over cells
        out = np.full((adata.n_vars, total.shape[-1]), np.nan, dtype=np.float32)
        out[columns] = total / len(idx)
        return out
