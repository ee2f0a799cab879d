"""scGPT network as an scvi-tools module, key-compatible with the published checkpoints."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ..nn import (
    ClsDecoder,
    ContinuousValueEncoder,
    ExprDecoder,
    GeneEncoder,
    MVCDecoder,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from ._classification import ClassifierMixin

OBJECTIVES: tuple[str, ...] = ("mlm", "classification")


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked positions, as scGPT's ``masked_mse_loss``.

    Returns 0 (not NaN) when nothing is masked.
    """
    m = mask.to(pred.dtype)
    return ((pred - target) * m).pow(2).sum() / m.sum().clamp_min(1.0)


def _masked_mse_per_cell(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    m = mask.to(pred.dtype)
    return ((pred - target) * m).pow(2).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class SCGPTModule(ClassifierMixin, BaseModuleClass):
    """scGPT transformer (``input_emb_style="continuous"``, ``<cls>`` cell embedding).

    The state dict keys are those of the published whole-human checkpoint after
    :func:`cellformers.pretrained.normalize_scgpt_state_dict` (``flag_encoder`` dropped):
    ``encoder.*``, ``value_encoder.*``, ``transformer_encoder.layers.{i}.*``, ``decoder.fc.*``
    and, with ``do_mvc``, ``mvc_decoder.gene2query.*`` / ``mvc_decoder.W.weight``.

    Input is a pair of ``[batch, length]`` tensors: gene token ids (position 0 is ``<cls>``,
    padding uses ``pad_id``) and values (binned expression; ``pad_value`` at padding and, in the
    official zero-shot path, at ``<cls>``). There is no positional encoding, so the output is
    invariant to the order of gene tokens.

    The scvi-tools protocol implements masked value pretraining: ``inference`` masks a fraction
    of the values per cell and encodes, ``generative`` decodes masked values from the token
    states (``mlm_pred``) and from the cell embedding (``mvc_pred``), and ``loss`` is the MSE of
    both over masked positions.

    Parameters
    ----------
    n_tokens
        Vocabulary size (including specials).
    pad_id
        Token id of ``<pad>``.
    d_model
        Embedding dimension (args.json ``embsize``).
    nhead
        Attention heads (args.json ``nheads``).
    d_hid
        Feed-forward hidden dimension.
    nlayers
        Number of transformer layers.
    dropout
        Dropout probability (value encoder, attention, residual branches, feed-forward).
    pad_value
        Value at padded positions.
    mask_value
        Value written at masked positions during masked pretraining.
    mask_ratio
        Fraction of (non-``<cls>``, non-padding) positions masked per cell.
    do_mvc
        Build the MVC (GEPC) decoder ``mvc_decoder``.
    n_labels
        Classes of the cell classification head ``cls_decoder`` (scGPT's ``ClsDecoder`` on the
        ``<cls>`` embedding, used for annotation fine-tuning); 0 builds none.
    n_layers_cls
        Linear layers of the classification head (official ``nlayers_cls``, 3).

    """

    def __init__(
        self,
        n_tokens: int,
        *,
        pad_id: int,
        d_model: int = 512,
        nhead: int = 8,
        d_hid: int = 512,
        nlayers: int = 12,
        dropout: float = 0.2,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        mask_ratio: float = 0.4,
        do_mvc: bool = True,
        n_labels: int = 0,
        n_layers_cls: int = 3,
    ):
        super().__init__()
        if n_labels < 0:
            raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
        if not 0 <= pad_id < n_tokens:
            raise ValueError(f"pad_id ({pad_id}) must be a token id in [0, {n_tokens}).")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        self.n_tokens = n_tokens
        self.pad_id = pad_id
        self.d_model = d_model
        self.pad_value = float(pad_value)
        self.mask_value = float(mask_value)
        self.mask_ratio = float(mask_ratio)
        self.do_mvc = do_mvc

        self.encoder = GeneEncoder(n_tokens, d_model, padding_idx=pad_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout, max_value=512)
        # One layer deep-copied ``nlayers`` times, as torch's TransformerEncoder (and so the
        # official model) initialises.
        self.transformer_encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, d_hid, dropout, activation="relu"), nlayers
        )
        self.decoder = ExprDecoder(d_model)
        if do_mvc:
            self.mvc_decoder = MVCDecoder(d_model)
        self.n_labels = int(n_labels)
        self.cls_decoder = ClsDecoder(d_model, n_labels, n_layers_cls) if n_labels else None
        self._objective = "mlm"
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official ``init_weights``: only the gene embedding is re-initialised.
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    # ------------------------------------------------------------------ settings
    @property
    def objective(self) -> str:
        """Objective of :meth:`inference` and :meth:`loss`: ``"mlm"`` or ``"classification"``.

        ``"mlm"`` is masked value pretraining; ``"classification"`` trains ``cls_decoder`` on
        the unmasked input (the official annotation fine-tuning, ``CLS=True``, no masking).
        """
        return self._objective

    @objective.setter
    def objective(self, value: str) -> None:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {value!r}.")
        if value == "classification" and self.cls_decoder is None:
            raise ValueError(
                "objective 'classification' needs the classification head; build the module "
                "with n_labels > 0."
            )
        self._objective = value

    # ------------------------------------------------------------------ encoding
    def _values(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.encoder.embedding.weight.dtype)

    def encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token states of the last transformer layer (the official ``_encode``).

        Parameters
        ----------
        genes
            Gene token ids ``[batch, length]``.
        values
            Token values ``[batch, length]``.
        padding_mask
            Boolean ``[batch, length]``, `True` at padding; defaults to ``genes == pad_id``.

        Returns
        -------
        Tensor of shape ``[batch, length, d_model]``; padded positions are zero (as in torch's
        fast path and flash attention; the official non-fast CPU path leaves values there).

        """
        return self._encode(genes, values, padding_mask)[0]

    def _encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None,
        n_queries: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if genes.shape != values.shape or genes.dim() != 2:
            raise ValueError(
                f"genes and values must both be [batch, length]; got {tuple(genes.shape)} "
                f"and {tuple(values.shape)}."
            )
        if padding_mask is None:
            padding_mask = genes == self.pad_id
        gene_embs = self.encoder(genes)
        total = gene_embs + self.value_encoder(self._values(values))
        hidden = self.transformer_encoder(total, key_padding_mask=padding_mask, n_queries=n_queries)
        return hidden, gene_embs

    def cell_embedding(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell embedding: the ``<cls>`` (position 0) output, not normalised.

        Parameters
        ----------
        genes
            Gene token ids ``[batch, length]`` with ``<cls>`` at position 0.
        values
            Token values ``[batch, length]``.
        padding_mask
            Boolean ``[batch, length]``, `True` at padding; defaults to ``genes == pad_id``.

        Returns
        -------
        Tensor of shape ``[batch, d_model]``.

        """
        # the last layer computes only the <cls> query
        return self._encode(genes, values, padding_mask, n_queries=1)[0][:, 0, :]

    def classify(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[batch, n_labels]`` from the ``<cls>`` embedding (``cls_output``)."""
        if self.cls_decoder is None:
            raise RuntimeError("This module has no classification head (built with n_labels=0).")
        return self.cls_decoder(self.cell_embedding(genes, values, padding_mask))

    # ------------------------------------------------------------------ masking
    def random_mask(
        self, genes: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Choose positions to mask for masked value pretraining.

        Per cell, ``int(n * mask_ratio)`` positions are drawn uniformly without replacement
        among the ``n`` positions that are neither ``<cls>`` (position 0) nor padding.

        Parameters
        ----------
        genes
            Gene token ids ``[batch, length]``.
        generator
            Optional random generator.

        Returns
        -------
        Boolean ``[batch, length]``, `True` at masked positions.

        """
        candidates = genes != self.pad_id
        candidates[:, 0] = False
        n_mask = (candidates.sum(dim=1).double() * self.mask_ratio).floor().long()
        keys = torch.rand(genes.shape, generator=generator, device=genes.device)
        keys = keys.masked_fill(~candidates, 2.0)  # non-candidates sort last
        order = keys.argsort(dim=1)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(genes.shape[1], device=genes.device).expand_as(order))
        return (ranks < n_mask[:, None]) & candidates

    # ------------------------------------------------------------------ scvi-tools protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {"genes": tensors["genes"], "values": tensors["values"]}

    @auto_move_data
    def inference(
        self, genes: torch.Tensor, values: torch.Tensor, mask: bool = True
    ) -> dict[str, torch.Tensor]:
        """Mask values (optionally) and encode.

        Parameters
        ----------
        genes
            Gene token ids ``[batch, length]``, ``<cls>`` first, padded with ``pad_id``.
        values
            Token values ``[batch, length]``, padded with ``pad_value``.
        mask
            Whether to mask ``mask_ratio`` of the positions of each cell.

        Returns
        -------
        Dictionary with ``hidden`` (``[batch, length, d_model]``), ``cell_emb``
        (``[batch, d_model]``), ``gene_embs`` (token-only embeddings after ``enc_norm``),
        ``mask`` (boolean ``[batch, length]``, `True` where masked) and ``target`` (the
        unmasked values).

        """
        genes = genes.long()
        target = self._values(values)
        if mask and self.objective == "mlm":
            masked = self.random_mask(genes)
            inputs = target.masked_fill(masked, self.mask_value)
        else:
            masked = torch.zeros_like(genes, dtype=torch.bool)
            inputs = target
        hidden, gene_embs = self._encode(genes, inputs, None)
        return {
            "hidden": hidden,
            "cell_emb": hidden[:, 0, :],
            "gene_embs": gene_embs,
            "mask": masked,
            "target": target,
        }

    def _get_generative_input(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        **kwargs,
    ) -> dict:
        return {
            "hidden": inference_outputs["hidden"],
            "cell_emb": inference_outputs["cell_emb"],
            "gene_embs": inference_outputs["gene_embs"],
        }

    @auto_move_data
    def generative(
        self, hidden: torch.Tensor, cell_emb: torch.Tensor, gene_embs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Decode values from token states (MLM) and from the cell embedding (MVC).

        Parameters
        ----------
        hidden
            Token states ``[batch, length, d_model]``.
        cell_emb
            Cell embeddings ``[batch, d_model]``.
        gene_embs
            Token-only gene embeddings ``[batch, length, d_model]``.

        Returns
        -------
        Dictionary with ``mlm_pred`` ``[batch, length]`` and, with ``do_mvc``, ``mvc_pred``
        ``[batch, length]``.

        """
        if self.objective == "classification":
            return {"logits": self.cls_decoder(cell_emb)}
        out = {"mlm_pred": self.decoder(hidden)}
        if self.do_mvc:
            out["mvc_pred"] = self.mvc_decoder(cell_emb, gene_embs)
        return out

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked value regression loss, or cross-entropy for ``objective="classification"``.

        ``loss`` is the MSE of ``mlm_pred`` over all masked positions of the minibatch plus,
        with ``do_mvc``, the same for ``mvc_pred`` (scGPT's ``masked_mse_loss``);
        ``reconstruction_loss`` is the same sum computed per cell (shape ``(batch,)``).

        Parameters
        ----------
        tensors
            The minibatch (unused beyond what ``inference`` consumed).
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.

        Returns
        -------
        :class:`scvi.module.base.LossOutput` with ``extra_metrics`` ``mlm_mse`` (and ``mvc_mse``).

        """
        if self.objective == "classification":
            return self._classification_loss(tensors, generative_outputs["logits"])
        mask = inference_outputs["mask"]
        target = inference_outputs["target"]
        mlm_pred = generative_outputs["mlm_pred"]
        mlm = _masked_mse(mlm_pred, target, mask)
        per_cell = _masked_mse_per_cell(mlm_pred, target, mask)
        extra = {"mlm_mse": mlm.detach()}
        total = mlm
        if self.do_mvc:
            mvc_pred = generative_outputs["mvc_pred"]
            mvc = _masked_mse(mvc_pred, target, mask)
            per_cell = per_cell + _masked_mse_per_cell(mvc_pred, target, mask)
            extra["mvc_mse"] = mvc.detach()
            total = total + mvc
        return LossOutput(loss=total, reconstruction_loss=per_cell, extra_metrics=extra)

    def sample(self, *args, **kwargs):
        """Not available: scGPT is not a generative model of counts."""
        raise NotImplementedError("SCGPTModule does not define a sampling distribution.")
