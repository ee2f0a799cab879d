"""Performer (FAVOR+) linear attention and pre-norm Performer layer stacks.

The parameter and buffer names follow the Performer of ``performer_pytorch`` as vendored by
scBERT (and used by scFoundation's decoder), so published checkpoints load with strict key
checking: a stack held as ``performer`` has the keys ``performer.calls_since_last_redraw``,
``performer.net.layers.{i}.0.norm.*``, ``performer.net.layers.{i}.0.fn.to_q.weight`` …,
``performer.net.layers.{i}.0.fn.fast_attention.projection_matrix`` and
``performer.net.layers.{i}.1.fn.fn.w1.*`` / ``w2.*``.

Two deliberate differences from the official code, both documented on the classes:

* **Fixed random features.** The projection matrices are buffers that are drawn once at
  construction and then only change when loaded or when :meth:`Performer.redraw_projections`
  is called. The official model redraws them every 1000 forward calls in training mode, which
  would silently replace the published features; we never do that implicitly.
* **Per-cell key stabiliser.** The official softmax kernel subtracts one maximum taken over the
  whole key tensor (all cells, heads and positions of a batch) before the exponential. Because
  of the kernel's additive ``eps`` that maximum does not cancel, so a cell's output depends on
  the other cells of its batch. The default ``stabilizer="cell"`` takes the maximum over each
  cell's own heads, positions and features instead, which makes the output of a cell the same
  alone or in any batch; ``stabilizer="batch"`` reproduces the official behaviour. For a batch
  of one cell the two are identical.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STABILIZERS: tuple[str, ...] = ("cell", "batch")


def default_nb_features(dim_head: int) -> int:
    """Return the official default number of random features, ``int(d ln d)``.

    Parameters
    ----------
    dim_head
        Dimension of one attention head.

    Returns
    -------
    ``int(dim_head * ln(dim_head))`` (266 for 64).

    """
    return int(dim_head * math.log(dim_head))


def gaussian_orthogonal_random_matrix(
    nb_rows: int,
    nb_columns: int,
    *,
    scaling: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the random feature matrix of FAVOR+ (blocks of orthogonal rows).

    Rows come in blocks of ``nb_columns`` mutually orthogonal unit vectors (the Q factor of a
    Gaussian matrix); the last block is cut to the remaining rows. With ``scaling=0`` each row
    is then rescaled to the norm of an independent Gaussian vector (so rows are marginally
    Gaussian), with ``scaling=1`` to ``sqrt(nb_columns)``.

    Parameters
    ----------
    nb_rows
        Number of random features ``m``.
    nb_columns
        Dimension of one head ``d``.
    scaling
        ``0`` (Gaussian row norms, the Performer default) or ``1`` (constant norms).
    generator
        Random generator; `None` uses torch's global generator.
    device
        Device of the result.

    Returns
    -------
    Float32 tensor ``[nb_rows, nb_columns]``.

    """
    if scaling not in (0, 1):
        raise ValueError(f"scaling must be 0 or 1, got {scaling!r}.")
    n_blocks = math.ceil(nb_rows / nb_columns)
    blocks = []
    for _ in range(n_blocks):
        gaussian = torch.randn(nb_columns, nb_columns, generator=generator)
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
        blocks.append(q.T)
    matrix = torch.cat(blocks, dim=0)[:nb_rows]
    if scaling == 0:
        norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    else:
        norms = torch.full((nb_rows,), math.sqrt(nb_columns))
    return (norms[:, None] * matrix).to(device)


