"""scFoundation network (xTrimoGene ``mae_autobin``) as an scvi-tools module.

An asymmetric masked autoencoder over a fixed gene list: a post-norm transformer encoder reads
only a cell's expressed genes plus two read-depth tokens (T, the target depth, and S, the
observed depth), and a pre-norm Performer decoder reads every gene position, with the encoder
outputs scattered back. The submodule names are those of the official ``MaeAutobin``
(biomap-research/scFoundation), except that the encoder layers are held in ``encoder.layers``
instead of ``encoder.transformer_encoder``; :func:`cellformers.pretrained.load_scfoundation_state_dict`
renames them.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ..nn import AutoDiscretizationEmbedding, Performer, TransformerEncoder, TransformerEncoderLayer
from ..nn._performer import STABILIZERS
from ._classification import ClassifierMixin

logger = logging.getLogger(__name__)

#: Genes of the published model (``OS_scRNA_gene_index.19264.tsv``).
SCFOUNDATION_N_GENES = 19264

#: Cell-embedding poolings of :meth:`SCFoundationModule.pool`.
POOLINGS: tuple[str, ...] = ("all", "max", "mean")

#: Minibatch key of the raw counts aligned to the model's genes (masked pretraining).
COUNTS_KEY = "counts"

#: Training objectives of :class:`SCFoundationModule`.
OBJECTIVES: tuple[str, ...] = ("mlm", "classification", "perturbation")

#: Minibatch keys of perturbation training: per-gene flags, targets and measured genes.
FLAGS_KEY = "flags"
TARGET_KEY = "target"
MEASURED_KEY = "measured"


def gather_scfoundation_tokens(
    expression: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the padded encoder batch from dense per-gene values.

    Each cell's kept genes (by default its non-zero values) come first, in ascending gene
    position, then the T and S tokens; cells are right-padded to the longest. This is the
    official ``gatherData`` layout, without its by-value padding marker.

    Parameters
    ----------
    expression
        Values ``[batch, n_genes]`` in the model's gene order (e.g. ``log1p`` of CP10k).
    t
        T token value per cell, ``[batch]`` (``log10`` of the target total count).
    s
        S token value per cell, ``[batch]`` (``log10`` of the observed total count).
    keep
        Boolean ``[batch, n_genes]``, the genes given to the encoder; `None` keeps the
        positive values (``expression > 0``).

    Returns
    -------
    ``(values, positions, lengths)``: float ``[batch, length]`` values (0 at padding), int64
    ``[batch, length]`` positions (gene index, ``n_genes`` for T, ``n_genes + 1`` for S,
    ``n_genes + 2`` at padding) and int64 ``[batch]`` numbers of real tokens (kept genes + 2).

    """
    if expression.dim() != 2:
        raise ValueError(
            f"expression must be a [batch, n_genes] tensor, got shape {tuple(expression.shape)}."
        )
    batch, n_genes = expression.shape
    if keep is None:
        keep = expression > 0
    elif keep.dtype != torch.bool or keep.shape != expression.shape:
        raise ValueError(
            f"keep must be a bool tensor of shape {tuple(expression.shape)}, got {keep.dtype} "
            f"{tuple(keep.shape)}."
        )
    t = torch.as_tensor(t, dtype=expression.dtype, device=expression.device).reshape(-1)
    s = torch.as_tensor(s, dtype=expression.dtype, device=expression.device).reshape(-1)
    if t.shape[0] != batch or s.shape[0] != batch:
        raise ValueError(
            f"t and s need one value per cell ({batch}), got {t.shape[0]} and {s.shape[0]}."
        )
    device = expression.device
    n_kept = keep.sum(dim=1)
    lengths = n_kept + 2
    length = int(lengths.max()) if batch else 2
    values = expression.new_zeros(batch, length)
    positions = torch.full((batch, length), n_genes + 2, dtype=torch.long, device=device)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending genes within each cell
    slots = (keep.cumsum(dim=1) - 1)[rows, cols]
    values[rows, slots] = expression[rows, cols]
    positions[rows, slots] = cols
    cells = torch.arange(batch, device=device)
    values[cells, n_kept] = t
    positions[cells, n_kept] = n_genes
    values[cells, n_kept + 1] = s
    positions[cells, n_kept + 1] = n_genes + 1
    return values, positions, lengths


class SCFoundationDecoder(nn.Module):
    """The official ``PerformerModule``: a pre-norm Performer stack followed by a LayerNorm.

    Keys ``performer.*`` (:class:`~cellformers.nn.Performer`) and ``norm.*``.

    Parameters
    ----------
    dim
        Model dimension.
    depth
        Number of layers.
    heads
        Attention heads.
    dim_head
        Dimension of one head.
    **kwargs
        Further keywords of :class:`~cellformers.nn.Performer`.

    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, **kwargs):
        super().__init__()
        self.performer = Performer(dim, depth, heads, dim_head, **kwargs)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stack and the norm to ``[batch, length, dim]``."""
        return self.norm(self.performer(x))


