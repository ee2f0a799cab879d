"""scGPT network as an scvi-tools module, key-compatible with the published checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ..nn import (
    AdversarialDiscriminator,
    BatchLabelEncoder,
    ClsDecoder,
    ContinuousValueEncoder,
    DomainSpecificBatchNorm1d,
    ExprDecoder,
    GeneEncoder,
    MVCDecoder,
    TransformerEncoder,
    TransformerEncoderLayer,
    elastic_cell_similarity,
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


def _masked_bernoulli_nll(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of ``target > 0`` under ``Bernoulli(sigmoid(logits))``.

    scGPT's ``criterion_neg_log_bernoulli`` over masked positions, computed from the logits.
    Returns the minibatch mean and the per-cell means (0 where nothing is masked).
    """
    m = mask.to(logits.dtype)
    nll = F.binary_cross_entropy_with_logits(
        logits, (target > 0).to(logits.dtype), reduction="none"
    )
    nll = nll * m
    return nll.sum() / m.sum().clamp_min(1.0), nll.sum(1) / m.sum(1).clamp_min(1.0)


class SCGPTModule(ClassifierMixin, BaseModuleClass):
    """scGPT transformer (``input_emb_style="continuous"``, ``<cls>`` cell embedding).

    The state dict keys are those of the published whole-human checkpoint after
    :func:`cellformers.pretrained.normalize_scgpt_state_dict` (``flag_encoder`` dropped):
    ``encoder.*``, ``value_encoder.*``, ``transformer_encoder.layers.{i}.*``, ``decoder.fc.*``
    and, with ``do_mvc``, ``mvc_decoder.gene2query.*`` / ``mvc_decoder.W.weight``. The options
    of scGPT's integration recipe add ``batch_encoder.*`` (``use_batch_labels``), ``dsbn.bns.*``
    (``domain_spec_batchnorm``), ``grad_reverse_discriminator.*`` (``do_dab``) and
    ``decoder.zero_logit.*`` / ``mvc_decoder.W_zero_logit.*`` (``explicit_zero_prob``), with the
    official names and shapes.

    Input is a pair of ``[batch, length]`` tensors: gene token ids (position 0 is ``<cls>``,
    padding uses ``pad_id``) and values (binned expression; ``pad_value`` at padding and, in the
    official zero-shot path, at ``<cls>``), plus integer batch labels ``[batch]`` when the
    module uses them. There is no positional encoding, so the output is invariant to the order
    of gene tokens.

    The scvi-tools protocol implements masked value pretraining: ``inference`` masks a fraction
    of the values per cell and encodes, ``generative`` decodes masked values from the token
    states (``mlm_pred``) and from the cell embedding (``mvc_pred``), and ``loss`` is the MSE of
    both over masked positions, plus the integration terms that are switched on (zero
    probabilities, ECS, DAB; see :meth:`loss`).

    With ``use_batch_labels`` the expression and MVC decoders read ``[state, batch embedding]``
    (``d_in = 2 * d_model``) as the official forward does; the encoder does not see the batch
    embedding. With ``domain_spec_batchnorm`` the summed gene + value embeddings pass through
    :class:`~cellformers.nn.DomainSpecificBatchNorm1d` before the transformer. The official
    model normalises a whole minibatch with the domain of its first cell; here every cell uses
    its own domain's statistics, which gives the official result in evaluation whenever a
    minibatch holds one batch label (as in the official recipe) and makes embeddings
    independent of the other cells in a minibatch.

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
    n_batch
        Number of batch labels (official ``num_batch_labels``); needed by the three batch
        options below.
    use_batch_labels
        Build ``batch_encoder`` and condition the expression and MVC decoders on the batch
        embedding.
    domain_spec_batchnorm
        Build ``dsbn`` (one set of batch-norm statistics per batch label, no affine
        parameters, eps 6.1e-5).
    do_dab
        Build the adversarial batch discriminator ``grad_reverse_discriminator`` (domain
        adaptation by reverse back-propagation) on the cell embedding.
    ecs_threshold
        Add the elastic cell similarity loss with this threshold (the integration recipe uses
        0.8); `None` leaves it out.
    ecs_weight
        Weight of the ECS loss (official 10).
    dab_weight
        Weight of the discriminator's cross-entropy (official ``dab_weight``, 1).
    explicit_zero_prob
        Build the zero-probability heads ``decoder.zero_logit`` and ``mvc_decoder.W_zero_logit``
        and add their Bernoulli likelihood of non-zero values to the loss.

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
        n_batch: int = 0,
        use_batch_labels: bool = False,
        domain_spec_batchnorm: bool = False,
        do_dab: bool = False,
        ecs_threshold: float | None = None,
        ecs_weight: float = 10.0,
        dab_weight: float = 1.0,
        explicit_zero_prob: bool = False,
    ):
        super().__init__()
        if n_labels < 0:
            raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
        if not 0 <= pad_id < n_tokens:
            raise ValueError(f"pad_id ({pad_id}) must be a token id in [0, {n_tokens}).")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        uses_batches = use_batch_labels or domain_spec_batchnorm or do_dab
        if uses_batches and n_batch < 1:
            raise ValueError(
                "use_batch_labels, domain_spec_batchnorm and do_dab need the number of batch "
                f"labels: pass n_batch >= 1 (got {n_batch})."
            )
        if ecs_threshold is not None and not -1.0 <= ecs_threshold <= 1.0:
            raise ValueError(f"ecs_threshold must be a similarity in [-1, 1], got {ecs_threshold}.")
        self.n_tokens = n_tokens
        self.pad_id = pad_id
        self.d_model = d_model
        self.pad_value = float(pad_value)
        self.mask_value = float(mask_value)
        self.mask_ratio = float(mask_ratio)
        self.do_mvc = do_mvc
        self.n_batch = int(n_batch) if uses_batches else 0
        self.use_batch_labels = use_batch_labels
        self.domain_spec_batchnorm = domain_spec_batchnorm
        self.do_dab = do_dab
        self.ecs_threshold = None if ecs_threshold is None else float(ecs_threshold)
        self.ecs_weight = float(ecs_weight)
        self.dab_weight = float(dab_weight)
        self.explicit_zero_prob = explicit_zero_prob

        self.encoder = GeneEncoder(n_tokens, d_model, padding_idx=pad_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout, max_value=512)
        if use_batch_labels:
            self.batch_encoder = BatchLabelEncoder(n_batch, d_model)
        if domain_spec_batchnorm:
            self.dsbn = DomainSpecificBatchNorm1d(d_model, n_batch, eps=6.1e-5, affine=False)
        # One layer deep-copied ``nlayers`` times, as torch's TransformerEncoder (and so the
        # official model) initialises.
        self.transformer_encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, d_hid, dropout, activation="relu"), nlayers
        )
        d_in = 2 * d_model if use_batch_labels else d_model
        self.decoder = ExprDecoder(d_model, d_in, explicit_zero_prob=explicit_zero_prob)
        if do_mvc:
            self.mvc_decoder = MVCDecoder(d_model, d_in, explicit_zero_prob=explicit_zero_prob)
        self.n_labels = int(n_labels)
        self.cls_decoder = ClsDecoder(d_model, n_labels, n_layers_cls) if n_labels else None
        if do_dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(
                d_model, n_batch, reverse_grad=True
            )
        self._objective = "mlm"
        self._init_weights()

    def _init_weights(self) -> None:
        # As the official ``init_weights``: only the gene embedding is re-initialised.
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)

    # ------------------------------------------------------------------ settings
    @property
    def objective(self) -> str:
        """Objective of :meth:`inference` and :meth:`loss`: ``"mlm"`` or ``"classification"``.

        ``"mlm"`` is masked value pretraining (with the integration terms that are switched
        on); ``"classification"`` trains ``cls_decoder`` on the unmasked input (the official
        annotation fine-tuning, ``CLS=True``, no masking).
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

    @property
    def uses_batch_labels(self) -> bool:
        """Whether the module reads batch labels (``use_batch_labels``, ``dsbn`` or ``do_dab``)."""
        return self.n_batch > 0

    # ------------------------------------------------------------------ encoding
    def _values(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.encoder.embedding.weight.dtype)

    def _batch_labels(self, batch_labels: torch.Tensor | None, n_cells: int) -> torch.Tensor | None:
        """Check and flatten batch labels (``None`` when the module reads none)."""
        if not self.uses_batch_labels:
            return None
        if batch_labels is None:
            raise ValueError(
                "This module uses batch labels (use_batch_labels, domain_spec_batchnorm or "
                "do_dab): pass `batch_labels`, one integer per cell."
            )
        batch_labels = batch_labels.reshape(-1).long()
        if batch_labels.shape[0] != n_cells:
            raise ValueError(f"Got {batch_labels.shape[0]} batch labels for {n_cells} cells.")
        if batch_labels.numel() and (batch_labels.min() < 0 or batch_labels.max() >= self.n_batch):
            raise ValueError(
                f"Batch labels must be in [0, {self.n_batch}); got values in "
                f"[{int(batch_labels.min())}, {int(batch_labels.max())}]."
            )
        return batch_labels

    def encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
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
        batch_labels
            Integer batch label of each cell ``[batch]``; required when the module uses batch
            labels (``domain_spec_batchnorm`` normalises each cell with its label's statistics).

        Returns
        -------
        Tensor of shape ``[batch, length, d_model]``; padded positions are zero (as in torch's
        fast path and flash attention; the official non-fast CPU path leaves values there).

        """
        return self._encode(genes, values, padding_mask, batch_labels=batch_labels)[0]

    def _encode(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None,
        n_queries: int | None = None,
        batch_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if genes.shape != values.shape or genes.dim() != 2:
            raise ValueError(
                f"genes and values must both be [batch, length]; got {tuple(genes.shape)} "
                f"and {tuple(values.shape)}."
            )
        batch_labels = self._batch_labels(batch_labels, genes.shape[0])
        if padding_mask is None:
            padding_mask = genes == self.pad_id
        gene_embs = self.encoder(genes)
        total = gene_embs + self.value_encoder(self._values(values))
        if self.domain_spec_batchnorm:
            total = self.dsbn(total, batch_labels, mask=~padding_mask)
        hidden = self.transformer_encoder(total, key_padding_mask=padding_mask, n_queries=n_queries)
        return hidden, gene_embs

    def cell_embedding(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
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
        batch_labels
            Integer batch label of each cell ``[batch]`` (when the module uses them).

        Returns
        -------
        Tensor of shape ``[batch, d_model]``.

        """
        # the last layer computes only the <cls> query
        hidden, _ = self._encode(
            genes, values, padding_mask, n_queries=1, batch_labels=batch_labels
        )
        return hidden[:, 0, :]

    def classify(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        batch_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits ``[batch, n_labels]`` from the ``<cls>`` embedding (``cls_output``)."""
        if self.cls_decoder is None:
            raise RuntimeError("This module has no classification head (built with n_labels=0).")
        return self.cls_decoder(self.cell_embedding(genes, values, padding_mask, batch_labels))

    def batch_logits(self, cell_emb: torch.Tensor) -> torch.Tensor:
        """Discriminator logits ``[batch, n_batch]`` of cell embeddings (``dab_output``)."""
        if not self.do_dab:
            raise RuntimeError("This module has no batch discriminator (built with do_dab=False).")
        return self.grad_reverse_discriminator(cell_emb)

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
        return {
            "genes": tensors["genes"],
            "values": tensors["values"],
            "batch_labels": tensors.get(REGISTRY_KEYS.BATCH_KEY)
            if self.uses_batch_labels
            else None,
        }

    @auto_move_data
    def inference(
        self,
        genes: torch.Tensor,
        values: torch.Tensor,
        batch_labels: torch.Tensor | None = None,
        mask: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Mask values (optionally) and encode.

        Parameters
        ----------
        genes
            Gene token ids ``[batch, length]``, ``<cls>`` first, padded with ``pad_id``.
        values
            Token values ``[batch, length]``, padded with ``pad_value``.
        batch_labels
            Integer batch label of each cell (minibatches carry them under scvi-tools'
            ``REGISTRY_KEYS.BATCH_KEY``); required when the module uses batch labels.
        mask
            Whether to mask ``mask_ratio`` of the positions of each cell.

        Returns
        -------
        Dictionary with ``hidden`` (``[batch, length, d_model]``), ``cell_emb``
        (``[batch, d_model]``), ``gene_embs`` (token-only embeddings after ``enc_norm``),
        ``mask`` (boolean ``[batch, length]``, `True` where masked), ``target`` (the
        unmasked values) and ``batch_labels`` (``[batch]`` or `None`).

        """
        genes = genes.long()
        batch_labels = self._batch_labels(batch_labels, genes.shape[0])
        target = self._values(values)
        if mask and self.objective == "mlm":
            masked = self.random_mask(genes)
            inputs = target.masked_fill(masked, self.mask_value)
        else:
            masked = torch.zeros_like(genes, dtype=torch.bool)
            inputs = target
        hidden, gene_embs = self._encode(genes, inputs, None, batch_labels=batch_labels)
        return {
            "hidden": hidden,
            "cell_emb": hidden[:, 0, :],
            "gene_embs": gene_embs,
            "mask": masked,
            "target": target,
            "batch_labels": batch_labels,
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
            "batch_labels": inference_outputs.get("batch_labels"),
        }

    @auto_move_data
    def generative(
        self,
        hidden: torch.Tensor,
        cell_emb: torch.Tensor,
        gene_embs: torch.Tensor,
        batch_labels: torch.Tensor | None = None,
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
        batch_labels
            Integer batch labels ``[batch]`` (with ``use_batch_labels`` or ``do_dab``).

        Returns
        -------
        Dictionary with ``mlm_pred`` ``[batch, length]``, with ``do_mvc`` ``mvc_pred``
        ``[batch, length]``, with ``explicit_zero_prob`` the logits of non-zero values
        ``mlm_zero_logits`` / ``mvc_zero_logits``, and with ``do_dab`` the discriminator's
        ``dab_logits`` ``[batch, n_batch]`` (the official ``mlm_output``, ``mvc_output`` and
        ``dab_output``).

        """
        if self.objective == "classification":
            return {"logits": self.cls_decoder(cell_emb)}
        states, cell_in = hidden, cell_emb
        if self.use_batch_labels:
            batch_labels = self._batch_labels(batch_labels, hidden.shape[0])
            batch_emb = self.batch_encoder(batch_labels)  # [B, d]
            states = torch.cat([hidden, batch_emb.unsqueeze(1).expand(-1, hidden.shape[1], -1)], 2)
            cell_in = torch.cat([cell_emb, batch_emb], dim=1)
        out = {"mlm_pred": self.decoder(states)}
        if self.explicit_zero_prob:
            out["mlm_zero_logits"] = self.decoder.zero_logits(states)
        if self.do_mvc:
            out["mvc_pred"] = self.mvc_decoder(cell_in, gene_embs)
            if self.explicit_zero_prob:
                out["mvc_zero_logits"] = self.mvc_decoder.zero_logits(cell_in, gene_embs)
        if self.do_dab:
            out["dab_logits"] = self.grad_reverse_discriminator(cell_emb)
        return out

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked value regression loss (with integration terms), or cross-entropy.

        ``loss`` is the MSE of ``mlm_pred`` over all masked positions of the minibatch plus,
        with ``do_mvc``, the same for ``mvc_pred`` (scGPT's ``masked_mse_loss``); with
        ``explicit_zero_prob`` plus the Bernoulli negative log-likelihood of the non-zero
        pattern at masked positions for each decoder (``criterion_neg_log_bernoulli``); with
        ``ecs_threshold`` plus ``ecs_weight`` times the ECS loss of the cell embeddings; with
        ``do_dab`` plus ``dab_weight`` times the cross-entropy of the discriminator's batch
        logits (whose gradient reaches the encoder reversed). ``reconstruction_loss`` is the
        sum of the value terms computed per cell (shape ``(batch,)``). For
        ``objective="classification"`` the loss is the cross-entropy of the class logits.

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
        :class:`scvi.module.base.LossOutput` with ``extra_metrics`` ``mlm_mse`` (and
        ``mvc_mse``, ``mlm_nll``, ``mvc_nll``, ``ecs``, ``dab_ce``, ``dab_accuracy`` for the
        terms in use).

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
        if self.explicit_zero_prob:
            nll, nll_cell = _masked_bernoulli_nll(
                generative_outputs["mlm_zero_logits"], target, mask
            )
            extra["mlm_nll"] = nll.detach()
            total, per_cell = total + nll, per_cell + nll_cell
        if self.do_mvc:
            mvc_pred = generative_outputs["mvc_pred"]
            mvc = _masked_mse(mvc_pred, target, mask)
            per_cell = per_cell + _masked_mse_per_cell(mvc_pred, target, mask)
            extra["mvc_mse"] = mvc.detach()
            total = total + mvc
            if self.explicit_zero_prob:
                nll, nll_cell = _masked_bernoulli_nll(
                    generative_outputs["mvc_zero_logits"], target, mask
                )
                extra["mvc_nll"] = nll.detach()
                total, per_cell = total + nll, per_cell + nll_cell
        if self.ecs_threshold is not None:
            ecs = elastic_cell_similarity(inference_outputs["cell_emb"], self.ecs_threshold)
            extra["ecs"] = ecs.detach()
            total = total + self.ecs_weight * ecs
        if self.do_dab:
            logits = generative_outputs["dab_logits"].float()
            labels = inference_outputs["batch_labels"]
            dab = F.cross_entropy(logits, labels)
            extra["dab_ce"] = dab.detach()
            extra["dab_accuracy"] = (logits.argmax(-1) == labels).float().mean().detach()
            total = total + self.dab_weight * dab
        return LossOutput(loss=total, reconstruction_loss=per_cell, extra_metrics=extra)

    # ------------------------------------------------------------------ query mapping
    def train_only_new_batches(self, n_reference: int) -> list:
        """Freeze everything but the parameters of batch labels ``>= n_reference``.

        For scArches-style query mapping: the batch labels ``0 .. n_reference - 1`` are those
        of the reference, the others are new. Afterwards only the new rows of
        ``batch_encoder.embedding.weight`` and the new outputs of the discriminator's
        ``out_layer`` receive gradients (gradient hooks zero the reference rows, so an
        optimiser without weight decay leaves them bit-identical), and ``dsbn`` keeps the
        reference domains' running statistics fixed while it estimates those of the new ones.
        Every other parameter gets ``requires_grad=False``.

        Parameters
        ----------
        n_reference
            Number of reference batch labels.

        Returns
        -------
        The hook handles (``handle.remove()`` lifts the gradient masks).

        """
        if not 0 <= n_reference <= self.n_batch:
            raise ValueError(f"n_reference must be in [0, {self.n_batch}], got {n_reference}.")
        partial = []
        if self.use_batch_labels:
            partial.append(self.batch_encoder.embedding.weight)
        if self.do_dab:
            partial += [
                self.grad_reverse_discriminator.out_layer.weight,
                self.grad_reverse_discriminator.out_layer.bias,
            ]
        keep = {id(p) for p in partial}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        handles = []
        for p in partial:
            row_mask = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
            row_mask[:n_reference] = 0
            row_mask = row_mask.reshape(-1, *([1] * (p.dim() - 1)))
            handles.append(p.register_hook(lambda g, m=row_mask: g * m.to(g.device, g.dtype)))
        if self.domain_spec_batchnorm:
            self.dsbn.freeze_domains(range(n_reference))
        return handles

    def sample(self, *args, **kwargs):
        """Not available: scGPT is not a generative model of counts."""
        raise NotImplementedError("SCGPTModule does not define a sampling distribution.")
