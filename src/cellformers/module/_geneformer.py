"""Geneformer network (a BERT encoder) as an scvi-tools module.

Numerically equal to Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification`` with
the same weights; :mod:`cellformers.pretrained` converts the official checkpoints.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from ..nn import MaskedLMHead, TransformerEncoder, TransformerEncoderLayer
from ._classification import ClassifierMixin

logger = logging.getLogger(__name__)

OBJECTIVES: tuple[str, ...] = ("mlm", "classification")
_HIDDEN_ACTS: tuple[str, ...] = ("relu", "gelu")


class GeneformerEmbeddings(nn.Module):
    """BERT input embeddings: word + absolute position + token type 0, then LayerNorm and dropout.

    Position ids are ``arange(length)`` from 0 (no offset for padding) and every token gets
    token type 0 (Geneformer never passes ``token_type_ids``), as in Hugging Face BERT.

    Parameters
    ----------
    vocab_size
        Number of tokens.
    hidden_size
        Embedding dimension.
    max_position_embeddings
        Number of position rows (longest input).
    type_vocab_size
        Number of token-type rows (only row 0 is used).
    pad_token_id
        Padding row of the word embeddings (gets no gradient).
    layer_norm_eps
        Epsilon of the layer norm.
    dropout
        Dropout probability after the layer norm.

    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_position_embeddings: int,
        type_vocab_size: int,
        pad_token_id: int,
        layer_norm_eps: float,
        dropout: float,
    ):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``[batch, length]`` token ids into ``[batch, length, hidden_size]``."""
        length = input_ids.shape[1]
        # the same sum order as Hugging Face: (word + token type) + position
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:length]
        return self.dropout(self.norm(x))


class GeneformerModule(ClassifierMixin, BaseModuleClass):
    """Geneformer: a post-norm BERT encoder with a tied masked-LM head and an optional classifier.

    Submodules (and state-dict prefixes): ``embeddings`` (:class:`GeneformerEmbeddings`),
    ``encoder`` (a :class:`~cellformers.nn.TransformerEncoder` of post-norm
    :class:`~cellformers.nn.TransformerEncoderLayer`, with query/key/value packed in
    ``self_attn.in_proj_weight``), ``mlm_head`` (:class:`~cellformers.nn.MaskedLMHead`, its output
    matrix tied to the word embeddings) and, with ``n_labels > 0``, ``pooler`` (``Linear`` +
    tanh on token 0) and ``classifier``, as in ``BertForSequenceClassification``. The names differ
    from Hugging Face's; :func:`cellformers.pretrained.load_geneformer_state_dict` converts.

    The scvi-tools protocol follows :attr:`objective`: ``"mlm"`` (masked-token pretraining with
    the 80/10/10 rule of Hugging Face's ``DataCollatorForLanguageModeling``) or
    ``"classification"`` (cross-entropy of :meth:`classify` against the labels).

    Parameters
    ----------
    vocab_size
        Number of tokens (including ``<pad>`` and ``<mask>``).
    hidden_size
        Hidden dimension.
    num_hidden_layers
        Number of encoder layers.
    num_attention_heads
        Attention heads per layer.
    intermediate_size
        Feed-forward hidden dimension.
    max_position_embeddings
        Longest input (number of position embeddings).
    hidden_dropout_prob
        Dropout on the embeddings and on both residual branches of every layer.
    attention_probs_dropout_prob
        Dropout on the attention weights.
    layer_norm_eps
        Epsilon of every layer norm.
    type_vocab_size
        Rows of the token-type embedding (row 0 is added to every token).
    hidden_act
        ``"relu"`` (Geneformer) or ``"gelu"``; used in the feed-forward blocks and the MLM head.
    pad_token_id
        Id of ``<pad>``.
    mask_token_id
        Id of ``<mask>``.
    mlm_head
        Build the masked-LM head.
    n_labels
        Number of classes; ``> 0`` builds ``pooler`` and ``classifier``.
    classifier_dropout
        Dropout before the classifier; `None` uses ``hidden_dropout_prob`` (as Hugging Face).
    mlm_probability
        Probability that a real token is chosen for prediction in masked pretraining.
    initializer_range
        Standard deviation of the normal initialisation of weights (BERT's
        ``initializer_range``).

    """

    def __init__(
        self,
        vocab_size: int,
        *,
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 2048,
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.02,
        layer_norm_eps: float = 1e-12,
        type_vocab_size: int = 2,
        hidden_act: str = "relu",
        pad_token_id: int = 0,
        mask_token_id: int = 1,
        mlm_head: bool = True,
        n_labels: int = 0,
        classifier_dropout: float | None = None,
        mlm_probability: float = 0.15,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if hidden_act not in _HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {_HIDDEN_ACTS}, got {hidden_act!r}.")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})."
            )
        for name, token in (("pad_token_id", pad_token_id), ("mask_token_id", mask_token_id)):
            if not 0 <= token < vocab_size:
                raise ValueError(f"{name} ({token}) must be a token id in [0, {vocab_size}).")
        if n_labels < 0:
            raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
        if not 0.0 <= mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}.")
        if type_vocab_size < 1:
            raise ValueError(f"type_vocab_size must be >= 1, got {type_vocab_size}.")

        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.intermediate_size = int(intermediate_size)
        self.max_position_embeddings = int(max_position_embeddings)
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
        self.layer_norm_eps = float(layer_norm_eps)
        self.type_vocab_size = int(type_vocab_size)
        self.hidden_act = hidden_act
        self.pad_token_id = int(pad_token_id)
        self.mask_token_id = int(mask_token_id)
        self.n_labels = int(n_labels)
        self.classifier_dropout_prob = classifier_dropout
        self.mlm_probability = float(mlm_probability)
        self.initializer_range = float(initializer_range)

        self.embeddings = GeneformerEmbeddings(
            vocab_size,
            hidden_size,
            max_position_embeddings,
            type_vocab_size,
            pad_token_id,
            layer_norm_eps,
            hidden_dropout_prob,
        )

        def layer() -> TransformerEncoderLayer:
            # the BERT layer: post-norm, no dropout on the feed-forward hidden activation
            return TransformerEncoderLayer(
                hidden_size,
                num_attention_heads,
                intermediate_size,
                dropout=hidden_dropout_prob,
                activation=hidden_act,
                norm_first=False,
                layer_norm_eps=layer_norm_eps,
                attention_dropout=attention_probs_dropout_prob,
                activation_dropout=0.0,
            )

        self.encoder = TransformerEncoder(layer, num_hidden_layers)
        self.mlm_head = (
            MaskedLMHead(hidden_size, vocab_size, hidden_act, layer_norm_eps) if mlm_head else None
        )
        if n_labels > 0:
            self.pooler = nn.Linear(hidden_size, hidden_size)
            drop = hidden_dropout_prob if classifier_dropout is None else classifier_dropout
            self.classifier_dropout = nn.Dropout(drop)
            self.classifier = nn.Linear(hidden_size, n_labels)
        else:
            self.pooler = None
            self.classifier_dropout = None
            self.classifier = None
        self._objective = "mlm" if mlm_head or n_labels == 0 else "classification"
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        """Initialise as Hugging Face BERT: weights normal(0, ``initializer_range``), biases 0.

        Embeddings are normal with the ``pad_token_id`` row zeroed, layer norms are (1, 0) and
        the MLM output bias is 0.
        """
        std = self.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.encoder.layers:
            # packed [W_q; W_k; W_v]: each block normal(0, std) as three separate Linear layers
            nn.init.normal_(layer.self_attn.in_proj_weight, mean=0.0, std=std)
            nn.init.zeros_(layer.self_attn.in_proj_bias)
        if self.mlm_head is not None:
            nn.init.zeros_(self.mlm_head.bias)

    @property
    def objective(self) -> str:
        """Training objective followed by :meth:`inference` and :meth:`loss`: ``"mlm"`` or ``"classification"``."""
        return self._objective

    @objective.setter
    def objective(self, value: str) -> None:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {value!r}.")
        if value == "mlm" and self.mlm_head is None:
            raise ValueError(
                "objective 'mlm' needs the masked-LM head; build the module with mlm_head=True."
            )
        if value == "classification" and self.classifier is None:
            raise ValueError(
                "objective 'classification' needs a classifier; build the module with n_labels > 0."
            )
        self._objective = value

    # ------------------------------------------------------------------ encoding
    @staticmethod
    def _lengths(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Lengths as int64 ``[batch]`` on the device of ``input_ids`` (``[batch, 1]`` accepted)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}."
            )
        batch = input_ids.shape[0]
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        if lengths.shape == (batch, 1):
            lengths = lengths[:, 0]
        if lengths.shape != (batch,):
            raise ValueError(
                f"lengths must have shape ({batch},) (one per cell), got {tuple(lengths.shape)}."
            )
        return lengths.long()

    def _padding_mask(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = self._lengths(input_ids, lengths)
        batch, length = input_ids.shape
        if length > self.max_position_embeddings:
            raise ValueError(
                f"Inputs of length {length} exceed max_position_embeddings "
                f"({self.max_position_embeddings}); truncate the tokens to that length."
            )
        if batch and (lengths.min() < 1 or lengths.max() > length):
            raise ValueError(
                f"lengths must be in [1, {length}] (the padded length); got values in "
                f"[{int(lengths.min())}, {int(lengths.max())}]. Cells without tokens cannot be encoded."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.vocab_size):
            raise ValueError(
                f"input_ids must be token ids in [0, {self.vocab_size}); got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]."
            )
        positions = torch.arange(length, device=input_ids.device)
        return positions[None, :] >= lengths[:, None]

    def _encode(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        *,
        n_layers: int | None = None,
        n_queries: int | None = None,
    ) -> torch.Tensor:
        input_ids = input_ids.long()
        padding = self._padding_mask(input_ids, lengths)
        x = self.embeddings(input_ids)
        if n_layers == 0:
            x = x.masked_fill(padding[..., None], 0.0)
            return x if n_queries is None else x[:, :n_queries]
        return self.encoder(x, key_padding_mask=padding, n_queries=n_queries, n_layers=n_layers)

    def _n_layers(self, n_layers: int | None) -> int | None:
        if n_layers is None:
            return None
        n = self.num_hidden_layers
        if not -(n + 1) <= n_layers <= n:
            raise ValueError(
                f"n_layers must be in [{-(n + 1)}, {n}] (indices into the {n + 1} hidden states: "
                f"0 = embeddings, {n} = last layer), got {n_layers}."
            )
        return n_layers % (n + 1)

    def hidden_states(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, *, n_layers: int | None = None
    ) -> torch.Tensor:
        """Token states after the first ``n_layers`` encoder layers.

        Equal to Hugging Face's ``outputs.hidden_states[n_layers]`` (with ``attention_mask``
        marking the first ``lengths`` tokens) at real positions; only the layers needed run.

        Parameters
        ----------
        input_ids
            Token ids ``[batch, length]``, right-padded.
        lengths
            Number of real tokens per cell ``[batch]`` (or ``[batch, 1]``), at least 1.
        n_layers
            ``0`` is the embedding output, ``k`` the output of layer ``k``, `None` the last
            layer. Negative values index from the end like Python (``-1`` = last layer,
            ``-2`` = penultimate, Geneformer's default ``emb_layer=-1``).

        Returns
        -------
        Tensor ``[batch, length, hidden_size]``; positions ``>= lengths`` are zero.

        """
        return self._encode(input_ids, lengths, n_layers=self._n_layers(n_layers))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits from last-layer token states.

        Parameters
        ----------
        hidden
            Token states ``[..., hidden_size]``.

        Returns
        -------
        Tensor ``[..., vocab_size]``.

        """
        if self.mlm_head is None:
            raise RuntimeError("This module has no masked-LM head (built with mlm_head=False).")
        return self.mlm_head(hidden, self.embeddings.word_embeddings.weight)

    def _classifier_logits(self, first_token: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(first_token))
        return self.classifier(self.classifier_dropout(pooled))

    def classify(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits as ``BertForSequenceClassification``.

        ``classifier(dropout(tanh(pooler(h_last[:, 0]))))``; the last layer computes token 0 only.

        Parameters
        ----------
        input_ids
            Token ids ``[batch, length]``, right-padded.
        lengths
            Number of real tokens per cell ``[batch]``.

        Returns
        -------
        Tensor ``[batch, n_labels]``.

        """
        if self.classifier is None:
            raise RuntimeError("This module has no classifier (built with n_labels=0).")
        first = self._encode(input_ids, lengths, n_queries=1)[:, 0]
        return self._classifier_logits(first)

    # ------------------------------------------------------------------ masking
    def random_mask(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose and corrupt tokens for masked-LM training.

        The rule (and the order of random draws, from torch's global generator) of Hugging
        Face's ``DataCollatorForLanguageModeling.torch_mask_tokens``: each real token that is
        not ``<pad>`` or ``<mask>`` is chosen with probability ``mlm_probability``; of the
        chosen, 80% become ``<mask>``, 10% a random id uniform in ``[0, vocab_size)`` and 10%
        stay. Geneformer registers only ``<pad>`` and ``<mask>`` as special, so ``<cls>`` and
        ``<eos>`` can be chosen.

        Parameters
        ----------
        input_ids
            Token ids ``[batch, length]``, right-padded.
        lengths
            Number of real tokens per cell ``[batch]``.

        Returns
        -------
        ``(masked_input_ids, mask)``: the corrupted ids and a boolean ``[batch, length]``,
        `True` at the positions to predict.

        """
        input_ids = input_ids.long()
        lengths = self._lengths(input_ids, lengths)
        shape, device = input_ids.shape, input_ids.device
        positions = torch.arange(shape[1], device=device)
        special = (
            (positions[None, :] >= lengths[:, None])
            | (input_ids == self.pad_token_id)
            | (input_ids == self.mask_token_id)
        )
        probability = torch.full(shape, self.mlm_probability, device=device)
        probability.masked_fill_(special, 0.0)
        mask = torch.bernoulli(probability).bool()
        replaced = torch.bernoulli(torch.full(shape, 0.8, device=device)).bool() & mask
        masked = input_ids.masked_fill(replaced, self.mask_token_id)
        randomized = (
            torch.bernoulli(torch.full(shape, 0.5, device=device)).bool() & mask & ~replaced
        )
        random_ids = torch.randint(self.vocab_size, shape, dtype=torch.long, device=device)
        masked = torch.where(randomized, random_ids, masked)
        return masked, mask

    # ------------------------------------------------------------------ scvi-tools protocol
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {
            "input_ids": tensors["input_ids"],
            "lengths": tensors["lengths"],
            "labels": tensors.get(REGISTRY_KEYS.LABELS_KEY),
        }

    @auto_move_data
    def inference(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask: bool = True,
    ) -> dict[str, torch.Tensor | None]:
        """Encode the minibatch for the current :attr:`objective`.

        Parameters
        ----------
        input_ids
            Token ids ``[batch, length]``, right-padded with ``pad_token_id``.
        lengths
            Number of real tokens per cell ``[batch]``.
        labels
            Class codes ``[batch, 1]`` (used by ``loss`` for classification).
        mask
            For ``"mlm"``: corrupt the input with :meth:`random_mask` (`False` encodes it as is
            and nothing is predicted).

        Returns
        -------
        For ``"mlm"``: ``hidden`` (last-layer states ``[batch, length, hidden_size]``), ``mask``
        (positions to predict) and ``target`` (the uncorrupted ids). For
        ``"classification"``: ``first_token`` (last-layer state of token 0,
        ``[batch, hidden_size]``).

        """
        input_ids = input_ids.long()
        lengths = self._lengths(input_ids, lengths)
        if self.objective == "classification":
            first = self._encode(input_ids, lengths, n_queries=1)[:, 0]
            return {"first_token": first}
        if mask:
            corrupted, chosen = self.random_mask(input_ids, lengths)
        else:
            corrupted, chosen = input_ids, torch.zeros_like(input_ids, dtype=torch.bool)
        hidden = self._encode(corrupted, lengths)
        return {"hidden": hidden, "mask": chosen, "target": input_ids}

    def _get_generative_input(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        **kwargs,
    ) -> dict:
        if self.objective == "classification":
            return {"first_token": inference_outputs["first_token"]}
        return {"hidden": inference_outputs["hidden"], "mask": inference_outputs["mask"]}

    @auto_move_data
    def generative(
        self,
        hidden: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        first_token: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the head of the current :attr:`objective`.

        Parameters
        ----------
        hidden
            Last-layer states ``[batch, length, hidden_size]`` (``"mlm"``).
        mask
            Boolean ``[batch, length]``, the positions to predict (``"mlm"``).
        first_token
            Last-layer states of token 0 ``[batch, hidden_size]`` (``"classification"``).

        Returns
        -------
        ``{"mlm_logits": [n_masked, vocab_size]}`` (logits at the masked positions only, in
        row-major order of ``mask``) or ``{"logits": [batch, n_labels]}``.

        """
        if self.objective == "classification":
            return {"logits": self._classifier_logits(first_token)}
        return {"mlm_logits": self.mlm_logits(hidden[mask])}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Cross-entropy of the current :attr:`objective`.

        ``"mlm"``: ``loss`` is the mean cross-entropy over all masked tokens of the minibatch
        (as Hugging Face's ``BertForMaskedLM``), ``reconstruction_loss`` the mean over each
        cell's masked tokens (0 for a cell without any), ``extra_metrics["mlm_accuracy"]``.
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
        accuracy = (logits.argmax(dim=-1) == target).float().mean()
        return LossOutput(
            loss=ce.mean(),
            reconstruction_loss=per_cell,
            extra_metrics={"mlm_accuracy": accuracy.detach()},
        )

    def sample(self, *args, **kwargs):
        """Not available: Geneformer is not a generative model of counts."""
        raise NotImplementedError("GeneformerModule does not define a sampling distribution.")
