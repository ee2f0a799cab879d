"""scFoundation as an scvi-tools model class."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS, settings
from scvi.data.fields import CategoricalObsField
from scvi.dataloaders._data_splitting import validate_data_split
from scvi.utils import setup_anndata_dsp

from ..genes import (
    GeneVocab,
    ensembl_to_symbol,
    match_genes,
    read_gene_list,
    strip_ensembl_version,
    symbol_to_ensembl,
)
from ..module import SCFoundationModule, gather_scfoundation_tokens
from ..pretrained import (
    load_scfoundation_state_dict,
    read_scfoundation_checkpoint,
    resolve_pretrained,
)
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
PERTURBATION_KEY = "perturbation"  # registry key of the per-cell perturbation labels
_COMBINATION_SEP = "+"
_UNMATCHED = ("warn", "exclude", "error")  # setup_anndata's unmatched_perturbations
_MAX_REDRAWS = 10  # draws of another control for a control cell before giving up
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
    "perturbation_flags",
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


def _split_perturbation(name: str, control_label: str | None) -> tuple[str, ...]:
    """Targets of a perturbation label: ``()`` for the control, else the ``"+"``-joined names."""
    if name == control_label:
        return ()
    parts = tuple(p.strip() for p in name.split(_COMBINATION_SEP))
    if any(not p for p in parts):
        raise ValueError(
            f"Perturbation {name!r} has an empty target; name a perturbation by its target "
            f"gene or join several with {_COMBINATION_SEP!r} (e.g. 'STAT1+IRF1')."
        )
    if control_label is not None and control_label in parts:
        raise ValueError(
            f"Perturbation {name!r} combines the control label {control_label!r} with targets; "
            "the control is the unperturbed cell and cannot be part of a combination."
        )
    return parts


def _unmatched_labels(labels, control_label: str, genes) -> list[str]:
    """Perturbation labels with a target that names no gene.

    A target names a gene when it is one of ``genes`` (the data's gene names) or a human gene
    symbol or Ensembl ID of the GENCODE table (a target the data do not measure).
    """
    genes = set(map(str, genes))
    targets = {t for label in labels for t in _split_perturbation(str(label), control_label)}
    rest = np.asarray(sorted(targets - genes), dtype=object)
    if rest.size == 0:
        return []
    known = (symbol_to_ensembl(rest) != None) | (  # noqa: E711 (element-wise)
        ensembl_to_symbol(strip_ensembl_version(rest)) != None  # noqa: E711
    )
    unknown = set(rest[~known])
    return sorted(
        str(label)
        for label in labels
        if unknown.intersection(_split_perturbation(str(label), control_label))
    )


def _same_rows(A: sp.csr_matrix, B: sp.csr_matrix) -> np.ndarray:
    """Whether each row of ``A`` equals the same row of ``B`` (boolean per row)."""
    diff = sp.csr_matrix(A - B)
    diff.eliminate_zeros()
    return np.diff(diff.indptr) == 0


@dataclass(frozen=True)
class _PerturbationPairs:
    """Training minibatches for perturbation training: control inputs paired with target cells.

    Each minibatch cell is a target. Its input is a control cell drawn uniformly from
    ``controls`` with torch's global generator (so scvi-tools' seed controls the pairing); a
    control target gets another control (one whose profile differs, redrawn up to
    ``_MAX_REDRAWS`` times). The inputs are the usual scFoundation tokens with ``T = S``, the
    flags are the target genes of the target cell's perturbation (none for a control), and the
    targets are the target cells' normalised expression in the model's gene order.
    """

    tokenizer: _SCFoundationTokenizer
    controls: sp.csr_matrix
    control_totals: np.ndarray | None
    flag_table: np.ndarray  # bool [n perturbation categories, n_genes]
    control_code: int
    measured: np.ndarray  # bool [n_genes]
    registry_keys: tuple[str, ...] = (PERTURBATION_KEY,)

    def lengths(self, X: sp.csr_matrix) -> np.ndarray:
        return self.tokenizer.lengths(X)

    def _draw(self, n: int) -> np.ndarray:
        return torch.randint(self.controls.shape[0], (n,)).numpy()

    def __call__(
        self,
        X: sp.csr_matrix,
        perturbation: np.ndarray,
        total_counts: np.ndarray | None = None,
    ) -> dict:
        X = sp.csr_matrix(X)
        codes = np.asarray(perturbation).reshape(-1).astype(np.int64)
        draw = self._draw(X.shape[0])
        rows = np.flatnonzero(codes == self.control_code)
        for _ in range(_MAX_REDRAWS):
            same = rows[_same_rows(self.controls[draw[rows]], X[rows])]
            if not same.size:
                break
            draw[same] = self._draw(same.size)
        totals = None if self.control_totals is None else self.control_totals[draw]
        inputs = self.tokenizer(self.controls[draw], total_counts=totals)
        tokens = self.tokenizer(X, total_counts=total_counts)
        lengths = np.asarray(tokens["lengths"])
        steps = np.arange(tokens["values"].shape[1])[None, :]
        real = steps < (lengths - 2)[:, None]  # gene tokens, not T, S or padding
        cells = np.nonzero(real)[0]
        target = np.zeros((X.shape[0], self.measured.size), dtype=np.float32)
        target[cells, np.asarray(tokens["positions"])[real]] = np.asarray(tokens["values"])[real]
        return {
            **inputs,
            "flags": self.flag_table[codes],
            "target": target,
            "measured": np.broadcast_to(self.measured, target.shape).copy(),
        }


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
        for this gene set, to train from scratch. With a registered ``perturbation_key`` the
        default list also holds, after the data's genes, the perturbation targets that the
        data do not measure (in the order of the perturbation categories), so that every
        registered perturbation can be flagged (see :meth:`predict_perturbation`).
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
    perturbation_flags
        Build the perturbation-flag embedding (scGPT's ``pert_encoder``);
        ``train(mode="perturbation")`` adds it when needed.

    Examples
    --------
    Zero-shot embeddings with the published weights (``models.ckpt`` and the gene index, from
    the scFoundation release):

    >>> import cellformers as cf
    >>> adata = cf.data.cellbench_2platform()
    >>> cf.model.SCFoundation.setup_anndata(adata)  # raw counts
    >>> model = cf.model.SCFoundation.from_pretrained(
    ...     "models.ckpt", adata, gene_list="OS_scRNA_gene_index.19264.tsv"
    ... )
    >>> adata.obsm["X_scfoundation"] = model.get_latent_representation()  # 3,072-d

    A perturbation-response predictor (scGPT's perturbation recipe on this network), trained
    from scratch on a CRISPR screen:

    >>> import cellformers as cf
    >>> adata = cf.data.papalexi_eccite_lowmoi()[::30].copy()  # 540 cells for a quick run
    >>> cf.model.SCFoundation.setup_anndata(
    ...     adata, perturbation_key="perturbation", control_label="non-targeting"
    ... )
    >>> model = cf.model.SCFoundation(
    ...     adata, encoder_dim=32, encoder_depth=2, encoder_heads=4, decoder_dim=32, decoder_depth=1
    ... )
    >>> model.train(mode="perturbation", train_perturbations=["STAT1", "JAK2"], max_epochs=2)
    >>> predicted = model.predict_perturbation(["IRF1", "STAT1+JAK2"])  # perturbations x genes

    """

    _module_cls = SCFoundationModule
    perturbation_trained_ = False  # whether train(mode="perturbation") has run
    train_perturbations_: list[str] | None = None  # perturbations of the last such run

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
        perturbation_flags: bool = False,
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
            gene_list += [t for t in self._registered_targets(adata) if t not in set(names)]
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
        perturbation_key: str | None = None,
        control_label: str | None = None,
        *,
        unmatched_perturbations: Literal["warn", "exclude", "error"] = "warn",
        spatial_key: str | None = None,
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
        perturbation_key
            Column of ``adata.obs`` with each cell's perturbation, for perturbation-response
            training (``train(mode="perturbation")``) and :meth:`predict_perturbation`: the
            control label, or the target gene, or several targets joined by ``"+"``
            (``"STAT1+IRF1"``). Targets are meant to be gene names of the data; a target the
            data do not measure is accepted as long as the model's gene list holds it (a model
            built from scratch adds it to its default list).
        control_label
            Label of the unperturbed (control) cells in ``adata.obs[perturbation_key]``, e.g.
            ``"non-targeting"``; required with ``perturbation_key``.
        unmatched_perturbations
            What to do with labels whose target names no gene: neither a gene of the data nor
            a human gene symbol or Ensembl ID (e.g. ``"none"`` for cells without a guide, or
            guide IDs). ``"warn"`` (default): a warning lists them, and they are kept as gene
            targets (a model built from scratch adds them to its gene list); ``"exclude"``: a
            warning lists them, their cells are left out of perturbation training (they are
            not controls either) and :meth:`predict_perturbation` refuses them; ``"error"``:
            an error lists them.
        spatial_key
            Key of ``adata.obsm`` with each cell's 2-D or 3-D coordinates (``"spatial"`` in
            squidpy and spatialdata tables); checked (one finite row per cell) and registered.

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
        if (perturbation_key is None) != (control_label is None):
            raise ValueError(
                "perturbation_key and control_label go together: name the adata.obs column "
                "with each cell's perturbation and the label of its control cells."
            )
        if unmatched_perturbations not in _UNMATCHED:
            raise ValueError(
                f"unmatched_perturbations must be one of {_UNMATCHED}, got "
                f"{unmatched_perturbations!r}."
            )
        if perturbation_key is not None:
            cls._check_perturbations(
                adata, perturbation_key, control_label, gene_key, unmatched_perturbations
            )
        setup_method_args = cls._get_setup_method_args(**locals())
        extra = []
        if perturbation_key is not None:
            extra.append(CategoricalObsField(PERTURBATION_KEY, perturbation_key))
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
            spatial_key=spatial_key,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_key=gene_key,
            is_count_data=pre_normalized == "F",
            extra_fields=extra,
            **kwargs,
        )

    @staticmethod
    def _check_perturbations(
        adata: AnnData,
        perturbation_key: str,
        control_label: str,
        gene_key: str | None,
        unmatched: str = "warn",
    ) -> None:
        """Check the perturbation labels before registration (see :meth:`setup_anndata`)."""
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}.")
        if perturbation_key not in adata.obs:
            raise KeyError(
                f"perturbation_key {perturbation_key!r} is not a column of adata.obs "
                f"(columns: {list(adata.obs.columns)[:10]})."
            )
        labels = adata.obs[perturbation_key]
        if labels.isna().any():
            raise ValueError(
                f"adata.obs[{perturbation_key!r}] has {int(labels.isna().sum())} missing "
                "label(s); give every cell its perturbation or the control label, or remove "
                "those cells."
            )
        names = pd.unique(labels.astype(str))
        if str(control_label) not in set(names):
            raise ValueError(
                f"control_label {control_label!r} is not a label of adata.obs"
                f"[{perturbation_key!r}] (labels: {sorted(names)[:10]}); pass the label of the "
                "control cells, e.g. 'non-targeting'."
            )
        targets = {t for name in names for t in _split_perturbation(name, str(control_label))}
        if gene_key is not None and gene_key not in adata.var:
            raise KeyError(f"gene_key {gene_key!r} is not a column of adata.var.")
        genes = adata.var_names if gene_key is None else adata.var[gene_key]
        unmeasured = sorted(targets - set(genes.astype(str)))
        if unmeasured:
            logger.info(
                "%d perturbation target(s) are not among the data's genes (e.g. %s); they can "
                "be flagged only where the model's gene list holds them.",
                len(unmeasured),
                ", ".join(unmeasured[:10]),
            )
        bad = _unmatched_labels(names, str(control_label), genes.astype(str))
        if not bad:
            return
        what = (
            f"{len(bad)} label(s) of adata.obs[{perturbation_key!r}] name no gene (neither a gene "
            f"of the data nor a human gene symbol or Ensembl ID): {bad[:10]}"
        )
        if unmatched == "error":
            raise ValueError(
                f"{what}. Pass the label of the unperturbed cells as control_label, use the "
                "column of target genes as perturbation_key, or pass "
                "unmatched_perturbations='exclude' to leave their cells out."
            )
        if unmatched == "exclude":
            warnings.warn(
                f"{what}; their cells are left out of perturbation training and prediction.",
                UserWarning,
                stacklevel=3,
            )
            return
        warnings.warn(
            f"{what}. They are treated as gene targets (a model built from scratch adds them to "
            "its gene list). If they are not gene perturbations (cells without a guide, guide "
            "IDs), pass unmatched_perturbations='exclude' to leave their cells out, or use the "
            "column of target genes.",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ pretrained weights
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: AnnData,
        *,
        gene_list: Sequence[str] | str | os.PathLike | None = None,
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
            Registered name (:func:`cellformers.pretrained.available`, e.g. ``"scfoundation"``, downloaded once with pinned sha256), checkpoint file, or Hugging Face repository id.
        adata
            AnnData registered with :meth:`setup_anndata`.
        gene_list
            The checkpoint's ordered gene list (``OS_scRNA_gene_index.19264.tsv`` for the
            published model; it is not shipped with the weights). Registered names bring it.
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
        path, files = resolve_pretrained(path, cls)
        gene_list = files.get("gene_list") if gene_list is None else gene_list
        if gene_list is None:
            raise ValueError(
                "Pass the checkpoint's ordered gene list as `gene_list=` "
                "(OS_scRNA_gene_index.19264.tsv for the published models)."
            )
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

    def _map_tokens(
        self,
        adata,
        indices,
        batch_size,
        fn,
        *,
        target_depth=None,
        reduce=False,
        empty_cells="raise",
    ):
        """:meth:`_map_cells` with a per-call ``target_depth``."""
        if target_depth is not None:
            _parse_target_depth(target_depth)
        previous = self.target_depth
        self.target_depth = previous if target_depth is None else target_depth
        try:
            return self._map_cells(
                adata, indices, batch_size, fn, reduce=reduce, empty_cells=empty_cells
            )
        finally:
            self.target_depth = previous

    # ------------------------------------------------------------------ perturbations
    def _query_setup_args(self, adata: AnnData | None) -> dict:
        """Return the query setup arguments, without a perturbation column ``adata`` lacks."""
        args = super()._query_setup_args(adata)
        key = args.get("perturbation_key")
        if adata is not None and key is not None and key not in adata.obs:
            args["perturbation_key"] = args["control_label"] = None
        return args

    def _perturbation_setup(self) -> tuple[str, str]:
        """``(perturbation_key, control_label)`` of the model's AnnData, or a clear error."""
        key = self._setup_arg(self.adata, "perturbation_key")
        if key is None:
            raise ValueError(
                "No perturbations are registered: set up the AnnData with "
                "`SCFoundation.setup_anndata(adata, perturbation_key=..., control_label=...)` "
                "and build the model on it."
            )
        return key, str(self._setup_arg(self.adata, "control_label"))

    def _registered_targets(self, adata: AnnData) -> list[str]:
        """Targets of the registered perturbation labels, in category order (none if unset)."""
        manager = self.get_anndata_manager(adata, required=True)
        if PERTURBATION_KEY not in manager.data_registry:
            return []
        control = str(manager.registry["setup_args"]["control_label"])
        names = manager.get_state_registry(PERTURBATION_KEY).categorical_mapping
        excluded = self._excluded_perturbations(adata)
        targets = [
            t
            for name in names
            if str(name) not in excluded
            for t in _split_perturbation(str(name), control)
        ]
        return list(dict.fromkeys(targets))

    def _excluded_perturbations(self, adata: AnnData) -> set[str]:
        """Labels left out with ``unmatched_perturbations="exclude"`` (they name no gene)."""
        manager = self.get_anndata_manager(adata, required=True)
        args = manager.registry["setup_args"]
        if PERTURBATION_KEY not in manager.data_registry or (
            args.get("unmatched_perturbations") != "exclude"
        ):
            return set()
        names = manager.get_state_registry(PERTURBATION_KEY).categorical_mapping
        return set(_unmatched_labels(names, str(args["control_label"]), self._gene_names(adata)))

    def _target_positions(self, targets: Sequence[str]) -> dict[str, int]:
        """Gene-list position of each target (-1 when the list lacks it).

        A target that is one of the data's genes takes that gene's position (names matched
        as for the data, symbols and Ensembl IDs converted); another is looked up in the gene
        list itself.
        """
        targets = list(dict.fromkeys(targets))
        if not targets:
            return {}
        names = np.asarray(self._gene_names(self.adata))
        ids = self._gene_ids(self.adata)
        out = {}
        for t in targets:
            hits = ids[(names == t) & (ids >= 0)]
            out[t] = int(hits[0]) if hits.size else -1
        rest = [t for t in targets if out[t] < 0]
        if rest:
            match = match_genes(rest, self.vocab, min_coverage=0.0, keep_duplicates=True)
            out.update(zip(rest, (int(i) for i in match.token_ids), strict=True))
        return out

    def _resolve_perturbations(self, perturbations, *, what: str) -> tuple[list[str], list]:
        """Names and gene-list positions of perturbations (labels, ``"A+B"`` or tuples)."""
        _, control = self._perturbation_setup()
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        perturbations = list(perturbations)
        if not perturbations:
            raise ValueError(
                f"`{what}` is empty; pass perturbation labels: a target gene, targets joined "
                f"by '+', or the control label {control!r}."
            )
        parsed = []
        for p in perturbations:
            if isinstance(p, str):
                parsed.append((p, _split_perturbation(p, control)))
            else:
                parts = tuple(map(str, p))
                name = _COMBINATION_SEP.join(parts) if parts else control
                parsed.append((name, _split_perturbation(name, control)))
        names = [name for name, _ in parsed]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"`{what}` names perturbations more than once: {dups[:10]}.")
        excluded = sorted(set(names) & self._excluded_perturbations(self.adata))
        if excluded:
            raise ValueError(
                f"`{what}` names labels that name no gene and were excluded in setup "
                f"(unmatched_perturbations='exclude'): {excluded[:10]}."
            )
        positions = self._target_positions([t for _, parts in parsed for t in parts])
        unknown = [name for name, parts in parsed if any(positions[t] < 0 for t in parts)]
        if unknown:
            missing = sorted({t for _, parts in parsed for t in parts if positions[t] < 0})
            raise ValueError(
                f"Unknown perturbations in `{what}`: {unknown[:10]}. Their targets "
                f"{missing[:10]} are not in the model's gene list (nor genes of the data), so "
                "they cannot be flagged; build the model with a `gene_list` that holds them "
                "(a model built from scratch on data registered with these perturbations adds "
                f"them by default), or use the control label {control!r} for no perturbation."
            )
        return names, [
            np.unique(np.asarray([positions[t] for t in parts], dtype=np.int64))
            for _, parts in parsed
        ]

    def _prepare_perturbation_encoder(self) -> None:
        """Give the module the perturbation-flag embedding if it has none (weights kept)."""
        if self.module.perturbation_flags:
            return
        kwargs = {
            **self.init_params_.get("non_kwargs", {}),
            **self.init_params_.get("kwargs", {}),
        }
        kwargs = {k: v for k, v in kwargs.items() if k in _MODULE_ARGS}
        kwargs.update(n_labels=self.module.n_labels, perturbation_flags=True)
        module = self._module_cls(len(self.gene_list), **kwargs)
        result = module.load_state_dict(self.module.state_dict(), strict=False)
        if result.unexpected_keys or set(result.missing_keys) != {"pert_encoder.weight"}:
            raise RuntimeError(
                "Could not add the perturbation-flag embedding to the network: missing keys "
                f"{result.missing_keys}, unexpected keys {result.unexpected_keys}."
            )
        self._replace_module(module, perturbation_flags=True)
        self._model_summary_string += ", perturbation flags"

    # ------------------------------------------------------------------ training
    _train_summary = (
        "Read-depth-aware masked pretraining (RDA), cell-type annotation fine-tuning, or "
        "perturbation-response training."
    )
    _train_notes = """
    ``mode="pretrain"``: every minibatch cell is randomly down-sampled (binomial thinning
    of its reads) for a fraction of cells, normalised, and a part of its expressed and of
    its zero genes is masked; the encoder reads the unmasked expressed genes with S (the
    input depth) and T (the original depth), the decoder predicts the full-depth normalised
    expression of every gene, and the loss is the mean squared error at the masked genes
    (:meth:`~cellformers.module.SCFoundationModule.corrupt`). It needs raw single-cell
    counts. In pretraining the decoder reads every gene of the list for every cell, so
    minibatches are small.

    ``mode="finetune"``: the classification head (batch norm and a two-layer MLP on the
    max-pooled gene states of the encoder, as the official fine-tuning example) is trained
    with cross-entropy on the registered ``labels_key``; the decoder is not used. A model
    without a head gets a fresh one first.

    ``mode="perturbation"`` (scGPT's perturbation recipe on this network, needs a
    registered ``perturbation_key``): every minibatch cell of a training perturbation is a
    target, paired with a control cell drawn at random (so ``scvi.settings.seed`` fixes the
    pairing) from the registered control cells among the training cells. The control cell
    is the input, tokenized as usual with ``T = S``; the perturbation flags (scGPT's
    ``pert_encoder``, added by :class:`~cellformers.module.SCFoundationModule` to the
    encoder tokens and to the decoder input, see
    :meth:`~cellformers.module.SCFoundationModule.decode`) are set on the genes the target
    cell's perturbation targets; the loss is the mean squared error between the predicted
    and the target cell's normalised expression (``log1p`` of counts per 10,000, as the
    input) over every gene of the list that the data measure. Control cells are targets
    too, each paired with another control and no flag, so the model also learns the
    unperturbed response. A model without the flag embedding gets one first (the rest of
    the network is kept). ``train_size``/``validation_size`` split the selected cells (not
    all cells); ``freeze_layers`` is a number of encoder layers. See
    :meth:`predict_perturbation`.
    """
    _train_official_freeze = (
        '; ``"official"`` trains only what the official example unfreezes: the '
        "second-to-last encoder layer and the head (both fine-tuning only)"
    )
    _train_extra_kwargs = (
        "; perturbation training also reads ``train_perturbations`` (the perturbations to "
        "learn from, labels of the registered ``perturbation_key``; every registered one by "
        "default: only their cells and the control cells are used, so held-out perturbations "
        "stay unseen) and ``indices`` (the cells that may be used, positions or boolean mask; "
        "all by default)"
    )
    _modes = ("pretrain", "finetune", "perturbation")
    _train_defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 8,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_ratio": 0.05,
    }

    def _train(
        self,
        *,
        mode: str,
        train_perturbations: Sequence[str] | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        **kwargs,
    ):
        if mode != "perturbation":
            if train_perturbations is not None or indices is not None:
                raise ValueError("train_perturbations and indices apply to mode='perturbation'.")
            if mode == "pretrain" and (
                (self._setup_arg(self.adata, "pre_normalized") or "F") != "F"
                or (self._setup_arg(self.adata, "input_type") or "singlecell") != "singlecell"
            ):
                raise ValueError(
                    "Read-depth-aware pretraining down-samples reads, so it needs raw "
                    "single-cell counts: set up the AnnData with pre_normalized='F' and "
                    "input_type='singlecell'."
                )
            return super()._train(mode=mode, **kwargs)
        if kwargs.pop("class_weight") is not None:
            raise ValueError("class_weight applies to fine-tuning (mode='finetune').")
        if kwargs.pop("batch_adversarial"):
            raise ValueError("batch_adversarial applies to pretraining and fine-tuning.")
        if isinstance(kwargs["freeze_layers"], str):
            raise ValueError(
                "In perturbation training freeze_layers is a number of encoder layers to "
                f"keep fixed, got {kwargs['freeze_layers']!r}."
            )
        return self._train_perturbation(
            train_perturbations=train_perturbations, indices=indices, **kwargs
        )

    def _perturbation_training_cells(
        self, train_perturbations, indices
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Training perturbations, their cells and the controls among the allowed cells."""
        key, control = self._perturbation_setup()
        names = np.asarray(self.get_state_registry(PERTURBATION_KEY).categorical_mapping, dtype=str)
        codes = np.asarray(self.get_from_registry(self.adata, PERTURBATION_KEY)).reshape(-1)
        allowed = _resolve_indices(indices, self.adata.n_obs)
        present = set(names[np.unique(codes[allowed])])
        excluded = self._excluded_perturbations(self.adata)
        present -= excluded
        if train_perturbations is None:
            train = [n for n in names if n != control and n in present]
        else:
            train = [train_perturbations] if isinstance(train_perturbations, str) else None
            train = list(dict.fromkeys(map(str, train or train_perturbations)))
            if control in train:
                raise ValueError(
                    f"The control label {control!r} is in `train_perturbations`; the control "
                    "cells are always used (as inputs and as unperturbed targets), leave it out."
                )
            unknown = [n for n in train if n not in present]
            if unknown:
                raise ValueError(
                    f"Unknown perturbations in `train_perturbations`: {unknown[:10]}. They have "
                    f"no (selected) cells in adata.obs[{key!r}], or name no gene and were "
                    "excluded (unmatched_perturbations='exclude')."
                )
        if not train:
            raise ValueError("There are no perturbed cells to train on.")
        control_code = int(np.flatnonzero(names == control)[0])
        wanted = np.isin(names[codes[allowed]], train)
        controls = allowed[codes[allowed] == control_code]
        if controls.size < 2:
            raise ValueError(
                f"Perturbation training needs at least 2 control cells ({control!r}) among the "
                f"selected cells, found {controls.size}."
            )
        cells = np.sort(np.concatenate([allowed[wanted], controls]))
        return train, cells, controls

    def _train_perturbation(
        self,
        *,
        train_perturbations,
        indices,
        freeze_layers: int,
        max_epochs: int | None,
        batch_size: int,
        plan_kwargs: dict,
        datasplitter_kwargs: dict | None,
        **kwargs,
    ):
        """Perturbation-response training (``train(mode="perturbation")``)."""
        if (self._setup_arg(self.adata, "input_type") or "singlecell") != "singlecell":
            raise ValueError("Perturbation training reads single cells (input_type='singlecell').")
        if not self.module.expression_head:
            raise ValueError("Perturbation training needs the expression head (to_final).")
        if "external_indexing" in (datasplitter_kwargs or {}):
            raise ValueError(
                "Perturbation training chooses its cells itself: pass `indices` and "
                "`train_perturbations` instead of external_indexing."
            )
        train, cells, controls = self._perturbation_training_cells(train_perturbations, indices)
        _, control = self._perturbation_setup()
        positions = self._resolve_perturbations(train, what="train_perturbations")[1]
        gene_ids = self._gene_ids(self.adata)
        manager = self.get_anndata_manager(self.adata, required=True)
        X = manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        self._check_empty_cells(self.adata, cells, training=True)
        names = list(self.get_state_registry(PERTURBATION_KEY).categorical_mapping)
        flag_table = np.zeros((len(names), len(self.gene_list)), dtype=bool)
        for name, pos in zip(train, positions, strict=True):
            flag_table[names.index(name), pos] = True
        measured = np.zeros(len(self.gene_list), dtype=bool)
        measured[gene_ids[gene_ids >= 0]] = True
        tokenizer = self._tokenizer(self.adata, target_depth="f1")  # T = S
        totals = None
        if TOTAL_COUNTS_KEY in tokenizer.registry_keys:
            totals = np.asarray(manager.get_from_registry(TOTAL_COUNTS_KEY)).reshape(-1)[controls]
        pairs = _PerturbationPairs(
            tokenizer=tokenizer,
            controls=sp.csr_matrix(X[controls], dtype=np.float32),
            control_totals=totals,
            flag_table=flag_table,
            control_code=names.index(control),
            measured=measured,
            registry_keys=(PERTURBATION_KEY, *tokenizer.registry_keys),
        )
        # split the selected cells as scvi-tools' DataSplitter splits all cells
        train_size = kwargs.pop("train_size", None)
        n_train, n_val = validate_data_split(
            cells.size,
            0.9 if not train_size else float(train_size),
            kwargs.pop("validation_size", None),
            batch_size,
            (datasplitter_kwargs or {}).get("drop_last", False),
            not train_size,
        )
        if kwargs.pop("shuffle_set_split", True):
            cells = np.random.RandomState(seed=settings.seed).permutation(cells)
        rest = np.setdiff1d(np.arange(self.adata.n_obs), cells[: n_val + n_train])
        split = [np.sort(cells[n_val : n_val + n_train]), np.sort(cells[:n_val]), rest]
        datasplitter_kwargs = {**(datasplitter_kwargs or {}), "external_indexing": split}

        with self._lora_set_aside():  # a rebuilt module gets the adapters back
            self._prepare_perturbation_encoder()
        frozen = self._frozen_parameters(freeze_layers)
        flag_params = {id(p) for p in self.module.pert_encoder.parameters()}
        frozen += [
            p
            for p in self._lora_frozen_parameters(frozen, finetune=False)
            if id(p) not in flag_params  # the new flag embedding trains with the adapters
        ]
        previous = self.module.objective
        self.module.objective = "perturbation"
        for p in frozen:
            p.requires_grad_(False)
        try:
            result = self._train_on_tokens(
                pairs,
                max_epochs=max_epochs,
                batch_size=batch_size,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=datasplitter_kwargs,
                **kwargs,
            )
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.module.objective = previous
        self.perturbation_trained_ = True
        self.train_perturbations_ = list(train)
        return result

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
        *,
        empty_cells: Literal["raise", "nan"] = "raise",
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
        empty_cells
            What to do with cells that have no counts in the model's genes (they have no
            tokens): ``"raise"`` (default) an error naming them; ``"nan"`` a warning naming
            them, and NaN rows for them.

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
            empty_cells=empty_cells,
        )

    def _genes_in_data(self, adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Columns of ``adata`` in the gene list (first of duplicates) and their positions."""
        cols = panel_columns(self._gene_ids(adata), len(self.gene_list))
        columns = np.flatnonzero(cols >= 0)
        return columns, cols[columns]

    def _perturbation_embedding(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if "values" not in tensors:  # pretraining minibatches hold counts in the gene order
            counts = tensors["counts"].float()
            total = counts.sum(1).clamp_min(1.0)
            depth = torch.log10(total)  # T = S
            x = torch.log1p(counts / total[:, None] * self.module.target_sum)
            values, positions, lengths = gather_scfoundation_tokens(x, depth, depth)
            tensors = {"values": values, "positions": positions, "lengths": lengths}
        return self.module.embed_cells(
            tensors["values"], tensors["positions"], tensors["lengths"], pooling="all"
        )

    def _cell_embedding_dim(self) -> int:
        return 4 * self.module.encoder_dim

    def _perturbation_expression(self, adata: AnnData):
        columns, positions = self._genes_in_data(adata)
        index = torch.as_tensor(positions)

        def predict(t: dict[str, torch.Tensor]) -> torch.Tensor:
            pred = self.module.predict_expression(t["values"], t["positions"], t["lengths"])
            return pred[:, index.to(pred.device)]

        return predict, self._rna(adata).var_names[columns]

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
        var_names = self._rna(adata).var_names[columns]
        return pd.DataFrame(pred[:, positions], index=obs_names, columns=var_names)

    def predict_perturbation(
        self,
        perturbations: str | Sequence[str | tuple[str, ...]],
        *,
        control_indices: Sequence[int] | np.ndarray | None = None,
        n_controls: int | None = None,
        batch_size: int | None = None,
    ) -> AnnData:
        """Predict the mean expression profile of perturbations from control cells.

        For every perturbation, each control cell is tokenized as usual with ``T = S`` and
        decoded with the perturbation flags on its target genes (see
        ``train(mode="perturbation")``); the predicted normalised expression (``log1p`` of
        counts per 10,000) is averaged over the control cells. Any perturbation whose targets
        are in the model's gene list can be predicted, including perturbations held out from
        training (the flag then sits on a gene the model has not seen perturbed); the control
        label (or an empty tuple) is the unperturbed prediction, the network's output without
        flags.

        Parameters
        ----------
        perturbations
            Perturbation labels: a target gene, targets joined by ``"+"`` (``"STAT1+IRF1"``),
            a tuple of targets, or the control label.
        control_indices
            Cells of the model's AnnData to perturb (positions or boolean mask); by default
            the registered control cells.
        n_controls
            Use this many of those cells, drawn without replacement with a generator seeded by
            ``scvi.settings.seed``; all by default.
        batch_size
            Cells per forward pass (default 4: the decoder reads every gene of the list); the
            result does not depend on it.

        Returns
        -------
        AnnData with one row per perturbation (``obs_names`` and ``obs[perturbation_key]``
        the perturbation labels, ``obs['n_cells']`` the number of control cells averaged,
        ``obs['is_control']``), the data's genes that are in the gene list as ``var`` (in data
        order) and float64 mean profiles in ``X``: the contract of
        :func:`cellformers.tl.perturbation_means` and
        :func:`cellformers.tl.evaluate_perturbation` (the model normalises over the genes of
        its list, which equals the data's normalisation when the list holds every gene of the
        data). ``uns['predict_perturbation']`` holds the settings.

        """
        key, control = self._perturbation_setup()
        if not self.module.perturbation_flags:
            raise ValueError(
                "The network has no perturbation-flag embedding; train it first with "
                "`model.train(mode='perturbation', ...)`."
            )
        if not self.perturbation_trained_:
            logger.warning(
                "The perturbation-flag embedding has not been trained; predictions of perturbed "
                "cells are not meaningful."
            )
        names, positions = self._resolve_perturbations(perturbations, what="perturbations")
        adata = self.adata
        if control_indices is None:
            codes = np.asarray(self.get_from_registry(adata, PERTURBATION_KEY)).reshape(-1)
            mapping = list(self.get_state_registry(PERTURBATION_KEY).categorical_mapping)
            cells = np.flatnonzero(codes == mapping.index(control))
        else:
            cells = np.unique(_resolve_indices(control_indices, adata.n_obs))
        if n_controls is not None:
            if isinstance(n_controls, bool) or not 1 <= int(n_controls):
                raise ValueError(f"n_controls must be a positive integer, got {n_controls!r}.")
            if int(n_controls) < cells.size:
                rng = np.random.default_rng(settings.seed)
                cells = np.sort(rng.choice(cells, int(n_controls), replace=False))
        if cells.size == 0:
            raise ValueError("No control cells selected.")
        columns, gene_pos = self._genes_in_data(adata)
        index = torch.as_tensor(gene_pos)
        n_genes = len(self.gene_list)
        batch_size = 4 if batch_size is None else batch_size
        X = np.zeros((len(names), columns.size), dtype=np.float64)
        for j, pos in enumerate(positions):
            row = torch.zeros(n_genes, dtype=torch.bool)
            row[torch.as_tensor(pos)] = True

            def predict(t: dict[str, torch.Tensor], row=row, flagged=pos.size > 0):
                values = t["values"]
                flags = row.to(values.device).expand(values.shape[0], -1) if flagged else None
                pred = self.module.predict_expression(
                    values, t["positions"], t["lengths"], flags=flags
                )
                return pred[:, index.to(pred.device)]

            total = self._map_tokens(
                adata, cells, batch_size, predict, target_depth="f1", reduce=True
            )
            X[j] = total / cells.size
        obs = pd.DataFrame(
            {
                key: names,
                "n_cells": np.full(len(names), cells.size),
                "is_control": [pos.size == 0 for pos in positions],
            },
            index=pd.Index(names),
        )
        out = AnnData(X=X, obs=obs, var=self._rna(adata).var.iloc[columns].copy())
        out.uns["predict_perturbation"] = {
            "perturbation_key": key,
            "control_label": control,
            "n_controls": int(cells.size),
            "model": type(self).__name__,
        }
        return out

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
        out = np.full((self._rna(adata).n_vars, total.shape[-1]), np.nan, dtype=np.float32)
        out[columns] = total / len(idx)
        return out
