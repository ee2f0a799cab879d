"""Strict state-dict checks shared by the checkpoint readers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch


def compare_keys(
    expected: Mapping[str, tuple[int, ...]],
    given: Mapping[str, torch.Tensor],
    *,
    name: Callable[[str], str] = str,
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected``.

    Parameters
    ----------
    expected
        Key -> shape the module needs.
    given
        Key -> tensor from the checkpoint.
    name
        How to show a key in the shape-mismatch lines (e.g. its official name).

    Returns
    -------
    ``(missing, unexpected, mismatched)``; mismatches read ``"key: checkpoint (..) vs module (..)"``.

    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{name(k)}: checkpoint {tuple(v.shape)} vs module {tuple(expected[k])}"
        for k, v in given.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    ]
    return missing, unexpected, mismatched


def raise_key_mismatch(
    what: str,
    module: torch.nn.Module,
    missing: Iterable[str],
    unexpected: Iterable[str],
    mismatched: Iterable[str],
    hints: Iterable[str] = (),
) -> None:
    """Raise a :class:`RuntimeError` listing what does not match, if anything.

    Parameters
    ----------
    what
        The weights' family, e.g. ``"scBERT"``.
    module
        The module being loaded.
    missing, unexpected, mismatched
        As from :func:`compare_keys` (keys shown as given).
    hints
        What the problems usually mean, one line each.

    """
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return
    lines = [f"The {what} weights do not match {type(module).__name__}:"]
    for title, items, sep in (
        ("missing keys", missing, ", "),
        ("unexpected keys", unexpected, ", "),
        ("shape mismatches", mismatched, "; "),
    ):
        if items:
            lines.append(
                f"  {title} ({len(items)}): {sep.join(items[:20])}"
                + (" ..." if len(items) > 20 else "")
            )
    hints = list(hints)
    if hints:
        lines.append("What this usually means:")
        lines.extend(f"  - {h}" for h in hints)
    raise RuntimeError("\n".join(lines))
