"""scBERT network (a Performer language model over a fixed gene panel) as an scvi-tools module.

The submodule names are those of the official ``PerformerLM`` (TencentAILabHealthcare/scBERT),
so ``panglao_pretrain.pth`` and fine-tuned ``*_best.pth`` checkpoints load with strict key
checking through :func:`cellformers.pretrained.load_scbert_state_dict`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ..nn import Performer
from ..nn._performer import STABILIZERS
from ._classification import ClassifierMixin

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("mlm", "classification")

#: Gene panel of the published model (PanglaoDB genes with gene2vec vectors).
SCBERT_N_GENES = 16906


class Gene2VecPositionalEmbedding(nn.Module):
    """Position table: row ``i`` is the vector of panel gene ``i`` (gene2vec, or learned).

    The table is held as ``emb.weight`` (a frozen :class:`torch.nn.Embedding`, key
    ``pos_emb.emb.weight``) in float64, as in the official checkpoint, whose constructor appends
    one zero row for the extra last position. A ``trainable`` table is learned with the rest
    of the network (for an scBERT-architecture model trained on a panel without gene2vec).

    Parameters
    ----------
    table
        ``[n_positions, dim]``.
    trainable
        Learn the table instead of keeping it fixed.

    """

    def __init__(self, table: torch.Tensor, *, trainable: bool = False):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(table, freeze=not trainable)

    def forward(self, length: int) -> torch.Tensor:
        """Rows ``0 .. length - 1`` of the table, ``[length, dim]``."""
        return self.emb.weight[:length]


class SCBERTClassifierHead(nn.Module):
    """The official fine-tuning head of scBERT (``finetune.py``'s ``Identity``), keys ``to_out.*``.

    ``fc3(drop(relu(fc2(drop(relu(fc1(relu(conv1(h)).flatten())))))))``: a ``1 x dim``
    convolution reduces each position's state to one number, then three linear layers map the
    ``seq_len`` numbers to the classes.

    Parameters
    ----------
    seq_len
        Number of positions (panel genes + 1).
    dim
        Model dimension (the convolution's width).
    n_labels
        Number of classes.
    hidden
        Width of ``fc1``'s output (512 in the official head).
    h_dim
        Width of ``fc2``'s output (128 in ``finetune.py``).
    dropout
        Dropout after ``fc1`` and ``fc2`` (0 in the official recipe).

    """

    def __init__(
        self,
        seq_len: int,
        dim: int,
        n_labels: int,
        *,
        hidden: int = 512,
        h_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(seq_len, hidden)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, h_dim)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(h_dim, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, n_labels]`` from final states ``[batch, seq_len, dim]``."""
        h = self.act(self.conv1(x[:, None]))  # [B, 1, seq_len, 1]
        h = h.reshape(h.shape[0], -1)
        h = self.dropout1(self.act1(self.fc1(h)))
        h = self.dropout2(self.act2(self.fc2(h)))
        return self.fc3(h)


def _position_table(gene2vec, n_genes: int, dim: int) -> torch.Tensor:
    if gene2vec is None:
        return torch.zeros(n_genes + 1, dim, dtype=torch.float64)
    table = torch.as_tensor(np.asarray(gene2vec) if not torch.is_tensor(gene2vec) else gene2vec)
    table = table.detach().to("cpu", torch.float64)
    if table.dim() != 2 or table.shape[1] != dim:
        raise ValueError(
            f"gene2vec must be a [n_genes (+1), {dim}] table (one {dim}-d row per panel gene), "
            f"got shape {tuple(table.shape)}."
        )
    if table.shape[0] == n_genes:
        # the official constructor appends one zero row for the extra last position
        table = torch.cat([table, table.new_zeros(1, dim)])
    elif table.shape[0] != n_genes + 1:
        raise ValueError(
            f"gene2vec has {table.shape[0]} rows; expected n_genes ({n_genes}) rows, or "
            f"n_genes + 1 ({n_genes + 1}) as stored in the checkpoint (pos_emb.emb.weight)."
        )
    if not torch.isfinite(table).all():
        raise ValueError("gene2vec holds NaN or infinite values.")
    return table.clone()


class SCBERTModule(ClassifierMixin, BaseModuleClass):
    """scBERT: token + gene2vec embeddings, a pre-norm Performer, a final norm and one head.

    The input of one cell is ``n_genes + 1`` tokens: the binned expression of each panel gene in
    panel order (``min(floor(log2(1 + CP10k)), num_tokens - 2)``) and the extra last token 0
    that the official preprocessing appends. Token ``num_tokens - 1`` is ``[MASK]`` (also the
    ignore label of masked pretraining).

    Submodules (and state-dict prefixes, those of the official ``PerformerLM``): ``token_emb``,
    ``pos_emb`` (:class:`Gene2VecPositionalEmbedding`, frozen float64 ``pos_emb.emb.weight``),
    ``performer`` (:class:`~cellformers.nn.Performer`), ``norm`` and ``to_out``: the masked-LM
    head ``Linear(dim, num_tokens)`` when ``n_labels == 0``, else the official fine-tuning head
    :class:`SCBERTClassifierHead` (which replaces it in ``finetune.py``).

    The scvi-tools protocol follows :attr:`objective`: ``"mlm"`` (masked pretraining as
    ``pretrain.py``) or ``"classification"`` (cross-entropy of :meth:`classify`). Minibatches
    hold the tokens under ``"input_ids"`` (int64 ``[batch, n_genes + 1]``).

    The Performer's random features are fixed (never redrawn implicitly, see
    :class:`~cellformers.nn.Performer`), and by default the key stabiliser is per cell, so a
    cell's outputs do not depend on its batch; ``stabilizer="batch"`` gives the official
    batch-dependent outputs (equal for batches of one cell, as ``predict.py`` runs).

    Parameters
    ----------
    n_genes
        Size of the gene panel (16,906 for the published model); the sequence has
        ``n_genes + 1`` positions.
    gene2vec
        Position table, ``[n_genes + 1, dim]`` as stored in the checkpoint, or ``[n_genes,
        dim]`` gene2vec vectors to which a zero row is appended (as the official constructor
        does). `None` gives zeros, to be replaced by loading a checkpoint. Kept frozen in
        float64.
    position_embedding
        Add the gene2vec table (official ``g2v_position_emb``); `False` builds no ``pos_emb``
        (the official model then cannot tell panel genes apart except through the fine-tuning
        head); ``"learned"`` learns the table (float32, initialised from ``gene2vec`` when
        given, else from a standard normal), so a model trained from scratch on any panel
        knows which gene each position holds.
    num_tokens
        Number of tokens (``bin_num + 2`` = 7).
    dim
        Model dimension.
    depth
        Number of Performer layers.
    heads
        Attention heads.
    dim_head
        Dimension of one head (64; not ``dim / heads``).
    ff_mult
        Feed-forward hidden dimension is ``dim * ff_mult``.
    nb_features
        Random features per layer; `None` gives ``int(dim_head * ln(dim_head))`` (266).
    emb_dropout
        Dropout after the embeddings.
    ff_dropout
        Dropout on the feed-forward hidden activation.
    attn_dropout
        Dropout after each attention block.
    ff_chunks
        Apply the feed-forward blocks in this many pieces along the sequence (saves memory).
    n_labels
        Number of classes; ``> 0`` builds the fine-tuning head instead of the masked-LM head.
    classifier_hidden
        Widths of ``fc1`` and ``fc2`` of the fine-tuning head (official: 512, 128).
    classifier_dropout
        Dropout inside the fine-tuning head.
    mlm_probability
        Fraction of a cell's non-zero tokens chosen for prediction (rounded up).
    replace_prob
        Probability that a chosen token is replaced by ``[MASK]`` (otherwise kept).
    stabilizer
        Performer key stabiliser: ``"cell"`` (default) or ``"batch"`` (official).

    """

    def __init__(
        self,
        n_genes: int = SCBERT_N_GENES,
        *,
        gene2vec: np.ndarray | torch.Tensor | None = None,
        position_embedding: bool | str = True,
        num_tokens: int = 7,
        dim: int = 200,
        depth: int = 6,
        heads: int = 10,
        dim_head: int = 64,
        ff_mult: int = 4,
        nb_features: int | None = None,
        emb_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_dropout: float = 0.0,
        ff_chunks: int = 1,
        n_labels: int = 0,
        classifier_hidden: tuple[int, int] = (512, 128),
        classifier_dropout: float = 0.0,
        mlm_probability: float = 0.15,
        replace_prob: float = 0.9,
        stabilizer: str = "cell",
    ):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}.")
        if num_tokens < 3:
            raise ValueError(
                f"num_tokens must be >= 3 (token 0, at least one expression bin and [MASK]), "
                f"got {num_tokens}."
            )
        if n_labels < 0:
            raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
        if stabilizer not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}.")
        for name, p in (("mlm_probability", mlm_probability), ("replace_prob", replace_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}.")
        if len(classifier_hidden) != 2:
            raise ValueError(
                f"classifier_hidden must hold two widths (fc1, fc2), got {classifier_hidden!r}."
            )

        self.n_genes = int(n_genes)
        self.max_seq_len = self.n_genes + 1
        self.num_tokens = int(num_tokens)
        self.mask_token_id = self.num_tokens - 1
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.dim_head = int(dim_head)
        self.n_labels = int(n_labels)
        self.mlm_probability = float(mlm_probability)
        self.replace_prob = float(replace_prob)

        self.token_emb = nn.Embedding(num_tokens, dim)
        if position_embedding not in (True, False, "learned"):
            raise ValueError(
                f"position_embedding must be True, False or 'learned', got {position_embedding!r}."
            )
        self.position_embedding = position_embedding
        if position_embedding == "learned":
            if gene2vec is None:
                table = torch.randn(self.n_genes + 1, dim)
            else:
                table = _position_table(gene2vec, self.n_genes, dim).float()
            self.pos_emb = Gene2VecPositionalEmbedding(table, trainable=True)
        elif position_embedding:
            self.pos_emb = Gene2VecPositionalEmbedding(_position_table(gene2vec, self.n_genes, dim))
        else:
            self.pos_emb = None
        if not position_embedding and gene2vec is not None:
            raise ValueError("gene2vec is given but position_embedding=False.")
        self.dropout = nn.Dropout(emb_dropout)
        self.performer = Performer(
            dim,
            depth,
            heads,
            dim_head,
            ff_mult=ff_mult,
            nb_features=nb_features,
            qkv_bias=False,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            ff_chunks=ff_chunks,
            stabilizer=stabilizer,
        )
        self.norm = nn.LayerNorm(dim)
        if n_labels > 0:
            self.to_out = SCBERTClassifierHead(
                self.max_seq_len,
                dim,
                n_labels,
                hidden=classifier_hidden[0],
                h_dim=classifier_hidden[1],
                dropout=classifier_dropout,
            )
            self._objective = "classification"
        else:
            self.to_out = nn.Linear(dim, num_tokens)
            self._objective = "mlm"

    # ------------------------------------------------------------------ settings
    @property
    def objective(self) -> str:
        """Objective of :meth:`inference` and :meth:`loss`: ``"mlm"`` or ``"classification"``."""
        return self._objective

    @objective.setter
    def objective(self, value: str) -> None:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {value!r}.")
        if value == "mlm" and self.n_labels > 0:
            raise ValueError(
                "Masked pretraining (objective 'mlm') needs the masked-expression head, but this "
                "module has the fine-tuning head in to_out (built with n_labels > 0); use "
                "mode='finetune', or build a new model with n_labels=0."
            )
        if value == "classification" and self.n_labels == 0:
            raise ValueError(
                "objective 'classification' needs the fine-tuning head; build the module with "
                "n_labels > 0."
            )
        self._objective = value

    @property
    def stabilizer(self) -> str:
        """Performer key stabiliser, ``"cell"`` (batch-invariant) or ``"batch"`` (official)."""
        return self.performer.stabilizer

    @stabilizer.setter
    def stabilizer(self, value: str) -> None:
        self.performer.stabilizer = value

    # ------------------------------------------------------------------ forward
    def _check_tokens(self, tokens: torch.Tensor, *, full: bool = False) -> torch.Tensor:
        if not torch.is_tensor(tokens) or tokens.dim() != 2:
            shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens)
            raise ValueError(f"tokens must be a [batch, length] tensor, got {shape}.")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}.")
        length = tokens.shape[1]
        if full and length != self.max_seq_len:
            raise ValueError(
                f"The classifier needs all {self.max_seq_len} positions (n_genes + 1, the extra "
                f"last token included), got {length}."
            )
        if length > self.max_seq_len:
            raise ValueError(
                f"tokens have {length} positions, more than n_genes + 1 = {self.max_seq_len}."
            )
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.num_tokens):
            raise ValueError(
                f"tokens must be in [0, {self.num_tokens}); got values in "
                f"[{int(tokens.min())}, {int(tokens.max())}]."
            )
        return tokens.long()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings (before the Performer), ``[batch, length, dim]``.

        The position table is added in float64 and rounded once, as the official in-place add
        of the float64 table does.

        Parameters
        ----------
        tokens
            Int64 ``[batch, length]``.

        Returns
        -------
        Tensor ``[batch, length, dim]`` in the dtype of ``token_emb``.

        """
        tokens = self._check_tokens(tokens)
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x += self.pos_emb(tokens.shape[1])
        return self.dropout(x)

    def encode(self, tokens: torch.Tensor, *, n_layers: int | None = None) -> torch.Tensor:
        """Token states after the Performer and the final LayerNorm (``return_encodings=True``).

        Parameters
        ----------
        tokens
            Int64 ``[batch, length]``: binned expression per panel gene and the extra last token
            (``length = n_genes + 1``; shorter inputs use the first positions).
        n_layers
            Run only the first ``n_layers`` Performer layers and return their output without
            the final norm; `None` runs all layers and the final norm.

        Returns
        -------
        Tensor ``[batch, length, dim]``.

        """
        x = self.embed_tokens(tokens)
        x = self.performer(x, n_layers=n_layers)
        return self.norm(x) if n_layers is None or n_layers == self.depth else x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits ``[..., num_tokens]`` of the masked-LM head from final states."""
        if self.n_labels > 0:
            raise RuntimeError(
                "This module has the fine-tuning head in to_out (n_labels > 0), not the "
                "masked-LM head."
            )
        return self.to_out(hidden)

    def classify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits of the fine-tuning head (``finetune.py`` / ``predict.py``).

        Parameters
        ----------
        tokens
            Int64 ``[batch, n_genes + 1]``.

        Returns
        -------
        Tensor ``[batch, n_labels]``.

        """
        if self.n_labels == 0:
            raise RuntimeError("This module has no fine-tuning head (built with n_labels=0).")
        self._check_tokens(tokens, full=True)
        return self.to_out(self.encode(tokens))

    def forward_official(self, tokens: torch.Tensor) -> torch.Tensor:
        """Compute what the official ``PerformerLM.forward`` returns, ``to_out(encode(tokens))``.

        Parameters
        ----------
        tokens
            Int64 ``[batch, length]``.

        Returns
        -------
        ``[batch, length, num_tokens]`` (masked-LM head) or ``[batch, n_labels]``.

        """
        if self.n_labels > 0:
            return self.classify(tokens)
        return self.to_out(self.encode(tokens))

    # ------------------------------------------------------------------ masking
    def random_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose and corrupt tokens for masked pretraining, with ``pretrain.py``'s rule.

        Tokens 0 and ``[MASK]`` are never chosen. Of each cell's ``n`` other (non-zero) tokens,
        exactly ``ceil(mlm_probability * n)`` (computed in float32, as the official code does)
        are chosen uniformly at random; each chosen token becomes ``[MASK]`` with probability
        ``replace_prob`` and stays unchanged otherwise (no random-token replacement). Random
        draws come from torch's global generator.

        Parameters
        ----------
        tokens
            Int64 ``[batch, length]``.

        Returns
        -------
        ``(masked_tokens, mask)``: the corrupted tokens and a boolean ``[batch, length]``,
        `True` at the positions to predict.

        """
        tokens = self._check_tokens(tokens)
        batch, length = tokens.shape
        device = tokens.device
        eligible = (tokens != 0) & (tokens != self.mask_token_id)
        n_chosen = (eligible.sum(dim=1).to(torch.float32) * self.mlm_probability).ceil().long()
        # pretrain.py takes the top ceil(p * length) random scores, so no cell gets more
        k_max = min(length, math.ceil(self.mlm_probability * length))
        n_chosen = n_chosen.clamp_max(k_max)
        mask = torch.zeros_like(eligible)
        if k_max > 0 and batch:
            scores = torch.rand(batch, length, device=device).masked_fill(~eligible, -1.0)
            chosen = scores.topk(k_max, dim=1).indices
            keep = torch.arange(k_max, device=device)[None, :] < n_chosen[:, None]
            mask.scatter_(1, chosen, keep)
        replace = torch.rand(batch, length, device=device) < self.replace_prob
        masked = tokens.masked_fill(mask & replace, self.mask_token_id)
        return masked, mask

    # ------------------------------------------------------------------ scvi-tools protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        if "input_ids" not in tensors:
            raise KeyError(
                "The minibatch has no 'input_ids' (scBERT tokens [batch, n_genes + 1]); "
                "tokenize the expression with the scBERT binning first."
            )
        return {"input_ids": tensors["input_ids"]}

    @auto_move_data
    def inference(self, input_ids: torch.Tensor, mask: bool = True) -> dict[str, torch.Tensor]:
        """Encode the minibatch for the current :attr:`objective`.

        Parameters
        ----------
        input_ids
            Tokens ``[batch, n_genes + 1]``.
        mask
            For ``"mlm"``: corrupt the input with :meth:`random_mask` (`False` encodes it as is
            and nothing is predicted).

        Returns
        -------
        ``hidden`` (final states ``[batch, length, dim]``) and, for ``"mlm"``, ``mask``
        (positions to predict) and ``target`` (the uncorrupted tokens).

        """
        tokens = self._check_tokens(input_ids)
        if self.objective == "classification":
            self._check_tokens(tokens, full=True)
            return {"hidden": self.encode(tokens)}
        if mask:
            corrupted, chosen = self.random_mask(tokens)
        else:
            corrupted, chosen = tokens, torch.zeros_like(tokens, dtype=torch.bool)
        return {"hidden": self.encode(corrupted), "mask": chosen, "target": tokens}

    def _get_generative_input(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        **kwargs,
    ) -> dict:
        return {"hidden": inference_outputs["hidden"], "mask": inference_outputs.get("mask")}

    @auto_move_data
    def generative(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Apply the head of the current :attr:`objective`.

        Parameters
        ----------
        hidden
            Final states ``[batch, length, dim]``.
        mask
            Boolean ``[batch, length]``, the positions to predict (``"mlm"``).

        Returns
        -------
        ``{"mlm_logits": [n_masked, num_tokens]}`` (logits at the masked positions, in row-major
        order of ``mask``) or ``{"logits": [batch, n_labels]}``.

        """
        if self.objective == "classification":
            return {"logits": self.to_out(hidden)}
        return {"mlm_logits": self.mlm_logits(hidden[mask])}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Cross-entropy of the current :attr:`objective`.

        ``"mlm"``: ``loss`` is the mean cross-entropy over all masked tokens of the minibatch
        (``CrossEntropyLoss(ignore_index=[MASK])`` of ``pretrain.py``, before its division by
        the gradient-accumulation steps), ``reconstruction_loss`` the mean over each cell's
        masked tokens (0 for a cell without any), ``extra_metrics["mlm_accuracy"]`` the
        fraction of masked tokens whose most likely expression bin (tokens 1 to
        ``num_tokens - 2``, as ``pretrain.py`` scores) is right.
        ``"classification"``: ``loss`` is the mean cross-entropy of the class logits,
        ``reconstruction_loss`` the per-cell cross-entropy, ``extra_metrics["accuracy"]``.

        Parameters
        ----------
        tensors
            The minibatch (labels are read from it for classification).
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
        mask = inference_outputs["mask"]
        target = inference_outputs["target"][mask]
        logits = generative_outputs["mlm_logits"]
        batch = mask.shape[0]
        if target.numel() == 0:
            zero = inference_outputs["hidden"].sum() * 0.0
            return LossOutput(
                loss=zero,
                reconstruction_loss=zero.expand(batch),
                extra_metrics={"mlm_accuracy": zero.detach()},
            )
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        rows = mask.nonzero()[:, 0]
        per_cell = ce.new_zeros(batch).index_add(0, rows, ce)
        per_cell = per_cell / mask.sum(dim=1).clamp_min(1).to(ce.dtype)
        predicted = logits[:, 1 : self.num_tokens - 1].argmax(dim=-1) + 1
        accuracy = (predicted == target).float().mean()
        return LossOutput(
            loss=ce.mean(),
            reconstruction_loss=per_cell,
            extra_metrics={"mlm_accuracy": accuracy.detach()},
        )

    def sample(self, *args, **kwargs):
        """Not available: scBERT is not a generative model of counts."""
        raise NotImplementedError("SCBERTModule does not define a sampling distribution.")