def softmax_kernel_features(
    x: torch.Tensor,
    projection_matrix: torch.Tensor,
    *,
    is_query: bool,
    stabilizer: str = "cell",
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Positive random features of the softmax kernel (FAVOR+), as in the official Performer.

    With ``c = d^-1/4``, ``r = m^-1/2`` and ``u = (c x) P^T``::

        phi(x) = r * (exp(u - c^2 |x|^2 / 2 - s) + eps)

    where the stabiliser ``s`` is, for queries, the maximum of ``u`` over the features of the
    same row; for keys, the maximum of ``u`` over each cell's heads, positions and features
    (``stabilizer="cell"``) or over the whole tensor (``"batch"``, the official rule).

    Parameters
    ----------
    x
        Queries or keys ``[batch, heads, length, d]``.
    projection_matrix
        Random features ``[m, d]``.
    is_query
        Queries (row-wise stabiliser) or keys.
    stabilizer
        ``"cell"`` or ``"batch"`` (keys only).
    key_padding_mask
        Boolean ``[batch, length]``, `True` at padded positions: for keys these positions are
        left out of the stabiliser and get all-zero features (so they take no part in the
        attention).
    eps
        The kernel's additive constant.

    Returns
    -------
    Tensor ``[batch, heads, length, m]`` in the dtype of ``x``.

    """
    d = x.shape[-1]
    m = projection_matrix.shape[0]
    c = d**-0.25
    ratio = m**-0.5
    dash = torch.matmul(c * x, projection_matrix.to(x.dtype).T)
    diag = (x * x).sum(dim=-1, keepdim=True) * (c * c / 2.0)
    if is_query:
        return _positive_features(dash, diag, dash.amax(dim=-1, keepdim=True), ratio, eps)
    pad = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    masked = dash if pad is None else dash.masked_fill(pad, float("-inf"))
    if stabilizer == "cell":
        stab = masked.amax(dim=(1, 2, 3), keepdim=True)
    elif stabilizer == "batch":
        stab = masked.amax()
    else:
        raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}.")
    if pad is not None:
        # a cell without any real key: keep the result finite (its features are zeroed below)
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
    features = _positive_features(dash, diag, stab, ratio, eps)
    if pad is not None:
        features = features.masked_fill(pad, 0.0)
    return features


def _positive_features(
    dash: torch.Tensor, diag: torch.Tensor, stab: torch.Tensor, ratio: float, eps: float
) -> torch.Tensor:
    """``ratio * (exp(dash - diag - stab) + eps)``, in place on ``dash`` when no gradient is needed."""
    if torch.is_grad_enabled() and dash.requires_grad:
        return ratio * (torch.exp(dash - diag - stab) + eps)
    return dash.sub_(diag).sub_(stab).exp_().add_(eps).mul_(ratio)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention ``D^-1 q (k^T v)`` with ``D = q . sum_n k_n``.

    Parameters
    ----------
    q
        Query features ``[..., length, m]``.
    k
        Key features ``[..., length, m]``.
    v
        Values ``[..., length, e]``.

    Returns
    -------
    Tensor ``[..., length, e]``; nothing of size ``length x length`` is formed.

    """
    k_sum = k.sum(dim=-2)
    denominator = torch.matmul(q, k_sum.unsqueeze(-1))  # [..., length, 1]
    context = torch.matmul(k.transpose(-1, -2), v)  # [..., m, e]
    return torch.matmul(q, context) / denominator


class FastAttention(nn.Module):
    """FAVOR+ softmax-kernel attention of one layer, holding the random features.

    The buffer ``projection_matrix`` ``[nb_features, dim_head]`` is drawn at construction (from
    torch's global generator) and is part of the state dict; it is never redrawn implicitly
    (see :meth:`redraw_projection_matrix`).

    Parameters
    ----------
    dim_head
        Dimension of one head.
    nb_features
        Number of random features; `None` gives ``int(dim_head * ln(dim_head))``.
    ortho_scaling
        Row scaling of the random matrix (:func:`gaussian_orthogonal_random_matrix`).
    stabilizer
        Key stabiliser, ``"cell"`` (default; batch-invariant) or ``"batch"`` (official).
    eps
        The kernel's additive constant.

    """

    def __init__(
        self,
        dim_head: int,
        nb_features: int | None = None,
        *,
        ortho_scaling: int = 0,
        stabilizer: str = "cell",
        eps: float = 1e-4,
    ):
        super().__init__()
        if stabilizer not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}.")
        self.dim_head = int(dim_head)
        self.nb_features = default_nb_features(dim_head) if nb_features is None else nb_features
        if self.nb_features < 1:
            raise ValueError(f"nb_features must be >= 1, got {self.nb_features}.")
        self.ortho_scaling = ortho_scaling
        self.stabilizer = stabilizer
        self.eps = float(eps)
        self.register_buffer(
            "projection_matrix",
            gaussian_orthogonal_random_matrix(
                self.nb_features, self.dim_head, scaling=ortho_scaling
            ),
        )

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator | None = None) -> None:
        """Replace the random features by a fresh draw (in place, same device and dtype).

        Parameters
        ----------
        generator
            Random generator; `None` uses torch's global generator.

        """
        new = gaussian_orthogonal_random_matrix(
            self.nb_features, self.dim_head, scaling=self.ortho_scaling, generator=generator
        )
        self.projection_matrix.copy_(new)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend with the softmax-kernel approximation.

        Parameters
        ----------
        q, k, v
            Queries, keys and values ``[batch, heads, length, dim_head]``.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions (not attended to), or `None`.

        Returns
        -------
        Tensor ``[batch, heads, length, dim_head]``.

        """
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}."
                )
            if not key_padding_mask.any():
                key_padding_mask = None
            else:
                v = v.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        kp = softmax_kernel_features(
            k,
            self.projection_matrix,
            is_query=False,
            stabilizer=self.stabilizer,
            key_padding_mask=key_padding_mask,
            eps=self.eps,
        )
        qp = softmax_kernel_features(q, self.projection_matrix, is_query=True, eps=self.eps)
        return linear_attention(qp, kp, v)

    def extra_repr(self) -> str:
        return (
            f"dim_head={self.dim_head}, nb_features={self.nb_features}, "
            f"stabilizer={self.stabilizer!r}"
        )


class PerformerSelfAttention(nn.Module):
    """Multi-head self-attention with FAVOR+ (``to_q``, ``to_k``, ``to_v``, ``to_out``).

    Parameters
    ----------
    dim
        Model dimension.
    heads
        Number of heads.
    dim_head
        Dimension of one head (independent of ``dim``; scBERT uses 64 with ``dim`` 200).
    nb_features
        Number of random features; `None` gives ``int(dim_head * ln(dim_head))``.
    qkv_bias
        Whether the query/key/value projections have a bias (scBERT: no; scFoundation: yes).
    dropout
        Dropout on the output (after ``to_out``), training mode only.
    stabilizer
        Key stabiliser of :class:`FastAttention`.

    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        *,
        nb_features: int | None = None,
        qkv_bias: bool = False,
        dropout: float = 0.0,
        stabilizer: str = "cell",
    ):
        super().__init__()
        self.heads = int(heads)
        self.dim_head = int(dim_head)
        inner = self.heads * self.dim_head
        self.fast_attention = FastAttention(dim_head, nb_features, stabilizer=stabilizer)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the attention.

        Parameters
        ----------
        x
            Input ``[batch, length, dim]``.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions, or `None`.

        Returns
        -------
        Tensor ``[batch, length, dim]``.

        """
        batch, length, _ = x.shape
        q, k, v = (self._split(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.fast_attention(q, k, v, key_padding_mask=key_padding_mask)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)
        return self.dropout(self.to_out(out))


class PerformerFeedForward(nn.Module):
    """Feed-forward block ``w2(dropout(GELU(w1 x)))`` (exact, erf-based GELU).

    Parameters
    ----------
    dim
        Model dimension.
    mult
        Hidden dimension is ``dim * mult``.
    dropout
        Dropout on the hidden activation, training mode only.

    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``[..., dim]``."""
        return self.w2(self.dropout(self.act(self.w1(x))))


class Chunk(nn.Module):
    """Apply ``fn`` to ``chunks`` pieces of the sequence in turn (saves activation memory).

    Held only for the official key layout (``….1.fn.fn.w1``); with ``chunks=1`` it is a
    pass-through.

    Parameters
    ----------
    chunks
        Number of pieces along ``along_dim``.
    fn
        A position-wise module.
    along_dim
        Dimension to split (1 = sequence for batch-first inputs).

    """

    def __init__(self, chunks: int, fn: nn.Module, along_dim: int = 1):
        super().__init__()
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}.")
        self.chunks = int(chunks)
        self.fn = fn
        self.along_dim = along_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``fn`` piecewise."""
        if self.chunks == 1:
            return self.fn(x)
        pieces = x.chunk(self.chunks, dim=self.along_dim)
        return torch.cat([self.fn(p) for p in pieces], dim=self.along_dim)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))`` (the residual is added by the stack).

    Parameters
    ----------
    dim
        Model dimension.
    fn
        The wrapped block.
    eps
        Epsilon of the layer norm.

    """

    def __init__(self, dim: int, fn: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Normalise, then apply ``fn`` (keyword arguments go to ``fn``)."""
        return self.fn(self.norm(x), **kwargs)


