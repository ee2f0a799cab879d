"""Low-rank adapters (LoRA, Hu et al. 2022) on the attention projections of any network.

An adapter holds two small matrices ``A`` ``[rank, in]`` and ``B`` ``[out, rank]`` and turns the
weight ``W`` ``[out, in]`` it is attached to into ``W + (alpha / rank) * B @ A``. ``B`` starts at
zero, so adding adapters changes nothing until they are trained, and the base weight itself is
never modified (until :func:`merge_lora` folds the update into it).

The adapter is attached to the *weight*, not to the layer's output, so the same mechanism covers
the packed ``in_proj_weight`` of :class:`~cellformers.nn.MultiheadSelfAttention` (sliced inside
its forward pass for ``n_queries`` and the packed path) and the ``nn.Linear`` projections of
:class:`~cellformers.nn.PerformerSelfAttention`. The module holding the weight gets a subclass of
its own class whose attribute (e.g. ``in_proj_weight``) returns ``W + update``; the parameter
stays where it was, so state-dict keys of the base weights keep the official layout, and the
adapter adds its own keys beside it::

    transformer_encoder.layers.0.self_attn.in_proj_weight         # base weight, unchanged
    transformer_encoder.layers.0.self_attn.lora_in_proj_weight.A  # adapter
    transformer_encoder.layers.0.self_attn.lora_in_proj_weight.B
    transformer_encoder.layers.0.self_attn.out_proj.lora_weight.A
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import nn

from ._attention import MultiheadSelfAttention
from ._performer import PerformerSelfAttention

LORA_TARGETS: tuple[str, ...] = ("qkv", "out")
_PREFIX = "lora_"  # child-module name of the adapter of weight `w`: f"lora_{w}"


class LoRAAdapter(nn.Module):
    """The low-rank update ``(alpha / rank) * B @ A`` of one weight matrix ``[out, in]``.

    ``A`` is initialised like an ``nn.Linear`` weight (Kaiming-uniform) and ``B`` with zeros, so
    a new adapter's update is exactly zero.

    Parameters
    ----------
    out_features
        Rows of the adapted weight.
    in_features
        Columns of the adapted weight (the input features of the projection).
    rank
        Rank ``r`` of the update.
    alpha
        Scale numerator: the update is multiplied by ``alpha / rank``.
    dropout
        Dropout on the adapter's input features, training mode only. Because the update is
        applied to the weight, one mask over the input features is drawn per forward pass (the
        same for every token of the batch): ``B @ A @ diag(m) / (1 - p)``.
    target
        Name of the target group (``"qkv"`` or ``"out"``), kept to describe the adapter.
    device
        Device of the parameters.
    dtype
        Floating dtype of the parameters.

    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        target: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _check_hyperparameters(rank, alpha, dropout)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.target = str(target)
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """Return the update ``[out, in]`` to add to the weight (input dropout in training mode)."""
        A = self.A
        if self.training and self.dropout > 0.0:
            keep = torch.empty(self.in_features, device=A.device, dtype=A.dtype)
            A = A * keep.bernoulli_(1.0 - self.dropout).div_(1.0 - self.dropout)
        return (self.B @ A) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
            f"dropout={self.dropout:g}, target={self.target!r}"
        )


