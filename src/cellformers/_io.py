"""Safe reading and crash-safe writing of the files cellformers saves and loads.

Everything here avoids pickle: metadata is JSON with an explicit encoding of the few non-JSON
types a model keeps (numpy arrays, tuples, data frames), weights are safetensors. Folders are
written next to their destination and renamed into place, so that a writer killed at any moment
leaves the previous content or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pandas as pd
import torch

__all__ = [
    "atomic_write",
    "check_config_fields",
    "check_format",
    "check_weights",
    "decode_json_value",
    "encode_json_value",
    "file_inside",
    "read_json",
    "read_safetensors",
    "read_torch_file",
    "recover_folder",
]

_TAG = "__cellformers_type__"


# ---------------------------------------------------------------------------------- JSON values
def encode_json_value(value: Any, *, where: str = "value") -> Any:
    """Turn ``value`` into JSON-compatible data that :func:`decode_json_value` reverses exactly.

    Plain JSON types pass through; tuples, numpy arrays and scalars, :class:`pandas.Index` and
    :class:`pandas.DataFrame` (e.g. a training history) and dicts with non-string keys are
    written as tagged objects.

    Parameters
    ----------
    value
        What to encode.
    where
        Name of ``value`` in error messages.

    Returns
    -------
    The encoded value.

    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, tuple):
        items = [encode_json_value(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
        return {_TAG: "tuple", "items": items}
    if isinstance(value, list):
        return [encode_json_value(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: encode_json_value(v, where=f"{where}[{k!r}]") for k, v in value.items()}
        items = [
            [encode_json_value(k, where=where), encode_json_value(v, where=f"{where}[{k!r}]")]
            for k, v in value.items()
        ]
        return {_TAG: "dict", "items": items}
    if isinstance(value, pd.DataFrame):
        return {
            _TAG: "dataframe",
            "columns": [encode_json_value(c, where=where) for c in value.columns],
            "index": _encode_array(value.index.to_numpy(), where=f"{where}.index"),
            "index_name": encode_json_value(value.index.name, where=where),
            "data": [
                _encode_array(value[c].to_numpy(), where=f"{where}[{c!r}]") for c in value.columns
            ],
        }
    if isinstance(value, pd.Index):
        return {_TAG: "index", "array": _encode_array(value.to_numpy(), where=where)}
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {
            **_encode_array(array, where=where),
            _TAG: "tensor" if isinstance(value, torch.Tensor) else "ndarray",
        }
    raise TypeError(
        f"Cannot save {where} of type {type(value).__name__}: only JSON types, tuples, numpy "
        "arrays, tensors and data frames are stored."
    )


_PLAIN = (str, bool, int, float, type(None))


def _encode_array(array: np.ndarray, *, where: str) -> dict:
    """Encode an array of numbers, strings, or Python objects that are plain scalars."""
    kind = array.dtype.kind
    if kind == "O":
        values = [x.item() if isinstance(x, np.generic) else x for x in array.ravel()]
        if not all(isinstance(x, _PLAIN) for x in values):
            raise TypeError(f"Cannot save {where}: an object array holds non-scalar values.")
        dtype = "object"
    elif kind in "biufU":
        dtype = "str" if kind == "U" else array.dtype.str
        values = array.ravel().tolist()
    else:
        raise TypeError(f"Cannot save {where}: arrays of {array.dtype} are not stored.")
    return {_TAG: "ndarray", "dtype": dtype, "shape": list(array.shape), "values": values}


def _decode_array(obj: Mapping, *, where: str) -> np.ndarray:
    try:
        shape = tuple(int(n) for n in obj["shape"])
        values = obj["values"]
        if obj["dtype"] == "object":
            if not all(isinstance(x, _PLAIN) for x in values):
                raise ValueError("an object array may only hold plain scalars")
            array = np.empty(len(values), dtype=object)
            array[:] = values
        elif obj["dtype"] == "str":
            array = np.array(values, dtype=str)
        else:
            dtype = np.dtype(obj["dtype"])
            if dtype.kind not in "biuf":
                raise ValueError(f"dtype {dtype} is not stored")
            array = np.array(values, dtype=dtype)
        return array.reshape(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where} is not a valid encoded array: {e}") from e


def decode_json_value(value: Any, *, where: str = "value") -> Any:
    """Reverse :func:`encode_json_value` (only data is built, never code).

    Parameters
    ----------
    value
        Encoded value, as read from JSON.
    where
        Name of ``value`` in error messages.

    Returns
    -------
    The decoded value.

    """
    if isinstance(value, list):
        return [decode_json_value(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode_json_value(v, where=f"{where}[{k!r}]") for k, v in value.items()}
    if tag == "tuple":
        return tuple(decode_json_value(value.get("items", []), where=where))
    if tag == "dict":
        pairs = [decode_json_value(p, where=where) for p in value.get("items", [])]
        return {(tuple(k) if isinstance(k, list) else k): v for k, v in pairs}
    if tag == "ndarray":
        return _decode_array(value, where=where)
    if tag == "tensor":
        return torch.from_numpy(_decode_array(value, where=where))
    if tag == "index":
        return pd.Index(_decode_array(value.get("array", {}), where=where))
    if tag == "dataframe":
        columns = decode_json_value(value.get("columns", []), where=where)
        data = [_decode_array(a, where=f"{where}.data") for a in value.get("data", [])]
        index = pd.Index(
            _decode_array(value.get("index", {}), where=f"{where}.index"),
            name=value.get("index_name"),
        )
        return pd.DataFrame(dict(zip(columns, data, strict=True)), index=index)
    raise ValueError(f"{where} has an unknown encoded type {tag!r}.")


# ---------------------------------------------------------------------------------- reading
def file_inside(folder: str | os.PathLike, name: str, *, source: str | os.PathLike) -> Path:
    """Path of the file ``name`` listed in ``source``, refusing any that leaves ``folder``.

    Parameters
    ----------
    folder
        Folder the file must be in.
    name
        File name as written in ``source`` (relative to ``folder``).
    source
        File that lists ``name`` (for the error message).

    Returns
    -------
    The resolved path.

    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source} lists a file name that is not a string: {name!r}.")
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if os.path.isabs(name) or not path.is_relative_to(base):
        raise ValueError(
            f"{source} lists the file {name!r}, which is outside {base}; a checkpoint may only "
            "name files inside its own folder."
        )
    return path


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Read a JSON file, naming it in every error.

    Parameters
    ----------
    path
        The file.
    what
        What the file is (for messages), e.g. ``"LoRA configuration"``.

    Returns
    -------
    The parsed content.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The {what} {path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"The {what} {path} is not valid JSON ({e}); it is damaged.") from e


def read_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, naming it in every error.

    Parameters
    ----------
    path
        The file.
    device
        Where to put the tensors.

    Returns
    -------
    Name -> tensor.

    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The weights file {path} does not exist.")
    try:
        return load_file(path, device=device)
    except Exception as e:  # safetensors raises its own error types (and OSError)
        raise ValueError(
            f"Could not read {path} as safetensors ({type(e).__name__}: {e}); the file is "
            "damaged or incomplete (a Git LFS pointer, an interrupted copy)."
        ) from e


#: First torch whose ``torch.load(weights_only=True)`` has no known bypass (CVE-2025-32434).
_SAFE_TORCH = (2, 6)


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file with ``torch.load(weights_only=True)``, naming it in errors.

    Only tensors, plain containers, numbers and strings are rebuilt; a file that names any
    other Python object is refused before anything runs.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    The file's content.

    """
    file = Path(path)
    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if found < _SAFE_TORCH:
        raise RuntimeError(
            f"Reading {file} needs torch >= {'.'.join(map(str, _SAFE_TORCH))}: in torch "
            f"{torch.__version__}, torch.load(weights_only=True) can be made to run code. "
            "Upgrade torch."
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        reason = reason.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]
        raise RuntimeError(
            f"{file} holds Python objects that torch.load(weights_only=True) refuses to "
            f"unpickle ({reason}). cellformers never unpickles arbitrary code; re-save the "
            "checkpoint with plain dicts, lists, numbers, strings and tensors (e.g. convert its "
            "config to a dict) and read that file."
        ) from e
    except Exception as e:  # truncated or not a torch file
        raise RuntimeError(
            f"Could not read {file} with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{e}); the file is damaged or not a torch.save file."
        ) from e


def check_weights(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
) -> None:
    """Refuse weights of the wrong kind of dtype or with NaN/inf values.

    A tensor that the module keeps in floating point must be floating point and finite (an
    integer or boolean tensor would be silently cast); any other must not be floating point.

    Parameters
    ----------
    tensors
        Name -> tensor read from ``source``.
    expected
        The module's state dict (names as in ``tensors``); names it lacks are not checked.
    source
        The file the tensors come from (for messages).

    """
    for name, tensor in tensors.items():
        if name not in expected:
            continue
        want_float = expected[name].is_floating_point()
        if tensor.is_floating_point() != want_float:
            kind = "floating-point" if want_float else "integer"
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {tensor.dtype} but the model needs a {kind} "
                "tensor; the checkpoint is not a valid export of this model."
            )
        if want_float and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{source}: tensor {name!r} contains NaN or infinite values; the checkpoint is "
                "damaged (or the training that wrote it diverged)."
            )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and np.isfinite(value)


_FIELD_KINDS = {
    "positive int": lambda v: _is_int(v) and v > 0,
    "non-negative int": lambda v: _is_int(v) and v >= 0,
    "probability": lambda v: _is_number(v) and 0 <= v <= 1,
    "positive number": lambda v: _is_number(v) and v > 0,
    "number": _is_number,
}


def check_config_fields(
    config: Mapping[str, Any], fields: Mapping[str, str], *, source: str | os.PathLike
) -> None:
    """Check the types and ranges of configuration fields, naming the file and the field.

    Parameters
    ----------
    config
        The configuration (absent fields are not checked).
    fields
        Field -> kind: ``"positive int"``, ``"non-negative int"``, ``"probability"``,
        ``"positive number"`` or ``"number"`` (finite).
    source
        The file the configuration comes from.

    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    for field, kind in fields.items():
        if field in config and config[field] is not None and not _FIELD_KINDS[kind](config[field]):
            raise ValueError(f"{source}: field {field!r} must be a {kind}, got {config[field]!r}.")


# ---------------------------------------------------------------------------------- writing
def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _lock(target: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``target`` (a ``.<name>.lock`` sibling); yields whether held.

    The lock is the operating system's, so a killed writer never leaves it behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        yield _try_lock(fd)
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting; whether it was free."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _recover(target: Path) -> None:
    """Finish or undo a swap that a killed writer left half done (lock held)."""
    ready, old = _siblings(target, "ready"), _siblings(target, "old")
    if not target.exists():
        if ready:
            os.replace(ready.pop(), target)
        elif old:
            os.replace(old.pop(), target)
    for leftover in [*ready, *old, *_siblings(target, "tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)
        if leftover.is_file():
            leftover.unlink()


def recover_folder(path: str | os.PathLike) -> None:
    """Bring ``path`` back to its last complete state after a writer was killed.

    Does nothing while another process is writing it.

    Parameters
    ----------
    path
        A folder (or file) written with :func:`atomic_write`.

    """
    target = Path(path).absolute()
    if not target.parent.is_dir() or not (
        _siblings(target, "ready") or _siblings(target, "old") or _siblings(target, "tmp")
    ):
        return
    with _lock(target) as held:
        if held:
            _recover(target)


@contextmanager
def _atomic(path: str | os.PathLike, *, overwrite: bool, folder: bool) -> Iterator[Path]:
    target = Path(path).absolute()
    with _lock(target) as held:
        if not held:
            raise RuntimeError(
                f"Another process is writing {target}; wait for it to finish or write elsewhere."
            )
        _recover(target)
        if target.exists() and not overwrite:
            raise ValueError(f"{target} already exists; pass overwrite=True or another path.")
        if target.exists() and target.is_dir() != folder:
            kind = "a folder" if target.is_dir() else "a file"
            raise ValueError(f"{target} is {kind}; pass another path.")
        token = uuid4().hex[:12]
        tmp = target.parent / f".{target.name}.tmp-{token}"
        if folder:
            tmp.mkdir()
        try:
            yield tmp
            files = [p for p in tmp.rglob("*") if p.is_file()] if folder else [tmp]
            for file in files:
                _fsync(file)
            if folder:
                _fsync(tmp)
            ready = target.parent / f".{target.name}.ready-{token}"
            os.replace(tmp, ready)
            _fsync(target.parent)
            old = target.parent / f".{target.name}.old-{token}"
            if target.exists():
                os.replace(target, old)
            os.replace(ready, target)
            _fsync(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if tmp.is_file():
                tmp.unlink()
            raise
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():
            old.unlink()


@contextmanager
def atomic_write(
    path: str | os.PathLike, *, folder: bool = True, overwrite: bool = False
) -> Iterator[Path]:
    """Write a folder (or a file) so that it is replaced all at once, or not at all.

    The block writes into the yielded sibling path (an empty folder, or a file name to
    create); when it ends without error, the files are flushed to disk and the result takes
    the place of ``path`` by renames (the previous content is removed). A writer killed at any
    moment leaves ``path`` with its previous content or the new one; the next write or
    :func:`recover_folder` tidies up. A second process writing the same ``path`` meanwhile gets
    a :class:`RuntimeError`.

    Parameters
    ----------
    path
        The folder (or file) to write.
    folder
        Write a folder; otherwise a single file.
    overwrite
        Replace an existing ``path``; otherwise it is a :class:`ValueError`.

    Yields
    ------
    The temporary folder (or file name) to write.

    """
    with _atomic(path, overwrite=overwrite, folder=folder) as tmp:
        yield tmp


def check_format(meta: Any, path: str | os.PathLike, *, name: str, version: int) -> dict:
    """Check the ``format`` and ``format_version`` fields of a cellformers JSON file.

    Parameters
    ----------
    meta
        The file's parsed content.
    path
        The file (for messages).
    name
        Expected ``format``.
    version
        Expected ``format_version``.

    Returns
    -------
    ``meta``.

    """
    if not isinstance(meta, dict) or meta.get("format") != name:
        raise ValueError(f"{path} is not a cellformers file of format {name!r}.")
    if meta.get("format_version") != version:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}; this version of "
            f"cellformers reads version {version}."
        )
    return meta
