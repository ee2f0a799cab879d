"""scGPT as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from uuid import uuid4

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.utils import setup_anndata_dsp

from ..genes import GeneVocab, match_genes
from ..module import SCGPTModule
from ..pretrained import load_scgpt_state_dict, read_scgpt_checkpoint, resolve_pretrained
from ..tokenize import scgpt_sequence_lengths, tokenize_scgpt
from ._base import _SCVI_UUID_KEY, FoundationModelBase, _resolve_indices

logger = logging.getLogger(__name__)

#: SCGPTModule options that read batch labels.
_BATCH_OPTIONS = ("use_batch_labels", "domain_spec_batchnorm", "do_dab")
#: Parameters that grow by one row per new batch label in query mapping.
_BATCH_ROWS = (
    "batch_encoder.embedding.weight",
    "grad_reverse_discriminator.out_layer.weight",
    "grad_reverse_discriminator.out_layer.bias",
)


@dataclass(frozen=True)
class _ScGPTTokenizer:
    """Picklable scGPT tokenizer bound to one AnnData's column -> token map.

    ``lengths`` gives token counts for length bucketing; calling it returns the arrays the
    module reads. With ``random_truncation`` (training), cells longer than ``max_seq_len`` get a
    fresh random gene subset on every call, drawn from a generator seeded by torch's RNG so that
    runs are reproducible under a fixed seed. With ``batch_codes`` (models that read batch
    labels) the AnnData's registered batch codes are requested through ``registry_keys`` and
    returned under the same key, translated to the model's batch labels (``-1``: unknown to
    the model, an error).
    """

    gene_ids: np.ndarray
    options: dict
    random_truncation: bool = False
    batch_codes: np.ndarray | None = None
    batch_names: tuple[str, ...] = ()

    @property
    def registry_keys(self) -> tuple[str, ...]:
        return () if self.batch_codes is None else (REGISTRY_KEYS.BATCH_KEY,)

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return scgpt_sequence_lengths(
            X,
            self.gene_ids,
            self.options["max_seq_len"],
            include_zero_gene=self.options["include_zero_gene"],
        )

    def __call__(self, X: sp.csr_matrix, **fields) -> dict[str, np.ndarray]:
        options = dict(self.options)
        if self.random_truncation:
            seed = int(torch.randint(0, 2**62, ()).item())
            options.update(truncation="random", rng=np.random.default_rng(seed))
        tokens = tokenize_scgpt(X, self.gene_ids, **options)
        out = {"genes": tokens.genes, "values": tokens.values}
        if self.batch_codes is not None:
            raw = np.asarray(fields[REGISTRY_KEYS.BATCH_KEY]).reshape(-1).astype(np.int64)
            codes = self.batch_codes[raw]
            if (codes < 0).any():
                unknown = sorted({self.batch_names[i] for i in raw[codes < 0]})
                raise ValueError(
                    f"Batch categories {unknown} are unknown to the model; map the query with "
                    "SCGPT.load_query_data(adata, model) first."
                )
            out[REGISTRY_KEYS.BATCH_KEY] = codes
        return out


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
    use_batch_labels
        scGPT's integration recipe: embed each cell's batch label (``batch_encoder``) and
        condition the expression and MVC decoders on it. Needs ``batch_key`` in
        :meth:`setup_anndata`.
    domain_spec_batchnorm
        Normalise the input embeddings with batch norm statistics of each cell's batch label
        (DSBN, ``dsbn``) before the transformer; the cell embeddings then depend on the batch
        labels. Needs ``batch_key``.
    do_dab
        Train an adversarial batch discriminator on the cell embedding behind a gradient
        reversal (DAB), which pushes batch information out of the embedding. Needs
        ``batch_key``.
    ecs_threshold
        Add the elastic cell similarity loss with this threshold (the recipe uses 0.8);
        `None` leaves it out.
    ecs_weight
        Weight of the ECS loss (official 10).
    dab_weight
        Weight of the discriminator's cross-entropy (official 1).
    explicit_zero_prob
        Zero-probability heads on both decoders, trained with the Bernoulli likelihood of the
        non-zero pattern (the recipe uses them).
    batch_categories
        Batch categories in the order of the network's batch labels. By default the
        categories registered with ``batch_key``; any AnnData's cells are mapped to these by
        name, so a query must use the same names (new names need :meth:`load_query_data`).

    Examples
    --------
    >>> import cellformers as cf
    >>> adata = cf.data.pbmc68k_reduced_counts()[::4].copy()  # 175 cells for a quick run
    >>> cf.model.SCGPT.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    >>> model = cf.model.SCGPT(adata, d_model=32, nhead=4, d_hid=32, nlayers=2, max_seq_len=128)
    >>> model.train(max_epochs=2)
    >>> adata.obsm["X_scgpt"] = model.get_latent_representation()

    Batch integration as in scGPT's integration recipe (on pretrained weights, the batch parts
    start fresh):

    >>> cf.model.SCGPT.setup_anndata(adata, layer="counts", batch_key="batch")
    >>> model = cf.model.SCGPT.from_pretrained(
    ...     "scGPT_human", adata, use_batch_labels=True, domain_spec_batchnorm=True,
    ...     do_dab=True, ecs_threshold=0.8, include_zero_gene=True
    ... )
    >>> model.train(max_epochs=15)
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
        use_batch_labels: bool = False,
        domain_spec_batchnorm: bool = False,
        do_dab: bool = False,
        ecs_threshold: float | None = None,
        ecs_weight: float = 10.0,
        dab_weight: float = 1.0,
        explicit_zero_prob: bool = False,
        batch_categories: Sequence[str] | None = None,
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
        uses_batches = use_batch_labels or domain_spec_batchnorm or do_dab
        batch_categories = self._resolve_batch_categories(uses_batches, batch_categories)
        self.batch_categories = batch_categories
        self._module_options = {
            "d_model": d_model,
            "nhead": nhead,
            "d_hid": d_hid,
            "nlayers": nlayers,
            "dropout": dropout,
            "pad_value": pad_value,
            "mask_value": mask_value,
            "mask_ratio": mask_ratio,
            "do_mvc": do_mvc,
            "n_layers_cls": n_layers_cls,
            "n_batch": len(batch_categories or ()),
            "use_batch_labels": use_batch_labels,
            "domain_spec_batchnorm": domain_spec_batchnorm,
            "do_dab": do_dab,
            "ecs_threshold": ecs_threshold,
            "ecs_weight": ecs_weight,
            "dab_weight": dab_weight,
            "explicit_zero_prob": explicit_zero_prob,
        }
        self.module = self._module_cls(
            len(gene_vocab), pad_id=gene_vocab.pad_id, n_labels=n_labels, **self._module_options
        )
        self._query_hooks: list = []  # gradient masks of a query model (load_query_data)
        if adata is not None:
            self._gene_token_ids(adata)  # coverage check before any work starts
        self._model_summary_string = (
            f"SCGPT with d_model={d_model}, nhead={nhead}, nlayers={nlayers}, "
            f"vocabulary of {len(gene_vocab)} tokens, n_bins={n_bins}, max_seq_len={max_seq_len}"
        )
        if uses_batches:
            parts = [k for k in _BATCH_OPTIONS if self._module_options[k]]
            self._model_summary_string += (
                f", {len(batch_categories)} batch labels ({', '.join(parts)})"
            )
        self.init_params_ = self._get_init_params(locals())

    def _resolve_batch_categories(
        self, uses_batches: bool, batch_categories: Sequence[str] | None
    ) -> list[str] | None:
        """Return the network's batch labels: ``batch_categories`` or the registered ones."""
        if not uses_batches:
            if batch_categories is not None:
                raise ValueError(
                    "batch_categories applies to models with use_batch_labels, "
                    "domain_spec_batchnorm or do_dab."
                )
            return None
        if self.registry_["setup_args"].get("batch_key") is None:
            raise ValueError(
                "use_batch_labels, domain_spec_batchnorm and do_dab read each cell's batch: "
                "register it with `SCGPT.setup_anndata(adata, batch_key=...)` and build the "
                "model again."
            )
        if batch_categories is None:
            batch_categories = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY][
                "state_registry"
            ]["categorical_mapping"]
        names = [str(c) for c in batch_categories]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"batch_categories must be unique and not empty, got {names}.")
        return names

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
        *,
        spatial_key: str | None = None,
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

        A checkpoint saved by scGPT's integration recipe (``batch_encoder``, ``dsbn``,
        ``grad_reverse_discriminator``, zero-probability heads) builds a model with the same
        options; its batch rows are named by ``batch_categories`` or, when the AnnData
        registers as many batch categories as the checkpoint has rows, by the registered ones
        in their (sorted) order, which is the order the recipe's category codes follow.
        Passing ``use_batch_labels``, ``domain_spec_batchnorm``, ``do_dab`` or
        ``explicit_zero_prob`` for a checkpoint without these parts starts integration
        fine-tuning as the recipe does: the backbone loads strictly, the new parts (and the
        decoders' first layers, whose input grows to ``2 * d_model``) start fresh.

        Parameters
        ----------
        path
            Registered name (:func:`cellformers.pretrained.available`, e.g. ``"scgpt-human"``, downloaded once with pinned sha256), checkpoint folder, or Hugging Face repository id.
        adata
            AnnData registered with :meth:`setup_anndata`.
        max_seq_len
            Maximum tokens per cell; defaults to the checkpoint's ``max_seq_len`` (1200 for the
            whole-human model, as in the official zero-shot embedding).
        min_coverage
            Minimum fraction of the AnnData's genes found in the checkpoint vocabulary.
        **kwargs
            Other constructor arguments (e.g. ``include_zero_gene``, ``use_batch_labels``,
            ``batch_categories``).

        """
        path, _ = resolve_pretrained(path, cls)
        ckpt = read_scgpt_checkpoint(path)
        config = {k: v for k, v in ckpt.config.items() if k != "pad_token"}  # the vocab has it
        n_batch = config.pop("n_batch", 0)
        if max_seq_len is not None:
            config["max_seq_len"] = max_seq_len
        config.update(kwargs)
        if n_batch and config.get("batch_categories") is None:
            registered = cls._registered_batches(adata)
            if registered is None or len(registered) != n_batch:
                found = "none" if registered is None else f"{len(registered)}: {registered}"
                raise ValueError(
                    f"The checkpoint was fine-tuned with {n_batch} batch labels, but the AnnData "
                    f"registers {found}. Pass `batch_categories=[...]` naming the checkpoint's "
                    "batch labels in order (and register the batch column with "
                    "`SCGPT.setup_anndata(adata, batch_key=...)`)."
                )
            logger.info(
                "The checkpoint's %d batch labels are taken to be the registered categories %s.",
                n_batch,
                registered,
            )
        model = cls(adata, vocab=ckpt.vocab, min_coverage=min_coverage, **config)
        fresh_parts = [
            k for k in (*_BATCH_OPTIONS, "explicit_zero_prob") if config[k] and not ckpt.config[k]
        ]
        load_scgpt_state_dict(model.module, ckpt.state_dict, init_batch_modules=bool(fresh_parts))
        model.finetuned_ = any(k.startswith("cls_decoder.") for k in ckpt.state_dict)
        model.module.eval()
        model.is_trained_ = True
        model.checkpoint_ = {"format": "scgpt", "path": os.fspath(path)}
        return model

    @classmethod
    def _registered_batches(cls, adata: AnnData) -> list[str] | None:
        """Batch categories registered for ``adata`` (``None`` without ``batch_key``)."""
        manager = cls._get_most_recent_anndata_manager(adata, required=True)
        if manager.registry["setup_args"].get("batch_key") is None:
            return None
        mapping = manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        return [str(c) for c in mapping]

    # ------------------------------------------------------------------ tokens
    def _gene_token_ids(self, adata: AnnData) -> np.ndarray:
        """Vocabulary id of every column of ``adata`` (-1 where unmatched)."""
        return match_genes(
            self._gene_names(adata), self.vocab, min_coverage=self.min_coverage
        ).token_ids

    def _tokenizer(self, adata: AnnData, *, random_truncation: bool = False) -> _ScGPTTokenizer:
        codes, names = self._batch_codes(adata)
        return _ScGPTTokenizer(
            self._gene_token_ids(adata), self._token_kwargs, random_truncation, codes, names
        )

    # ------------------------------------------------------------------ batches
    def _batch_codes(self, adata: AnnData) -> tuple[np.ndarray | None, tuple[str, ...]]:
        """Map ``adata``'s registered batch codes to the model's batch labels.

        Returns the translation array (``-1`` for categories the model does not know) and the
        AnnData's category names, or ``(None, ())`` for a model without batch labels.
        """
        if self.batch_categories is None:
            return None, ()
        manager = self.get_anndata_manager(adata, required=True)
        if manager.registry["setup_args"].get("batch_key") is None:
            key = self.registry_["setup_args"].get("batch_key")
            raise ValueError(
                "This model reads each cell's batch (use_batch_labels, domain_spec_batchnorm or "
                f"do_dab), but the AnnData has no batch registered: add the column {key!r} to "
                "adata.obs or set it up with `SCGPT.setup_anndata(adata, batch_key=...)`."
            )
        names = tuple(
            str(c) for c in manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        )
        index = {c: i for i, c in enumerate(self.batch_categories)}
        return np.array([index.get(c, -1) for c in names], dtype=np.int64), names

    def _reads_batches(self) -> bool:
        return self.batch_categories is not None

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True) -> AnnData:
        """Validate ``adata``; a query with batch categories the registry lacks is set up anew.

        scvi-tools' transfer of the model's setup refuses new categories with an error about
        ``extend_categories``; setting such a query up with its own registration lets
        :meth:`_check_cells` name the unknown batches instead (and :meth:`load_query_data`
        map them).
        """
        if adata is not None and self.batch_categories is not None and not adata.is_view:
            uuid = adata.uns.get(_SCVI_UUID_KEY)
            own = type(self)._setup_adata_manager_store.get(uuid)
            key = self.registry_["setup_args"].get("batch_key")
            if (own is None or own.adata is not adata) and key in adata.obs:
                registered = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]
                known = {str(c) for c in registered["state_registry"]["categorical_mapping"]}
                if not {str(c) for c in adata.obs[key].unique()} <= known:
                    adata.uns[_SCVI_UUID_KEY] = str(uuid4())
                    setup = getattr(type(self), self.registry_["setup_method_name"])
                    setup(adata, **self._query_setup_args(adata))
        return super()._validate_anndata(adata, copy_if_view)

    def _check_cells(self, adata: AnnData, indices: np.ndarray) -> None:
        """Reject cells whose batch category the model does not know."""
        codes, names = self._batch_codes(adata)
        if codes is None:
            return
        raw = self.get_from_registry(adata, REGISTRY_KEYS.BATCH_KEY)
        raw = np.asarray(raw).reshape(-1)[indices].astype(np.int64)
        bad = codes[raw] < 0
        if bad.any():
            unknown = sorted({names[i] for i in raw[bad]})
            raise ValueError(
                f"{int(bad.sum())} cells belong to batch categories {unknown} that the model "
                f"does not know (it knows {self.batch_categories}). Map them as a query with "
                "`SCGPT.load_query_data(adata, model)`, which adds and trains their batch "
                "parameters."
            )

    # ------------------------------------------------------------------ training
    _train_summary = (
        "Masked value pretraining (and MVC) with the integration terms, or annotation fine-tuning."
    )
    _train_notes = """
    Each cell is tokenized on the fly (a new random gene subset each epoch for cells longer
    than ``max_seq_len``). ``mode="pretrain"`` masks ``mask_ratio`` of each cell's gene
    tokens with ``mask_value`` and learns to predict their binned values from the rest
    (expression decoder) and from the cell embedding (MVC decoder). ``mode="finetune"``
    trains the classification head on the ``<cls>`` embedding with cross-entropy on the
    registered ``labels_key``, without masking (the official annotation recipe, ``CLS``
    objective only); a model without a head gets a fresh one first. The official per-epoch
    decay is ``plan_kwargs={"lr_schedule": "step", "step_gamma": 0.9}``.

    A model built with the integration options trains them with ``mode="pretrain"`` (on
    pretrained weights, this is scGPT's integration fine-tuning): the masked value losses
    with decoders conditioned on the batch embedding, DSBN, ECS and the adversarial batch
    discriminator, each minibatch's cells using their own batch labels (scGPT's recipe
    draws one batch label per minibatch because its DSBN normalises a minibatch with its
    first cell's label; here each cell is normalised with its own label's statistics, so
    mixed minibatches are fine). A query model from :meth:`load_query_data` trains only
    the parameters of its new batch labels, with AdamW's weight decay off (its default
    there) so that the reference rows stay bit-identical.
    """

    def _train_default(self, name: str, value, mode: str):
        if name == "weight_decay" and value is None and self._query_hooks:
            return 0.0
        return super()._train_default(name, value, mode)

    def _train(self, *, mode: str, **kwargs):
        if self._query_hooks:
            if mode != "pretrain":
                raise ValueError(
                    "A query model from load_query_data trains only its new batch parameters "
                    "(mode='pretrain')."
                )
            if kwargs["plan_kwargs"]["weight_decay"] != 0.0:
                raise ValueError(
                    "A query model trains with weight_decay=0: AdamW's decay would also move "
                    "the frozen reference rows of the batch parameters."
                )
            if not any(p.requires_grad for p in self.module.parameters()):
                raise ValueError(
                    "This query model has no trainable parameters: the reference has neither "
                    "a batch encoder (use_batch_labels) nor a batch discriminator (do_dab). Use "
                    "load_query_data(..., unfrozen=True) to fine-tune the whole network."
                )
        # scvi-tools records no history for a model that counts as trained but has none (loaded
        # pretrained weights); let the first training run start the history
        pretrained = self.is_trained_ and self.history_ is None
        if pretrained:
            self.is_trained_ = False
        try:
            return super()._train(mode=mode, **kwargs)
        finally:
            if pretrained:
                self.is_trained_ = True

    def _training_tokenizer(self) -> _ScGPTTokenizer:
        return self._tokenizer(self.adata, random_truncation=True)

    def _backbone_layers(self):
        return self.module.transformer_encoder.layers

    def _head_modules(self):
        return [self.module.cls_decoder]

    def _class_logits(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.classify(
            tensors["genes"], tensors["values"], batch_labels=tensors.get(REGISTRY_KEYS.BATCH_KEY)
        )

    def _prepare_classifier(self, n_classes: int) -> None:
        if self.module.n_labels == 0:
            module = self._module_cls(
                len(self.vocab),
                pad_id=self.vocab.pad_id,
                n_labels=n_classes,
                **self._module_options,
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
        *,
        empty_cells: Literal["raise", "nan"] = "raise",
    ) -> np.ndarray:
        """Cell embeddings, one unit-norm row per cell.

        ``pooling="cls"`` is the official scGPT cell embedding (the ``<cls>`` token's final
        hidden state, L2-normalised, as ``scgpt.tasks.embed_data`` returns it);
        ``pooling="mean"`` averages the gene tokens' hidden states (``<cls>`` and padding
        excluded) and normalises. Cells are batched by token length, and each cell's embedding
        depends only on that cell, whatever the batch size or cell order. A model with
        domain-specific batch norm embeds each cell with its own batch label's statistics (the
        AnnData's batch categories are matched to the model's by name).

        A model built from scratch and pretrained briefly gives nearly parallel embeddings: a
        vector shared by all cells plus a small cell-specific part (mean cosine similarity
        between cells above 0.99 on CellBench after 10 epochs; ``benchmarks/cls_collapse.py``
        in the repository). Neighbour searches still separate the cells, but a linear model
        with default regularisation sees almost nothing: standardise the dimensions first
        (e.g. ``sklearn.preprocessing.StandardScaler``), or pretrain much longer.

        Parameters
        ----------
        adata
            AnnData to embed; any gene set works (genes are matched to the vocabulary). Defaults
            to the AnnData the model was built with. A model that reads batch labels needs the
            batch column, with categories the model knows.
        indices
            Cells to embed (positions or boolean mask); all by default.
        batch_size
            Cells per forward pass (default 64).
        pooling
            ``"cls"`` or ``"mean"``.
        empty_cells
            What to do with cells that have no counts in the model's genes (they have no
            tokens): ``"raise"`` (default) an error naming them; ``"nan"`` a warning naming
            them, and NaN rows for them.

        Returns
        -------
        Array of shape ``(n_cells, d_model)``, float32.

        """
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}.")
        if self.batch_categories is not None:
            self._check_if_trained(warn=False)
            adata = self._validate_anndata(adata)
            self._check_cells(adata, _resolve_indices(indices, adata.n_obs))

        return self._map_cells(
            adata,
            indices,
            batch_size,
            lambda t: self._embed(t, pooling=pooling),
            empty_cells=empty_cells,
        )

    def _embed(self, tokens: dict[str, torch.Tensor], pooling: str = "cls") -> torch.Tensor:
        """Unit-norm cell embeddings of a token batch (``<cls>`` or mean of the gene tokens)."""
        genes, values = tokens["genes"], tokens["values"]
        batch_labels = tokens.get(REGISTRY_KEYS.BATCH_KEY)
        if pooling == "cls":
            emb = self.module.cell_embedding(genes, values, batch_labels=batch_labels)
        else:
            hidden = self.module.encode(genes, values, batch_labels=batch_labels)
            keep = (genes != self.vocab.pad_id).unsqueeze(-1).to(hidden.dtype)
            keep[:, 0] = 0  # <cls>
            emb = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return F.normalize(emb, dim=-1)

    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._embed(tensors)

    def _cell_embedding_dim(self) -> int:
        return self.module.d_model

    def _perturbation_expression(self, adata: AnnData):
        """Expression-decoder predictions (binned-value units) of the cells' gene tokens.

        scGPT predicts a value for every gene token of a cell (with ``include_zero_gene``, for
        every matched gene); genes that are not among a cell's tokens get no prediction (NaN).
        """
        ids = self._gene_token_ids(adata)
        cols = np.flatnonzero(ids >= 0)
        cols = np.sort(cols[np.unique(ids[cols], return_index=True)[1]])  # first column per gene
        lookup = torch.full((len(self.vocab),), -1, dtype=torch.long)
        lookup[torch.as_tensor(ids[cols])] = torch.arange(len(cols))

        def predict(t: dict[str, torch.Tensor]) -> torch.Tensor:
            batch_labels = t.get(REGISTRY_KEYS.BATCH_KEY)
            inf = self.module.inference(
                t["genes"], t["values"], batch_labels=batch_labels, mask=False
            )
            pred = self.module.generative(
                inf["hidden"],
                inf["cell_emb"],
                inf["gene_embs"],
                batch_labels=inf.get("batch_labels"),
            )["mlm_pred"].float()
            out = pred.new_full((pred.shape[0], len(cols)), float("nan"))
            where = lookup.to(pred.device)[t["genes"].long()]
            keep = where >= 0
            out[keep.nonzero(as_tuple=True)[0], where[keep]] = pred[keep]
            return out

        return predict, self._rna(adata).var_names[cols]

    # ------------------------------------------------------------------ query mapping
    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: SCGPT | str | os.PathLike,
        *,
        unfrozen: bool = False,
    ) -> SCGPT:
        """Map query cells with new batches onto a reference model (scArches-style).

        As :meth:`scvi.model.base.ArchesMixin.load_query_data`: the query's batch categories
        that the reference does not know get new batch parameters (new rows of
        ``batch_encoder.embedding.weight``, new ``dsbn`` domains, new outputs of the
        discriminator's ``out_layer``), everything else is copied from the reference and
        frozen, and :meth:`train` on the returned model then trains only the new batch
        parameters: every other parameter has ``requires_grad=False``, gradient hooks zero the
        reference rows of the three shared tensors (and training runs without weight decay),
        and the reference domains of ``dsbn`` keep their running statistics. Reference cells
        therefore embed identically with the reference and the query model. The freezing
        lasts for this model object; a saved and reloaded query model trains fully.

        Parameters
        ----------
        adata
            Query AnnData with the reference's batch column (any genes). It is set up with the
            reference's setup arguments unless it was set up already.
        reference_model
            A trained :class:`SCGPT` that reads batch labels (``use_batch_labels``,
            ``domain_spec_batchnorm`` or ``do_dab``), or the folder it was saved in.
        unfrozen
            Train every parameter on the query instead (the new batch parameters still start
            fresh).

        Returns
        -------
        The query model, on the reference's device. It is untrained while the query has new
        batch categories (their statistics and embeddings are fresh).

        """
        if isinstance(reference_model, (str, os.PathLike)):
            reference = cls.load(os.fspath(reference_model))
        elif isinstance(reference_model, cls):
            reference = reference_model
        else:
            raise TypeError(
                f"reference_model must be a {cls.__name__} or a folder it was saved in, got "
                f"{type(reference_model).__name__}."
            )
        if reference.batch_categories is None:
            raise ValueError(
                "The reference model has no batch parameters (use_batch_labels, "
                "domain_spec_batchnorm or do_dab); embed the query with "
                "`reference.get_latent_representation(adata)` instead."
            )
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
        cls._setup_query(adata, reference)
        ref_names = list(reference.batch_categories)
        query_names = cls._registered_batches(adata) or []
        new = [c for c in query_names if c not in ref_names]
        params = {
            **reference.init_params_.get("non_kwargs", {}),
            **reference.init_params_.get("kwargs", {}),
            "batch_categories": ref_names + new,
        }
        model = cls(adata, **params)
        model.module.load_state_dict(
            cls._grow_batch_rows(reference.module.state_dict(), model.module.state_dict())
        )
        model.module.to(reference.device)
        model.module.eval()
        if not unfrozen:
            model._query_hooks = model.module.train_only_new_batches(len(ref_names))
        model.is_trained_ = not new
        model.finetuned_ = reference.finetuned_
        model._model_summary_string += (
            f"; query model: {len(ref_names)} reference and {len(new)} new batch labels"
        )
        if not new:
            logger.info("The query has no new batch categories: the model equals the reference.")
        if reference.module.n_labels and reference._has_labels():
            ref_labels = [str(x) for x in reference._label_names()]
            if not model._has_labels() or [str(x) for x in model._label_names()] != ref_labels:
                logger.warning(
                    "The classification head is copied from the reference, whose classes are %s; "
                    "predict_celltype on the query model names them by the query's labels.",
                    ref_labels,
                )
        return model

    @classmethod
    def _setup_query(cls, adata: AnnData, reference: SCGPT) -> None:
        """Set ``adata`` up with the reference's setup arguments unless the user did."""
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        own = cls._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if own is not None and own.adata is adata:
            if own.registry["setup_args"].get("batch_key") is None:
                raise ValueError(
                    "The query AnnData was set up without a batch_key; query mapping needs the "
                    "cells' batches."
                )
            return
        args = dict(reference.registry_["setup_args"])
        if args["batch_key"] not in adata.obs:
            raise KeyError(
                f"The query needs the reference's batch column {args['batch_key']!r} in adata.obs."
            )
        if args.get("labels_key") is not None and args["labels_key"] not in adata.obs:
            args["labels_key"] = None
        if uuid is not None:
            adata.uns[_SCVI_UUID_KEY] = str(uuid4())  # registration copied from another AnnData
        getattr(cls, reference.registry_["setup_method_name"])(adata, **args)

    @staticmethod
    def _grow_batch_rows(
        reference: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return the reference weights with the fresh rows of new batch labels appended."""
        merged = dict(fresh)
        for key, value in reference.items():
            target = fresh[key]
            if value.shape != target.shape:
                if key not in _BATCH_ROWS or value.shape[1:] != target.shape[1:]:
                    raise RuntimeError(
                        f"Unexpected shape change of {key}: {tuple(value.shape)} -> "
                        f"{tuple(target.shape)}."
                    )
                value = torch.cat([value.to(target.device), target[value.shape[0] :]])
            merged[key] = value.to(target.device)
        return merged
