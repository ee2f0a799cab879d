"""scGPT as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from scvi.utils import setup_anndata_dsp

from ..genes import GeneVocab, match_genes
from ..module import SCGPTModule
from ..pretrained import load_scgpt_state_dict, read_scgpt_checkpoint
from ..tokenize import scgpt_sequence_lengths, tokenize_scgpt
from ._base import FoundationModelBase

logger = logging.getLogger(__name__)

# constructor arguments that are also SCGPTModule arguments
_MODULE_ARGS = (
    "d_model",
    "nhead",
    "d_hid",
    "nlayers",
    "dropout",
    "pad_value",
    "mask_value",
    "mask_ratio",
    "do_mvc",
    "n_layers_cls",
)


@dataclass(frozen=True)
class _ScGPTTokenizer:
    """Picklable scGPT tokenizer bound to one AnnData's column -> token map.

    ``lengths`` gives token counts for length bucketing; calling it returns the arrays the
    module reads. With ``random_truncation`` (training), cells longer than ``max_seq_len`` get a
    fresh random gene subset on every call, drawn from a generator seeded by torch's RNG so that
    runs are reproducible under a fixed seed.
    """

    gene_ids: np.ndarray
    options: dict
    random_truncation: bool = False

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return scgpt_sequence_lengths(
            X,
            self.gene_ids,
            self.options["max_seq_len"],
            include_zero_gene=self.options["include_zero_gene"],
        )

    def __call__(self, X: sp.csr_matrix) -> dict[str, np.ndarray]:
        options = dict(self.options)
        if self.random_truncation:
            seed = int(torch.randint(0, 2**62, ()).item())
            options.update(truncation="random", rng=np.random.default_rng(seed))
        tokens = tokenize_scgpt(X, self.gene_ids, **options)
        return {"genes": tokens.genes, "values": tokens.values}


class SCGPT(FoundationModelBase):
    """scGPT (Cui et al. 2024) as an scvi-tools model.

    Cells are read as sentences of gene tokens: the non-zero genes of a cell, each with its
    expression value binned into ``n_bins`` per-cell quantile bins, after a ``<cls>`` token whose
    final hidden state is the cell embedding. The network (gene embedding + continuous value
    encoder, post-norm transformer, expression and MVC decoders) has the state-dict layout of the
    published checkpoints, which :meth:`from_pretrained` loads strictly.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`); pass ``adata`` instead.
    vocab
        Gene vocabulary (a :class:`~cellformers.genes.GeneVocab` or its ``{token: id}`` dict). By
        default one is built from the registered genes (training from scratch).
    d_model
        Embedding size.
    nhead
        Attention heads.
    d_hid
        Hidden size of the feed-forward blocks.
    nlayers
        Transformer layers.
    dropout
        Dropout rate (training only).
    n_bins
        Number of value bins (bin 0 is zero expression).
    max_seq_len
        Maximum tokens per cell, ``<cls>`` included; longer cells are truncated to a random gene
        subset that depends only on the cell itself (see :func:`~cellformers.tokenize.tokenize_scgpt`).
    pad_value
        Value at padded positions.
    mask_value
        Value at masked positions in masked-value pretraining.
    cls_value
        Value of the ``<cls>`` token; defaults to ``pad_value`` as in the official pretraining
        and zero-shot embedding code.
    mask_ratio
        Fraction of each cell's gene tokens masked in pretraining.
    do_mvc
        Build the MVC (masked value prediction from the cell embedding) decoder.
    include_zero_gene
        Also tokenize zero-expression genes (all matched genes, as in the integration recipe).
    min_coverage
        Minimum fraction of the AnnData's genes found in the vocabulary; below it an error is
        raised.
    n_labels
        Classes of the cell classification head (scGPT's ``ClsDecoder`` on the ``<cls>``
        embedding); 0 builds none. ``train(mode="finetune")`` adds one for the registered
        labels when needed.
    n_layers_cls
        Linear layers of the classification head (official ``nlayers_cls``).

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.pbmc68k_reduced_counts()
    >>> cf.model.SCGPT.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    >>> model = cf.model.SCGPT(adata, d_model=64, nhead=4, d_hid=64, nlayers=2)
    >>> model.train(max_epochs=5)
    >>> adata.obsm["X_scgpt"] = model.get_latent_representation()

    """

    _module_cls = SCGPTModule

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        vocab: GeneVocab | dict[str, int] | None = None,
        d_model: int = 512,
        nhead: int = 8,
        d_hid: int = 512,
        nlayers: int = 12,
        dropout: float = 0.2,
        n_bins: int = 51,
        max_seq_len: int = 1200,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        cls_value: float | None = None,
        mask_ratio: float = 0.4,
        do_mvc: bool = True,
        include_zero_gene: bool = False,
        min_coverage: float = 0.5,
        n_labels: int = 0,
        n_layers_cls: int = 3,
    ):
        super().__init__(adata, registry)
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead}).")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
        if max_seq_len < 2:
            raise ValueError(
                f"max_seq_len must be at least 2 (<cls> plus one gene), got {max_seq_len}."
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        if vocab is None:
            if adata is None:
                raise ValueError("Pass `vocab` when building a model without AnnData.")
            gene_vocab = GeneVocab.from_tokens(list(dict.fromkeys(self._gene_names(adata))))
        elif isinstance(vocab, GeneVocab):
            gene_vocab = vocab
        else:
            gene_vocab = GeneVocab.from_dict(vocab)
        vocab = gene_vocab.to_dict()  # init_params_ keep a plain dict
        self.vocab = gene_vocab
        cls_value = pad_value if cls_value is None else cls_value
        self._token_kwargs = {
            "cls_id": gene_vocab.cls_id,
            "pad_id": gene_vocab.pad_id,
            "n_bins": n_bins,
            "max_seq_len": max_seq_len,
            "pad_value": pad_value,
            "cls_value": cls_value,
            "include_zero_gene": include_zero_gene,
        }
        self.min_coverage = min_coverage
        self.module = self._module_cls(
            len(gene_vocab),
            pad_id=gene_vocab.pad_id,
            d_model=d_model,
            nhead=nhead,
            d_hid=d_hid,
            nlayers=nlayers,
            dropout=dropout,
            pad_value=pad_value,
            mask_value=mask_value,
            mask_ratio=mask_ratio,
            do_mvc=do_mvc,
            n_labels=n_labels,
            n_layers_cls=n_layers_cls,
        )
        if adata is not None:
            self._gene_token_ids(adata)  # coverage check before any work starts
        self._model_summary_string = (
            f"SCGPT with d_model={d_model}, nhead={nhead}, nlayers={nlayers}, "
            f"vocabulary of {len(gene_vocab)} tokens, n_bins={n_bins}, max_seq_len={max_seq_len}"
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
        is_count_data: bool = True,
        **kwargs,
    ):
        """%(summary)s.

        The expression input is checked before registration: negative, NaN or infinite
        values, non-integer values when counts are required, duplicated ``var_names`` and
        missing keys raise errors that say what to pass instead.

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
        %(param_batch_key)s
        %(param_labels_key)s
        gene_key
            Column of ``adata.var`` with the gene names to match to the vocabulary (symbols or
            Ensembl IDs); ``None`` uses ``adata.var_names``.
        is_count_data
            Require raw integer counts. scGPT's per-cell quantile binning depends only on each
            cell's ranking of genes, so normalised or log-transformed values give the same tokens;
            set ``False`` to pass them.

        """
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register_anndata(
            adata,
            setup_method_args=setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            is_count_data=is_count_data,
            **kwargs,
        )

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: AnnData,
        *,
        max_seq_len: int | None = None,
        min_coverage: float = 0.5,
        **kwargs,
    ) -> SCGPT:
        """Build a model from an official scGPT checkpoint folder.

        The folder holds ``args.json``, ``vocab.json`` and ``best_model.pt`` as published by the
        scGPT authors (e.g. ``scGPT_human``). Weights are read with
        ``torch.load(weights_only=True)`` and loaded strictly: a missing or unexpected key is an
        error, never a silently random layer.

        Parameters
        ----------
        path
            Checkpoint folder.
        adata
            AnnData registered with :meth:`setup_anndata`.
        max_seq_len
            Maximum tokens per cell; defaults to the checkpoint's ``max_seq_len`` (1200 for the
            whole-human model, as in the official zero-shot embedding).
        min_coverage
            Minimum fraction of the AnnData's genes found in the checkpoint vocabulary.
        **kwargs
            Other constructor arguments (e.g. ``include_zero_gene``).

        """
        ckpt = read_scgpt_checkpoint(path)
        config = {k: v for k, v in ckpt.config.items() if k != "pad_token"}  # the vocab has it
        if max_seq_len is not None:
            config["max_seq_len"] = max_seq_len
        config.update(kwargs)
        model = cls(adata, vocab=ckpt.vocab, min_coverage=min_coverage, **config)
        load_scgpt_state_dict(model.module, ckpt.state_dict)
        model.module.eval()
        model.is_trained_ = True
        model.checkpoint_ = {"format": "scgpt", "path": os.fspath(path)}
        return model

    # ------------------------------------------------------------------ tokens
    def _gene_token_ids(self, adata: AnnData) -> np.ndarray:
        """Vocabulary id of every column of ``adata`` (-1 where unmatched)."""
        return match_genes(
            self._gene_names(adata), self.vocab, min_coverage=self.min_coverage
        ).token_ids

    def _tokenizer(self, adata: AnnData, *, random_truncation: bool = False) -> _ScGPTTokenizer:
        return _ScGPTTokenizer(self._gene_token_ids(adata), self._token_kwargs, random_truncation)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        mode: Literal["pretrain", "finetune"] = "pretrain",
        freeze_layers: int | Literal["all"] = 0,
        class_weight: str | Mapping[str, float] | None = None,
        batch_size: int = 32,
        lr: float = 1e-4,
        warmup_ratio: float = 0.1,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **kwargs,
    ):
        """Masked value pretraining (and MVC), or cell-type annotation fine-tuning.

        Each cell is tokenized on the fly (a new random gene subset each epoch for cells longer
        than ``max_seq_len``). ``mode="pretrain"`` masks ``mask_ratio`` of each cell's gene
        tokens with ``mask_value`` and learns to predict their binned values from the rest
        (expression decoder) and from the cell embedding (MVC decoder). ``mode="finetune"``
        trains the classification head on the ``<cls>`` embedding with cross-entropy on the
        registered ``labels_key``, without masking (the official annotation recipe, ``CLS``
        objective only); a model without a head gets a fresh one first. Training runs through
        Lightning, so ``accelerator``, ``devices``, ``strategy`` and ``precision`` work as in
        any scvi-tools model.

        Parameters
        ----------
        max_epochs
            Passes through the data; scvi-tools' heuristic when ``None``.
        mode
            ``"pretrain"`` or ``"finetune"``.
        freeze_layers
            Keep the first ``freeze_layers`` transformer layers fixed (the embeddings still
            train); ``"all"`` trains only the classification head.
        class_weight
            Fine-tuning only: ``"balanced"`` weights each class's cross-entropy by
            ``n_cells / (n_classes * n_cells_in_class)``, or a mapping label -> weight.
        batch_size
            Cells per minibatch.
        lr
            Peak learning rate of AdamW.
        warmup_ratio
            Fraction of steps used for linear warm-up before the decay.
        plan_kwargs
            Other :class:`~cellformers.train.PretrainingPlan` arguments (e.g.
            ``lr_schedule="step"`` for the official per-epoch decay, ``step_gamma=0.9``).
        datasplitter_kwargs
            Passed to scvi-tools' ``DataSplitter`` (e.g. ``num_workers``).
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` and Lightning's
            ``Trainer`` (``train_size``, ``accelerator``, ``max_time`` …). With
            ``early_stopping=True`` fine-tuning stops when the validation macro-F1
            (``macro_f1_validation``) stops improving.

        """
        plan_kwargs = {"lr": lr, "warmup_ratio": warmup_ratio, **(plan_kwargs or {})}
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

    def _training_tokenizer(self) -> _ScGPTTokenizer:
        return self._tokenizer(self.adata, random_truncation=True)

    def _backbone_layers(self):
        return self.module.transformer_encoder.layers

    def _head_modules(self):
        return [self.module.cls_decoder]

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.classify(tensors["genes"], tensors["values"])

    def _prepare_classifier(self, n_classes: int) -> None:
        if self.module.n_labels == 0:
            kwargs = {
                **self.init_params_.get("non_kwargs", {}),
                **self.init_params_.get("kwargs", {}),
            }
            module = self._module_cls(
                len(self.vocab),
                pad_id=self.vocab.pad_id,
                **{k: kwargs[k] for k in _MODULE_ARGS if k in kwargs},
                n_labels=n_classes,
            )
            load_scgpt_state_dict(module, self.module.state_dict(), init_missing_head=True)
            self._replace_module(module, n_labels=n_classes)
            self._model_summary_string += f", {n_classes}-class head"
        super()._prepare_classifier(n_classes)

    # ------------------------------------------------------------------ embeddings
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int | None = None,
        pooling: Literal["cls", "mean"] = "cls",
    ) -> np.ndarray:
        """Cell embeddings, one unit-norm row per cell.

        ``pooling="cls"`` is the official scGPT cell embedding (the ``<cls>`` token's final
        hidden state, L2-normalised, as ``scgpt.tasks.embed_data`` returns it);
        ``pooling="mean"`` averages the gene tokens' hidden states (``<cls>`` and padding
        excluded) and normalises. Cells are batched by token length, and each cell's embedding
        depends only on that cell, whatever the batch size or cell order.

        Parameters
        ----------
        adata
            AnnData to embed; any gene set works (genes are matched to the vocabulary). Defaults
            to the AnnData the model was built with.
        indices
            Cells to embed (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64).
        pooling
            ``"cls"`` or ``"mean"``.

        Returns
        -------
        Array of shape ``(n_cells, d_model)``, float32.

        """
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}.")

        def embed(tokens: dict[str, torch.Tensor]) -> torch.Tensor:
            genes, values = tokens["genes"], tokens["values"]
            if pooling == "cls":
                emb = self.module.cell_embedding(genes, values)
            else:
                hidden = self.module.encode(genes, values)
                keep = (genes != self.vocab.pad_id).unsqueeze(-1).to(hidden.dtype)
                keep[:, 0] = 0  # <cls>
                emb = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
            return F.normalize(emb, dim=-1)

        return self._map_cells(adata, indices, batch_size, embed)