def _check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    if (
        isinstance(alpha, bool)
        or not (isinstance(alpha, Real) and math.isfinite(alpha))
        or alpha <= 0
    ):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if isinstance(dropout, bool) or not (isinstance(dropout, Real) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")


# ---------------------------------------------------------------- attaching to a weight
class _AdaptedWeight:
    """Class attribute returning a parameter plus its adapter's update (a non-data descriptor).

    ``nn.Module`` keeps parameters in ``_parameters`` and only looks there when normal
    attribute lookup fails, so this descriptor on the class takes precedence for reading while
    the parameter itself (state dict, ``.to()``, optimisers, assignment) is untouched.
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, module, owner=None):
        if module is None:
            return self
        weight = module._parameters[self.name]
        adapter = module._modules.get(_PREFIX + self.name)
        if adapter is None:
            return weight
        return weight + adapter.delta().to(weight.dtype)


_ADAPTED_CLASSES: dict[tuple[type, frozenset[str]], type] = {}


def _adapted_class(base: type, names: frozenset[str]) -> type:
    """Return the (cached) subclass of ``base`` whose attributes ``names`` carry adapters."""
    key = (base, names)
    if key not in _ADAPTED_CLASSES:
        attrs = {name: _AdaptedWeight(name) for name in sorted(names)}
        attrs.update(
            _lora_base=base,
            _lora_names=names,
            __reduce_ex__=_reduce_adapted,
            __module__=base.__module__,
        )
        _ADAPTED_CLASSES[key] = type(f"LoRA{base.__name__}", (base,), attrs)
    return _ADAPTED_CLASSES[key]


def _new_adapted(base: type, names: frozenset[str]):
    cls = _adapted_class(base, names)
    return cls.__new__(cls)


def _reduce_adapted(self, protocol):
    # the generated class cannot be found by name: rebuild it from its base (pickle, deepcopy)
    return _new_adapted, (type(self)._lora_base, type(self)._lora_names), self.__dict__


def _attach(owner: nn.Module, name: str, adapter: LoRAAdapter) -> None:
    weight = owner._parameters.get(name)
    if weight is None:
        raise KeyError(f"{type(owner).__name__} has no parameter {name!r}.")
    if weight.dim() != 2 or tuple(weight.shape) != (adapter.out_features, adapter.in_features):
        raise ValueError(
            f"An adapter for a [{adapter.out_features}, {adapter.in_features}] weight cannot be "
            f"attached to {name!r} of shape {tuple(weight.shape)}."
        )
    names = getattr(type(owner), "_lora_names", frozenset())
    base = getattr(type(owner), "_lora_base", type(owner))
    owner.add_module(_PREFIX + name, adapter)
    owner.__class__ = _adapted_class(base, names | {name})


def _detach(owner: nn.Module, name: str) -> LoRAAdapter:
    adapter = owner._modules.pop(_PREFIX + name)
    names = type(owner)._lora_names - {name}
    base = type(owner)._lora_base
    owner.__class__ = _adapted_class(base, names) if names else base
    return adapter


# ---------------------------------------------------------------- whole networks
def _targets(network: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """``(qualified weight name, owner, parameter name, target)`` of every attention projection."""
    found = []
    for path, module in network.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, MultiheadSelfAttention):
            found.append((f"{prefix}in_proj_weight", module, "in_proj_weight", "qkv"))
            found.append((f"{prefix}out_proj.weight", module.out_proj, "weight", "out"))
        elif isinstance(module, PerformerSelfAttention):
            for proj in ("to_q", "to_k", "to_v"):
                found.append((f"{prefix}{proj}.weight", getattr(module, proj), "weight", "qkv"))
            found.append((f"{prefix}to_out.weight", module.to_out, "weight", "out"))
    return found


def _check_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"targets must be a non-empty selection of {LORA_TARGETS} ('qkv': the query, key and "
            f"value projections; 'out': the attention output projections), got {targets!r}."
        )
    return tuple(t for t in LORA_TARGETS if t in targets)


def find_lora_targets(
    network: nn.Module, targets: str | Sequence[str] = LORA_TARGETS
) -> dict[str, tuple[int, int]]:
    """Return the weights :func:`add_lora` would adapt, with their shapes.

    Parameters
    ----------
    network
        Any module.
    targets
        Any of ``"qkv"`` and ``"out"`` (see :func:`add_lora`).

    Returns
    -------
    ``{qualified weight name: (out, in)}`` in module order.

    """
    targets = _check_targets(targets)
    return {
        name: tuple(owner._parameters[param].shape)
        for name, owner, param, target in _targets(network)
        if target in targets
    }


def lora_adapters(network: nn.Module) -> dict[str, LoRAAdapter]:
    """Return the adapters of ``network`` by the qualified name of the weight each one adapts.

    Parameters
    ----------
    network
        Any module.

    Returns
    -------
    A dict ``{"layers.0.self_attn.in_proj_weight": adapter, ...}`` in module order (empty
    without adapters).

    """
    out = {}
    for path, module in network.named_modules():
        for name in sorted(getattr(type(module), "_lora_names", ())):
            out[f"{path}.{name}" if path else name] = module._modules[_PREFIX + name]
    return out


def add_lora(
    network: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: str | Sequence[str] = LORA_TARGETS,
) -> list[str]:
    """Attach a new adapter to every selected attention projection of ``network``.

    Covers every :class:`~cellformers.nn.MultiheadSelfAttention` (``"qkv"``: the packed
    ``in_proj_weight``; ``"out"``: ``out_proj``) and
    :class:`~cellformers.nn.PerformerSelfAttention` (``"qkv"``: ``to_q``, ``to_k``, ``to_v``;
    ``"out"``: ``to_out``) inside ``network``. Adapters live on the device and in the dtype of
    the weights they adapt and take the network's training mode. The outputs of the network
    do not change (``B`` is zero) and nothing is frozen: leave out of the optimiser, or set
    ``requires_grad_(False)`` on, what should stay fixed.

    Parameters
    ----------
    network
        The network (e.g. a cellformers module).
    rank
        Rank of every update.
    alpha
        The updates are scaled by ``alpha / rank``.
    dropout
        Dropout on the adapter inputs in training mode (see :class:`LoRAAdapter`).
    targets
        Any of ``"qkv"`` (query, key and value projections) and ``"out"`` (attention output
        projections).

    Returns
    -------
    Qualified names of the adapted weights.

    """
    _check_hyperparameters(rank, alpha, dropout)
    targets = _check_targets(targets)
    if lora_adapters(network):
        raise ValueError(
            "The network already has LoRA adapters; merge them (merge_lora) or remove them "
            "(remove_lora) before adding new ones."
        )
    found = [t for t in _targets(network) if t[3] in targets]
    if not found:
        raise ValueError(
            f"{type(network).__name__} has no MultiheadSelfAttention or PerformerSelfAttention "
            "layer to attach adapters to."
        )
    for _, owner, name, target in found:
        weight = owner._parameters[name]
        dtype = weight.dtype if weight.dtype.is_floating_point else None
        adapter = LoRAAdapter(
            weight.shape[0],
            weight.shape[1],
            rank,
            alpha,
            dropout,
            target=target,
            device=weight.device,
            dtype=dtype,
        )
        adapter.train(owner.training)
        _attach(owner, name, adapter)
    return [t[0] for t in found]


def _modules_by_weight(network: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    owners = dict(network.named_modules())
    out = {}
    for qualified in lora_adapters(network):
        path, _, name = qualified.rpartition(".")
        out[qualified] = (owners[path], name)
    return out


@torch.no_grad()
def merge_lora(network: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and remove the adapters.

    Afterwards ``network`` has its original classes and state-dict keys, and each adapted
    weight holds ``W + (alpha / rank) * B @ A``, bit for bit the weight the forward pass
    computed with in evaluation mode.

    Parameters
    ----------
    network
        A network with adapters.

    Returns
    -------
    Qualified names of the weights that were updated (empty without adapters).

    """
    merged = []
    for qualified, (owner, name) in _modules_by_weight(network).items():
        adapter = _detach(owner, name)
        weight = owner._parameters[name]
        update = (adapter.B @ adapter.A) * adapter.scaling
        weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        merged.append(qualified)
    return merged


def remove_lora(network: nn.Module) -> list[str]:
    """Remove every adapter without touching the base weights.

    Parameters
    ----------
    network
        A network with or without adapters.

    Returns
    -------
    Qualified names of the weights whose adapters were removed.

    """
    removed = []
    for qualified, (owner, name) in _modules_by_weight(network).items():
        _detach(owner, name)
        removed.append(qualified)
    return removed


def lora_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """Return the entries of ``network.state_dict()`` that belong to adapters.

    Parameters
    ----------
    network
        A network with or without adapters.

    Returns
    -------
    ``{key: tensor}`` with keys as in ``network.state_dict()`` (e.g.
    ``"layers.0.self_attn.lora_in_proj_weight.A"``); the tensors are detached, not copied.

    """
    out = {}
    for qualified, adapter in lora_adapters(network).items():
        path, _, name = qualified.rpartition(".")
        prefix = f"{path}.{_PREFIX}{name}." if path else f"{_PREFIX}{name}."
        out.update({prefix + k: v for k, v in adapter.state_dict(keep_vars=False).items()})
    return out