class SCFoundationClassifier(nn.Module):
    """Cell classification head of the official fine-tuning example (``LinearProbingClassifier``).

    ``norm`` (``BatchNorm1d(dim, affine=False, eps=1e-6)``) then ``fc1`` (``Linear(dim, hidden)
    → ReLU → Linear(hidden, n_labels)``) on the maximum of the encoder's gene states.

    Parameters
    ----------
    dim
        Encoder width.
    n_labels
        Number of classes.
    hidden
        Hidden width of ``fc1`` (official 256).

    """

    def __init__(self, dim: int, n_labels: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc1 = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, n_labels]`` of pooled states ``[batch, dim]``."""
        return self.fc1(self.norm(x))


class SCFoundationModule(ClassifierMixin, BaseModuleClass):
    """scFoundation: auto-binned value embedding, transformer encoder, Performer decoder.

    Submodules (state-dict prefixes): ``token_emb``
    (:class:`~cellformers.nn.AutoDiscretizationEmbedding`), ``pos_emb`` (``Embedding(n_genes + 3,
    encoder_dim)``: rows ``0 .. n_genes - 1`` are the genes, ``n_genes`` is T, ``n_genes + 1`` is
    S and ``n_genes + 2`` the padding position), ``encoder`` (post-norm
    :class:`~cellformers.nn.TransformerEncoder` with a final LayerNorm in ``encoder.norm``),
    ``decoder`` (:class:`SCFoundationDecoder`: ``decoder.performer`` and ``decoder.norm``),
    ``decoder_embed`` (``Linear(encoder_dim, decoder_dim)``), ``norm`` (``LayerNorm(decoder_dim)``)
    and, with ``expression_head``, ``to_final`` (``Linear(decoder_dim, 1)``).

    **Token batches.** The encoder input is ``values`` (float ``[batch, length]``: each cell's
    expressed gene values in ascending gene position, then T, then S, right-padded with 0),
    ``positions`` (int64, the gene index of each value, ``n_genes`` for T, ``n_genes + 1`` for
    S, anything at padding) and ``lengths`` (int64 ``[batch]``, the number of real tokens =
    expressed genes + 2); :func:`gather_scfoundation_tokens` builds it from dense values. Every
    method gives a cell the same result alone or inside a padded batch: padding is masked in the
    encoder and left out of every pooling, and the decoder always runs over all
    ``n_genes + 2`` positions. With the default per-cell Performer key stabiliser the decoder
    is batch-invariant too; ``stabilizer="batch"`` reproduces the official batch-wide maximum
    (equal for a batch of one cell, as the official scripts run).

    **Masked pretraining** (read-depth-aware, RDA) is the scvi-tools protocol: minibatches hold
    raw counts aligned to the model's genes under ``"counts"`` (float ``[batch, n_genes]``) and
    :meth:`loss` is the masked MSE described in :meth:`corrupt` and :meth:`loss`.

    **Perturbation training** (``objective="perturbation"``, with ``perturbation_flags=True``)
    follows scGPT's perturbation model: minibatches hold a control cell's token batch, the
    perturbation ``"flags"`` (``[batch, n_genes]``, 1 on the genes to perturb), the perturbed
    cell's normalised expression ``"target"`` and the ``"measured"`` genes; ``pert_encoder``
    embeds the flags into the encoder tokens and the decoder input, and the loss is the mean
    squared error over the measured genes (:meth:`loss`).

    Parameters
    ----------
    n_genes
        Number of genes (19,264 for the published model; any gene list works from scratch).
    bin_num
        Bins of the value embedding.
    bin_alpha
        ``bin_alpha`` of the value embedding.
    encoder_dim
        Encoder width.
    encoder_depth
        Encoder layers.
    encoder_heads
        Encoder attention heads.
    encoder_d_hid
        Encoder feed-forward width; `None` gives ``4 * encoder_dim`` (3072 for the published
        model).
    encoder_dropout
        Dropout of the encoder layers (torch's default 0.1, as the official model).
    encoder_activation
        ``"relu"`` (official) or ``"gelu"``.
    encoder_norm_first
        Pre-norm encoder layers (official: post-norm, `False`).
    layer_norm_eps
        Epsilon of the encoder layer norms.
    decoder_dim
        Decoder width.
    decoder_depth
        Decoder layers.
    decoder_heads
        Decoder attention heads.
    decoder_dim_head
        Dimension of one decoder head.
    decoder_ff_mult
        Decoder feed-forward width is ``decoder_dim * decoder_ff_mult``.
    decoder_nb_features
        Random features per decoder layer; `None` gives ``int(d ln d)`` (266 for 64).
    decoder_qkv_bias
        Biases on the decoder's query/key/value projections (official: `True`).
    decoder_ff_dropout
        Dropout on the decoder feed-forward hidden activation.
    decoder_attn_dropout
        Dropout after each decoder attention block.
    expression_head
        Build ``to_final`` (needed for :meth:`predict_expression` and pretraining).
    stabilizer
        Performer key stabiliser of the decoder: ``"cell"`` (default, batch-invariant) or
        ``"batch"`` (official).
    downsample_prob
        Pretraining: probability that a cell's input profile is down-sampled (see
        :meth:`corrupt`).
    min_depth_fraction
        Pretraining: a down-sampled cell keeps a fraction of its reads drawn uniformly from
        ``[min_depth_fraction, 1]``.
    value_mask_prob
        Pretraining: probability that an expressed (non-zero) input value is masked.
    zero_mask_prob
        Pretraining: probability that a zero input position is masked.
    max_encoder_len
        Pretraining: at most this many encoder tokens per cell (T and S included; the official
        ``mae_encoder_max_seq_len`` is 15,000); `None` sets no cap.
    target_sum
        Total of the normalised profile (``log1p(x / total * target_sum)``; 1e4 officially).
    n_labels
        Classes of the cell classification head ``classifier``
        (:class:`SCFoundationClassifier`); 0 builds none. With ``objective="classification"``
        minibatches hold the token batch (``values``, ``positions``, ``lengths``) and the
        labels, and the loss is the cross-entropy.
    classifier_hidden
        Hidden width of the classification head.
    perturbation_flags
        Build ``pert_encoder``, the perturbation-flag embedding of scGPT's perturbation model
        (``Embedding(2, encoder_dim, padding_idx=0)``: row 0, "not perturbed", is the zero
        vector, row 1 is "perturbed"; see :meth:`encode` and :meth:`decode` for where it is
        added). Not part of the published networks.

    """

    def __init__(
        self,
        n_genes: int = SCFOUNDATION_N_GENES,
        *,
        bin_num: int = 100,
        bin_alpha: float = 1.0,
        encoder_dim: int = 768,
        encoder_depth: int = 12,
        encoder_heads: int = 12,
        encoder_d_hid: int | None = None,
        encoder_dropout: float = 0.1,
        encoder_activation: str = "relu",
        encoder_norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        decoder_dim: int = 512,
        decoder_depth: int = 6,
        decoder_heads: int = 8,
        decoder_dim_head: int = 64,
        decoder_ff_mult: int = 4,
        decoder_nb_features: int | None = None,
        decoder_qkv_bias: bool = True,
        decoder_ff_dropout: float = 0.0,
        decoder_attn_dropout: float = 0.0,
        expression_head: bool = True,
        stabilizer: str = "cell",
        downsample_prob: float = 0.5,
        min_depth_fraction: float = 0.1,
        value_mask_prob: float = 0.3,
        zero_mask_prob: float = 0.03,
        max_encoder_len: int | None = None,
        target_sum: float = 1e4,
        n_labels: int = 0,
        classifier_hidden: int = 256,
        perturbation_flags: bool = False,
    ):
        super().__init__()
        if n_labels < 0:
            raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
        if stabilizer not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}.")
        for name, p in (
            ("downsample_prob", downsample_prob),
            ("value_mask_prob", value_mask_prob),
            ("zero_mask_prob", zero_mask_prob),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if not 0.0 < min_depth_fraction <= 1.0:
            raise ValueError(f"min_depth_fraction must be in (0, 1], got {min_depth_fraction}.")
        if max_encoder_len is not None and max_encoder_len < 3:
            raise ValueError(
                f"max_encoder_len must be >= 3 (T, S and at least one gene) or None, got "
                f"{max_encoder_len}."
            )
        if target_sum <= 0:
            raise ValueError(f"target_sum must be > 0, got {target_sum}.")

        self.n_genes = int(n_genes)
        self.n_positions = self.n_genes + 2
        self.pad_position = self.n_genes + 2
        self.bin_num = int(bin_num)
        self.bin_alpha = float(bin_alpha)
        self.encoder_dim = int(encoder_dim)
        self.encoder_depth = int(encoder_depth)
        self.encoder_heads = int(encoder_heads)
        self.encoder_d_hid = 4 * self.encoder_dim if encoder_d_hid is None else int(encoder_d_hid)
        self.encoder_dropout = float(encoder_dropout)
        self.encoder_activation = encoder_activation
        self.encoder_norm_first = bool(encoder_norm_first)
        self.layer_norm_eps = float(layer_norm_eps)
        self.decoder_dim = int(decoder_dim)
        self.decoder_depth = int(decoder_depth)
        self.decoder_heads = int(decoder_heads)
        self.decoder_dim_head = int(decoder_dim_head)
        self.decoder_ff_mult = int(decoder_ff_mult)
        self.decoder_ff_dropout = float(decoder_ff_dropout)
        self.decoder_attn_dropout = float(decoder_attn_dropout)
        self.downsample_prob = float(downsample_prob)
        self.min_depth_fraction = float(min_depth_fraction)
        self.value_mask_prob = float(value_mask_prob)
        self.zero_mask_prob = float(zero_mask_prob)
        self.max_encoder_len = None if max_encoder_len is None else int(max_encoder_len)
        self.target_sum = float(target_sum)

        self.token_emb = AutoDiscretizationEmbedding(encoder_dim, bin_num, bin_alpha)
        self.pos_emb = nn.Embedding(self.n_genes + 3, encoder_dim)
        self.encoder = TransformerEncoder(
            lambda: TransformerEncoderLayer(
                encoder_dim,
                encoder_heads,
                self.encoder_d_hid,
                dropout=encoder_dropout,
                activation=encoder_activation,
                norm_first=encoder_norm_first,
                layer_norm_eps=layer_norm_eps,
            ),
            encoder_depth,
            norm=nn.LayerNorm(encoder_dim, eps=layer_norm_eps),
        )
        self.decoder = SCFoundationDecoder(
            decoder_dim,
            decoder_depth,
            decoder_heads,
            decoder_dim_head,
            ff_mult=decoder_ff_mult,
            nb_features=decoder_nb_features,
            qkv_bias=decoder_qkv_bias,
            ff_dropout=decoder_ff_dropout,
            attn_dropout=decoder_attn_dropout,
            stabilizer=stabilizer,
        )
        self.decoder_nb_features = self.decoder.performer.nb_features
        self.decoder_qkv_bias = bool(decoder_qkv_bias)
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.norm = nn.LayerNorm(decoder_dim)
        self.to_final = nn.Linear(decoder_dim, 1) if expression_head else None
        self.n_labels = int(n_labels)
        self.classifier = (
            SCFoundationClassifier(encoder_dim, n_labels, classifier_hidden) if n_labels else None
        )
        # scGPT's pert_encoder with its tutorial's pert_pad_id=0: "not perturbed" adds nothing,
        # so an unflagged input gives exactly the network without the embedding
        self.pert_encoder = (
            nn.Embedding(2, encoder_dim, padding_idx=0) if perturbation_flags else None
        )
        self._objective = "mlm"

    # ------------------------------------------------------------------ settings
    @property
    def objective(self) -> str:
        """Training objective: ``"mlm"`` (read-depth-aware masked pretraining), ``"classification"`` or ``"perturbation"``."""
        return self._objective

    @objective.setter
    def objective(self, value: str) -> None:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {value!r}.")
        if value == "classification" and self.classifier is None:
            raise ValueError(
                "objective 'classification' needs the classification head; build the module "
                "with n_labels > 0."
            )
        if value == "perturbation" and (self.pert_encoder is None or self.to_final is None):
            raise ValueError(
                "objective 'perturbation' needs the perturbation-flag embedding and the "
                "expression head; build the module with perturbation_flags=True and "
                "expression_head=True."
            )
        self._objective = value

    @property
    def perturbation_flags(self) -> bool:
        """Whether the module has the perturbation-flag embedding ``pert_encoder``."""
        return self.pert_encoder is not None

    @property
    def stabilizer(self) -> str:
        """Decoder key stabiliser, ``"cell"`` (batch-invariant) or ``"batch"`` (official)."""
        return self.decoder.performer.stabilizer

    @stabilizer.setter
    def stabilizer(self, value: str) -> None:
        self.decoder.performer.stabilizer = value

    @property
    def expression_head(self) -> bool:
        """Whether the module has the expression head ``to_final``."""
        return self.to_final is not None

    # ------------------------------------------------------------------ encoder
    def _padding(
        self, positions: torch.Tensor, lengths: torch.Tensor, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check positions and lengths; return positions (padding set to the pad row) and padding."""
        if not torch.is_tensor(positions) or tuple(positions.shape) != tuple(shape):
            got = tuple(positions.shape) if torch.is_tensor(positions) else type(positions)
            raise ValueError(
                f"positions must have shape {tuple(shape)} [batch, length], got {got}."
            )
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor, got {positions.dtype}.")
        batch, length = shape
        lengths = torch.as_tensor(lengths, device=positions.device).reshape(-1)
        if lengths.shape[0] != batch:
            raise ValueError(
                f"lengths must hold one number per cell ({batch}), got {lengths.shape[0]}."
            )
        lengths = lengths.long()
        if batch and (int(lengths.min()) < 2 or int(lengths.max()) > length):
            raise ValueError(
                f"lengths must be in [2, {length}] (expressed genes + T + S, at most the padded "
                f"length); got values in [{int(lengths.min())}, {int(lengths.max())}]."
            )
        padding = torch.arange(length, device=positions.device)[None, :] >= lengths[:, None]
        real = positions.long().masked_fill(padding, 0)
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.n_positions):
            raise ValueError(
                f"positions of real tokens must be in [0, {self.n_positions}) (genes, then "
                f"T = {self.n_genes} and S = {self.n_genes + 1}); got values in "
                f"[{int(real.min())}, {int(real.max())}] (check lengths)."
            )
        return real.masked_fill(padding, self.pad_position), padding

    def _check_tokens(
        self, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not torch.is_tensor(values) or values.dim() != 2:
            shape = tuple(values.shape) if torch.is_tensor(values) else type(values)
            raise ValueError(f"values must be a [batch, length] tensor, got {shape}.")
        positions, padding = self._padding(positions, lengths, values.shape)
        return values.to(self.pos_emb.weight.dtype), positions, padding

    def _check_flags(self, flags: torch.Tensor, batch: int) -> torch.Tensor:
        """Check perturbation flags ``[batch, n_genes]``; return them padded to all positions."""
        if self.pert_encoder is None:
            raise RuntimeError(
                "This module has no perturbation-flag embedding (pert_encoder); build it with "
                "perturbation_flags=True."
            )
        if not torch.is_tensor(flags) or tuple(flags.shape) != (batch, self.n_genes):
            got = tuple(flags.shape) if torch.is_tensor(flags) else type(flags)
            raise ValueError(
                f"flags must be a [batch, n_genes] = [{batch}, {self.n_genes}] tensor (1 on the "
                f"perturbed genes), got {got}."
            )
        # T, S and the padding position are never perturbed
        return F.pad(flags.long().clamp(0, 1), (0, self.n_positions + 1 - self.n_genes))

    def encode(
        self,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        *,
        flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode tokens: ``encoder(token_emb(values) + pos_emb(positions))`` and its final norm.

        Parameters
        ----------
        values
            Float ``[batch, length]`` (expressed genes, T, S, padding).
        positions
            Int64 ``[batch, length]``.
        lengths
            Int64 ``[batch]``, real tokens per cell.
        flags
            Perturbation flags ``[batch, n_genes]`` (1 or `True` on each cell's perturbed
            genes, needs ``perturbation_flags=True``): ``pert_encoder(flag)`` is added to the
            embedding of every gene token, as scGPT's perturbation model adds it to the gene
            and value embeddings. A perturbed gene that the cell does not express has no
            token here; :meth:`decode` flags it.

        Returns
        -------
        Tensor ``[batch, length, encoder_dim]``; padded rows are zero.

        """
        values, positions, padding = self._check_tokens(values, positions, lengths)
        x = self.token_emb(values, padding=padding) + self.pos_emb(positions)
        if flags is not None:
            flags = self._check_flags(flags, values.shape[0])
            x = x + self.pert_encoder(flags.gather(1, positions)).to(x.dtype)
        x = self.encoder(x, key_padding_mask=padding)
        return x.masked_fill(padding[..., None], 0.0)

    def pool(
        self, hidden: torch.Tensor, lengths: torch.Tensor, pooling: str = "all"
    ) -> torch.Tensor:
        """Pool encoder states into cell embeddings, as the official ``get_embedding.py`` does.

        Parameters
        ----------
        hidden
            Encoder states ``[batch, length, encoder_dim]`` (:meth:`encode`).
        lengths
            Real tokens per cell; the S token is at ``lengths - 1`` and T at ``lengths - 2``.
        pooling
            ``"all"`` (official default): ``[S, T, max over genes, mean over genes]``,
            ``4 * encoder_dim``; ``"max"`` (official): maximum over all real tokens, T and S
            included; ``"mean"``: mean over the gene tokens. A cell without expressed genes
            gets zeros for the gene maximum and mean.

        Returns
        -------
        Tensor ``[batch, 4 * encoder_dim]`` (``"all"``) or ``[batch, encoder_dim]``.

        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        batch, length, _ = hidden.shape
        lengths = torch.as_tensor(lengths, device=hidden.device).reshape(-1).long()
        steps = torch.arange(length, device=hidden.device)[None, :]
        if pooling == "max":
            real = (steps < lengths[:, None])[..., None]
            return hidden.masked_fill(~real, float("-inf")).amax(dim=1)
        n_genes = lengths - 2
        genes = (steps < n_genes[:, None])[..., None]
        mean = hidden.masked_fill(~genes, 0.0).sum(dim=1) / n_genes.clamp_min(1)[:, None].to(
            hidden.dtype
        )
        if pooling == "mean":
            return mean
        gmax = hidden.masked_fill(~genes, float("-inf")).amax(dim=1)
        gmax = gmax.masked_fill((n_genes == 0)[:, None], 0.0)
        cells = torch.arange(batch, device=hidden.device)
        s = hidden[cells, lengths - 1]
        t = hidden[cells, lengths - 2]
        return torch.cat([s, t, gmax, mean], dim=1)

    def embed_cells(
        self,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        *,
        pooling: str = "all",
    ) -> torch.Tensor:
        """Embed cells: :meth:`pool` of :meth:`encode` (the official ``--output_type cell``).

        Parameters
        ----------
        values, positions, lengths
            The token batch.
        pooling
            ``"all"``, ``"max"`` or ``"mean"`` (see :meth:`pool`).

        Returns
        -------
        Tensor ``[batch, 4 * encoder_dim]`` (``"all"``) or ``[batch, encoder_dim]``.

        """
        return self.pool(self.encode(values, positions, lengths), lengths, pooling)

    def classify(
        self, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Class logits ``[batch, n_labels]``: the head on the maximum over the gene states.

        As the official fine-tuning example, the encoder's final states are max-pooled over
        the gene tokens (T and S are read but left out of the pooling).
        """
        if self.classifier is None:
            raise RuntimeError("This module has no classification head (built with n_labels=0).")
        hidden = self.encode(values, positions, lengths)
        d = self.encoder_dim
        return self.classifier(self.pool(hidden, lengths, "all")[:, 2 * d : 3 * d])

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        *,
        masked: torch.Tensor | None = None,
        flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode all ``n_genes + 2`` positions (the official full forward, before ``to_final``).

        In the official order: every position starts as ``token_emb`` of the value 0 (zeros go
        through the bin mixture, not the pad embedding), positions in ``masked`` get the mask
        embedding, the encoder states are written to their positions (overriding ``masked``
        there), then ``pos_emb(arange(n_genes + 2))`` is added (again, for the encoder states),
        followed by ``decoder_embed``, the Performer, ``decoder.norm`` and ``norm``.

        With ``flags``, ``pert_encoder(flag)`` is added together with ``pos_emb`` at every gene
        position. The decoder thus sees the flag of every perturbed gene, also of one that the
        cell does not express and that has no encoder token; a flagged gene that is expressed
        carries the flag twice, through its encoder state and here, as it carries its position
        embedding twice.

        Parameters
        ----------
        hidden
            Encoder states ``[batch, length, encoder_dim]`` (:meth:`encode`).
        positions
            Positions of the encoder tokens, int64 ``[batch, length]``.
        lengths
            Real encoder tokens per cell.
        masked
            Boolean ``[batch, n_genes + 2]``: positions given the mask embedding (pretraining).
        flags
            Perturbation flags ``[batch, n_genes]`` (see :meth:`encode`).

        Returns
        -------
        Tensor ``[batch, n_genes + 2, decoder_dim]``.

        """
        batch, length, dim = hidden.shape
        positions, padding = self._padding(positions, lengths, (batch, length))
        n = self.n_positions
        zero = self.token_emb(hidden.new_zeros(1))  # [1, dim]: the embedding of the value 0
        x = zero.to(hidden.dtype).expand(batch, n, dim)
        if masked is not None:
            if masked.dtype != torch.bool or masked.shape != (batch, n):
                raise ValueError(
                    f"masked must be a bool tensor of shape {(batch, n)} ([batch, n_genes + 2]), "
                    f"got {masked.dtype} {tuple(masked.shape)}."
                )
            mask_vec = self.token_emb.emb_mask.weight[0].to(hidden.dtype)
            x = torch.where(masked[..., None], mask_vec, x)
        else:
            x = x.contiguous()
        real = ~padding
        rows = real.nonzero(as_tuple=True)[0]
        x = x.index_put((rows, positions[real]), hidden[real])
        x = x + self.pos_emb.weight[:n].to(x.dtype)
        if flags is not None:
            flags = self._check_flags(flags, batch)[:, :n]
            x = x + self.pert_encoder(flags).to(x.dtype)
        x = self.decoder(self.decoder_embed(x))
        return self.norm(x)

    def _require_head(self) -> nn.Linear:
        if self.to_final is None:
            raise RuntimeError(
                "This module has no expression head (to_final); build it with "
                "expression_head=True (and load a checkpoint that has to_final.*)."
            )
        return self.to_final

    def predict_expression(
        self,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        *,
        flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the normalised expression of every gene (the official ``gene_expression`` output).

        Parameters
        ----------
        values, positions, lengths
            The token batch.
        flags
            Perturbation flags ``[batch, n_genes]``, given to the encoder and the decoder (see
            :meth:`encode` and :meth:`decode`): the predicted expression of each cell after
            perturbing its flagged genes. Without flags (or with none set) the output is that
            of the network without ``pert_encoder``.

        Returns
        -------
        Tensor ``[batch, n_genes]`` (``to_final`` of :meth:`decode`, T and S dropped).

        """
        head = self._require_head()
        hidden = self.encode(values, positions, lengths, flags=flags)
        y = self.decode(hidden, positions, lengths, flags=flags)
        return head(y[:, : self.n_genes]).squeeze(-1)

    def gene_embeddings(
        self, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Embed every gene in the context of the cell (the official ``--output_type gene``).

        Parameters
        ----------
        values, positions, lengths
            The token batch.

        Returns
        -------
        Tensor ``[batch, n_genes, decoder_dim]``: :meth:`decode` without ``to_final``, T and S
        dropped.

        """
        y = self.decode(self.encode(values, positions, lengths), positions, lengths)
        return y[:, : self.n_genes]

    # ------------------------------------------------------------------ pretraining
    def _check_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(counts) or counts.dim() != 2 or counts.shape[1] != self.n_genes:
            shape = tuple(counts.shape) if torch.is_tensor(counts) else type(counts)
            raise ValueError(
                f"counts must be a [batch, n_genes={self.n_genes}] tensor of raw counts in the "
                f"model's gene order, got {shape}."
            )
        if counts.layout != torch.strided:
            counts = counts.to_dense()
        counts = counts.to(torch.float32)
        if counts.numel() and not (torch.isfinite(counts).all() and counts.min() >= 0):
            raise ValueError(
                "counts must be finite and non-negative raw counts; got negative, NaN or "
                "infinite values."
            )
        return counts

    def corrupt(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Build one read-depth-aware masked-autoencoder example per cell (RDA pretraining).

        All random draws use torch's global generator (so scvi-tools' seed controls them), with
        no loop over cells:

        1. **Down-sampling.** With probability ``downsample_prob`` a cell's input profile is a
           binomial thinning of its counts, each read kept with a probability drawn uniformly
           from ``[min_depth_fraction, 1]``; otherwise (and when thinning leaves no read) it is
           the cell itself. ``T = log10(total counts)``, ``S = log10(input total)``.
        2. **Normalisation.** Input values ``log1p(input / input_total * target_sum)``; the
           target is ``log1p(counts / total * target_sum)`` (the full-depth profile).
        3. **Masking.** Each non-zero input value is masked with probability
           ``value_mask_prob`` and each zero position with probability ``zero_mask_prob``
           (independent Bernoulli draws). The encoder sees only the unmasked non-zero values
           plus T and S; with ``max_encoder_len``, a uniformly random subset of them is kept
           and the genes left out are masked too. The decoder gets the mask embedding at every
           masked position. The official 80/10/10 rule (10 % random values, 10 % unchanged)
           is not applied: every masked position gets the mask embedding.

        A cell with zero total counts has nothing masked, ``T = S = 0`` and only the T and S
        tokens, so its loss is skipped instead of being NaN.

        Parameters
        ----------
        counts
            Raw counts ``[batch, n_genes]`` in the model's gene order.

        Returns
        -------
        ``values``, ``positions``, ``lengths`` (the encoder batch), ``masked`` (bool
        ``[batch, n_genes + 2]``, the decoder's masked positions; T and S never are),
        ``target`` (``[batch, n_genes]``) and ``valid`` (bool ``[batch]``, cells with counts).

        """
        counts = self._check_counts(counts)
        batch, n_genes = counts.shape
        device = counts.device
        total = counts.sum(dim=1)
        valid = total > 0
        inputs = counts
        if self.downsample_prob > 0 and batch:
            chosen = torch.rand(batch, device=device) < self.downsample_prob
            low = self.min_depth_fraction
            fraction = low + (1.0 - low) * torch.rand(batch, device=device)
            thinned = torch.binomial(counts, fraction[:, None].expand(batch, n_genes).contiguous())
            chosen = chosen & (thinned.sum(dim=1) > 0)
            inputs = torch.where(chosen[:, None], thinned, counts)
        input_total = inputs.sum(dim=1)
        t = torch.log10(total.clamp_min(1.0))
        s = torch.log10(input_total.clamp_min(1.0))
        x = torch.log1p(inputs / input_total.clamp_min(1.0)[:, None] * self.target_sum)
        target = torch.log1p(counts / total.clamp_min(1.0)[:, None] * self.target_sum)

        expressed = inputs > 0
        draws = torch.rand(batch, n_genes, device=device)
        masked = torch.where(expressed, draws < self.value_mask_prob, draws < self.zero_mask_prob)
        masked &= valid[:, None]
        keep = expressed & ~masked
        if self.max_encoder_len is not None:
            cap = self.max_encoder_len - 2
            if batch and int(keep.sum(dim=1).max()) > cap:
                scores = torch.rand(batch, n_genes, device=device).masked_fill(~keep, -1.0)
                selected = torch.zeros_like(keep).scatter_(1, scores.topk(cap, dim=1).indices, True)
                selected &= keep
                masked |= keep & ~selected
                keep = selected
        values, positions, lengths = gather_scfoundation_tokens(x, t, s, keep=keep)
        return {
            "values": values,
            "positions": positions,
            "lengths": lengths,
            "masked": F.pad(masked, (0, 2)),
            "target": target,
            "valid": valid,
        }

    # ------------------------------------------------------------------ scvi-tools protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        if self.objective == "classification":
            return {k: tensors[k] for k in ("values", "positions", "lengths")}
        if self.objective == "perturbation":
            missing = [k for k in ("values", "positions", "lengths", FLAGS_KEY) if k not in tensors]
            if missing:
                raise KeyError(
                    f"The minibatch lacks {missing}; perturbation training needs the control "
                    "cells' token batch (values, positions, lengths), the perturbation flags "
                    "[batch, n_genes] and the targets; have the model class pair the cells."
                )
            return {k: tensors[k] for k in ("values", "positions", "lengths", FLAGS_KEY)}
        if COUNTS_KEY not in tensors:
            raise KeyError(
                f"The minibatch has no {COUNTS_KEY!r} (raw counts [batch, n_genes] aligned to the "
                f"model's {self.n_genes} genes), which scFoundation pretraining needs; have the "
                "model class align the expression to the gene list."
            )
        return {"counts": tensors[COUNTS_KEY]}

    @auto_move_data
    def inference(
        self,
        counts: torch.Tensor | None = None,
        mask: bool = True,
        *,
        values: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        flags: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Corrupt the counts (:meth:`corrupt`) and encode the visible tokens.

        With ``objective="classification"`` the token batch (``values``, ``positions``,
        ``lengths``) is classified instead: ``{"logits": [batch, n_labels]}``. With
        ``objective="perturbation"`` the token batch (the control cells) is encoded with the
        perturbation ``flags`` (see :meth:`encode`).

        Parameters
        ----------
        counts
            Raw counts ``[batch, n_genes]``.
        mask
            Apply the down-sampling and masking; `False` encodes every expressed gene with
            ``T = S = log10(total)`` and nothing is predicted.
        values, positions, lengths
            The token batch (classification and perturbation only).
        flags
            Perturbation flags ``[batch, n_genes]`` (perturbation only).

        Returns
        -------
        ``hidden`` (encoder states), ``positions``, ``lengths``, ``masked``, ``target`` and
        ``valid`` (see :meth:`corrupt`); for perturbation ``hidden``, ``positions``,
        ``lengths`` and ``flags``.

        """
        if self.objective == "classification":
            return {"logits": self.classify(values, positions, lengths)}
        if self.objective == "perturbation":
            hidden = self.encode(values, positions, lengths, flags=flags)
            return {"hidden": hidden, "positions": positions, "lengths": lengths, "flags": flags}
        if mask:
            batch = self.corrupt(counts)
        else:
            counts = self._check_counts(counts)
            total = counts.sum(dim=1)
            depth = torch.log10(total.clamp_min(1.0))
            x = torch.log1p(counts / total.clamp_min(1.0)[:, None] * self.target_sum)
            values, positions, lengths = gather_scfoundation_tokens(x, depth, depth)
            batch = {
                "values": values,
                "positions": positions,
                "lengths": lengths,
                "masked": torch.zeros(
                    counts.shape[0], self.n_positions, dtype=torch.bool, device=counts.device
                ),
                "target": x,
                "valid": total > 0,
            }
        hidden = self.encode(batch.pop("values"), batch["positions"], batch["lengths"])
        return {"hidden": hidden, **batch}

    def _get_generative_input(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        **kwargs,
    ) -> dict:
        if self.objective == "classification":
            return {"logits": inference_outputs["logits"]}
        if self.objective == "perturbation":
            keys = ("hidden", "positions", "lengths", "flags")
            return {k: inference_outputs[k] for k in keys}
        return {
            "hidden": inference_outputs["hidden"],
            "positions": inference_outputs["positions"],
            "lengths": inference_outputs["lengths"],
            "masked": inference_outputs["masked"],
        }

    @auto_move_data
    def generative(
        self,
        hidden: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        flags: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode all positions and predict the expression of every gene.

        Parameters
        ----------
        hidden
            Encoder states ``[batch, length, encoder_dim]``.
        positions
            Encoder token positions.
        lengths
            Real encoder tokens per cell.
        masked
            Boolean ``[batch, n_genes + 2]``, positions given the mask embedding.
        logits
            Class logits (classification only; passed through).
        flags
            Perturbation flags ``[batch, n_genes]`` (perturbation only, see :meth:`decode`).

        Returns
        -------
        ``{"expression": [batch, n_genes]}``.

        """
        if self.objective == "classification":
            return {"logits": logits}
        head = self._require_head()
        y = self.decode(hidden, positions, lengths, masked=masked, flags=flags)
        return {"expression": head(y[:, : self.n_genes]).squeeze(-1)}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked regression loss of RDA pretraining (or cross-entropy for classification).

        Per cell, the mean squared error between the predicted and the target (full-depth)
        normalised expression over its masked genes is ``reconstruction_loss`` (0 for a cell
        with nothing masked or without counts); ``loss`` is its mean over the cells with at
        least one masked gene (0 when there are none).

        With ``objective="perturbation"`` (scGPT's perturbation loss) the minibatch holds the
        target expression ``"target"`` ``[batch, n_genes]`` (the perturbed cell's normalised
        expression) and ``"measured"`` (bool ``[batch, n_genes]``, the genes the data measure;
        genes of the list that the data lack are not zeros and stay out of the loss):
        ``reconstruction_loss`` is each cell's mean squared error over its measured genes and
        ``loss`` its mean over the cells.

        Parameters
        ----------
        tensors
            The minibatch.
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput`.

        """
        if self.objective == "classification":
            return self._classification_loss(tensors, generative_outputs["logits"])
        if self.objective == "perturbation":
            return self._perturbation_loss(tensors, generative_outputs["expression"])
        pred = generative_outputs["expression"].float()
        target = inference_outputs["target"].to(pred.dtype)
        masked = inference_outputs["masked"][:, : self.n_genes]
        masked = masked & inference_outputs["valid"][:, None]
        m = masked.to(pred.dtype)
        n_masked = m.sum(dim=1)
        per_cell = ((pred - target) * m).pow(2).sum(dim=1) / n_masked.clamp_min(1.0)
        used = n_masked > 0
        loss = per_cell.sum() / used.sum().clamp_min(1).to(pred.dtype)
        return LossOutput(loss=loss, reconstruction_loss=per_cell)

    def _perturbation_loss(
        self, tensors: dict[str, torch.Tensor], pred: torch.Tensor
    ) -> LossOutput:
        missing = [k for k in (TARGET_KEY, MEASURED_KEY) if k not in tensors]
        if missing:
            raise KeyError(
                f"The minibatch lacks {missing}: perturbation training needs the target "
                "expression and the measured genes, [batch, n_genes] each."
            )
        pred = pred.float()
        target = tensors[TARGET_KEY].to(device=pred.device, dtype=pred.dtype)
        measured = tensors[MEASURED_KEY].to(device=pred.device, dtype=pred.dtype)
        if target.shape != pred.shape or measured.shape != pred.shape:
            raise ValueError(
                f"target and measured must have the prediction's shape {tuple(pred.shape)}, got "
                f"{tuple(target.shape)} and {tuple(measured.shape)}."
            )
        n = measured.sum(dim=1)
        per_cell = ((pred - target).pow(2) * measured).sum(dim=1) / n.clamp_min(1.0)
        loss = per_cell.mean() if per_cell.numel() else pred.sum() * 0.0
        return LossOutput(loss=loss, reconstruction_loss=per_cell)

    def sample(self, *args, **kwargs):
        """Not available: scFoundation does not define a distribution over counts."""
        raise NotImplementedError("SCFoundationModule does not define a sampling distribution.")