class PerformerLayers(nn.Module):
    """The residual pre-norm layers held in ``.layers`` (official ``SequentialSequence``).

    ``layers[i]`` is ``ModuleList([PreLayerNorm(PerformerSelfAttention),
    PreLayerNorm(Chunk(PerformerFeedForward))])`` and each is applied as
    ``x = x + attn(x); x = x + ff(x)``.

    Parameters
    ----------
    layers
        The layer pairs.

    """

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        n_layers: int | None = None,
    ) -> torch.Tensor:
        """Apply the first ``n_layers`` layers (all with `None`)."""
        for attn, ff in list(self.layers)[:n_layers]:
            x = x + attn(x, key_padding_mask=key_padding_mask)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """A stack of pre-norm Performer layers (no final norm), key-compatible with ``performer_pytorch``.

    Keys: ``calls_since_last_redraw`` (an int64 counter buffer kept for the official layout),
    ``net.layers.{i}.0.norm.*``, ``net.layers.{i}.0.fn.{to_q,to_k,to_v,to_out}.*``,
    ``net.layers.{i}.0.fn.fast_attention.projection_matrix``, ``net.layers.{i}.1.norm.*``,
    ``net.layers.{i}.1.fn.fn.{w1,w2}.*``.

    The random features are fixed: unlike the official model (which redraws them every
    ``feature_redraw_interval`` = 1000 forward calls in training mode) nothing is redrawn
    unless :meth:`redraw_projections` is called, so loaded checkpoint features stay in place in
    training and inference alike. ``calls_since_last_redraw`` is loaded and saved but not
    incremented.

    Parameters
    ----------
    dim
        Model dimension.
    depth
        Number of layers.
    heads
        Attention heads per layer.
    dim_head
        Dimension of one head.
    ff_mult
        Feed-forward hidden dimension is ``dim * ff_mult``.
    nb_features
        Random features per layer; `None` gives ``int(dim_head * ln(dim_head))``.
    qkv_bias
        Bias on the query/key/value projections.
    attn_dropout
        Dropout after each attention output projection.
    ff_dropout
        Dropout on the feed-forward hidden activation.
    ff_chunks
        Apply the feed-forward blocks in this many pieces along the sequence.
    layer_norm_eps
        Epsilon of the pre-norms.
    stabilizer
        Key stabiliser of every layer: ``"cell"`` (default, batch-invariant) or ``"batch"``
        (official: one maximum over the whole batch).

    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int = 64,
        *,
        ff_mult: int = 4,
        nb_features: int | None = None,
        qkv_bias: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ff_chunks: int = 1,
        layer_norm_eps: float = 1e-5,
        stabilizer: str = "cell",
    ):
        super().__init__()
        if stabilizer not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}.")
        for name, value in (
            ("dim", dim),
            ("depth", depth),
            ("heads", heads),
            ("dim_head", dim_head),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.dim_head = int(dim_head)
        self.ff_mult = int(ff_mult)
        self.nb_features = default_nb_features(dim_head) if nb_features is None else nb_features
        self.qkv_bias = bool(qkv_bias)
        layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreLayerNorm(
                        dim,
                        PerformerSelfAttention(
                            dim,
                            heads,
                            dim_head,
                            nb_features=self.nb_features,
                            qkv_bias=qkv_bias,
                            dropout=attn_dropout,
                            stabilizer=stabilizer,
                        ),
                        eps=layer_norm_eps,
                    ),
                    PreLayerNorm(
                        dim,
                        Chunk(ff_chunks, PerformerFeedForward(dim, ff_mult, ff_dropout)),
                        eps=layer_norm_eps,
                    ),
                ]
            )
            for _ in range(depth)
        )
        self.net = PerformerLayers(layers)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    @property
    def stabilizer(self) -> str:
        """Key stabiliser of all layers, ``"cell"`` or ``"batch"`` (settable)."""
        return self._fast_attentions()[0].stabilizer

    @stabilizer.setter
    def stabilizer(self, value: str) -> None:
        if value not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {value!r}.")
        for fa in self._fast_attentions():
            fa.stabilizer = value

    def _fast_attentions(self) -> list[FastAttention]:
        return [m for m in self.modules() if isinstance(m, FastAttention)]

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features for every layer and reset ``calls_since_last_redraw``.

        Only on this explicit request do the features change; loaded features are otherwise
        kept for good.

        Parameters
        ----------
        generator
            Random generator; `None` uses torch's global generator.

        """
        for fa in self._fast_attentions():
            fa.redraw_projection_matrix(generator)
        self.calls_since_last_redraw.zero_()

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        n_layers: int | None = None,
    ) -> torch.Tensor:
        """Apply the layers.

        Memory grows linearly with the sequence length (the largest intermediate is
        ``[batch, heads, length, nb_features]``).

        Parameters
        ----------
        x
            Input ``[batch, length, dim]``.
        key_padding_mask
            Boolean ``[batch, length]``, `True` at padded positions, or `None`. Padded
            positions take no part in the attention (nor in the key stabiliser), so real
            positions get the same output as without the padding; padded outputs are
            meaningless.
        n_layers
            Run only the first ``n_layers`` layers; `None` runs all.

        Returns
        -------
        Tensor ``[batch, length, dim]``.

        """
        if n_layers is not None and not 0 <= n_layers <= self.depth:
            raise ValueError(f"n_layers must be in [0, {self.depth}], got {n_layers}.")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"Expected input [batch, length, {self.dim}], got shape {tuple(x.shape)}."
            )
        if key_padding_mask is not None and key_padding_mask.shape != x.shape[:2]:
            raise ValueError(
                f"key_padding_mask must have shape {tuple(x.shape[:2])}, got "
                f"{tuple(key_padding_mask.shape)}."
            )
        return self.net(x, key_padding_mask=key_padding_mask, n_layers=n_layers)
