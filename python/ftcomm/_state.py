"""Nested Python state (an optimizer's state_dict, the trainer's own dict) as tensors
plus one byte tensor, which is how the store and the resync carry it.

The byte tensor is a pickle of the nesting with every tensor replaced by its index.
Reading a checkpoint must never run code, whoever wrote the store: it is read back
with a restricted unpickler (the allow-list approach of ``torch.load(weights_only=True)``)
that builds only plain values (numbers, strings, bytes, None, lists, tuples, dicts,
sets, ``OrderedDict``, torch dtypes) and ftcomm's tensor references, and refuses any
other class. :func:`pack` checks what it writes the same way, so state that could not
be read back is refused when it is saved, naming the value, not at the resume.
"""
from __future__ import annotations

import collections
import ctypes
import io
import pickle
from typing import Any

import torch


class _TensorRef:
    """Stands for the i-th tensor in a pickled skeleton."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return (_TensorRef, (self.index,))


# (module, name) -> what a skeleton may name. Everything else is refused.
_ALLOWED = {
    ("ftcomm._state", "_TensorRef"): _TensorRef,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedClass(f"{module}.{name}")


class _RefusedClass(pickle.UnpicklingError):
    """A class the restricted unpickler does not build (as opposed to damaged bytes)."""


class UnsafeStateError(ValueError):
    """State that holds a value of a class ftcomm does not read back."""


def _safe_loads(data: bytes) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except _RefusedClass as e:
        raise UnsafeStateError(str(e)) from None


def _strip(obj: Any, tensors: list, clone: bool) -> Any:
    if isinstance(obj, torch.Tensor):
        # The trainer's own tensors can change in place at any time (a counter's
        # += in the next step): a copy is what belongs to this step.
        tensors.append(obj.detach().clone() if clone else obj.detach())
        return _TensorRef(len(tensors) - 1)
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors, clone)) for k, v in obj.items()) \
            if type(obj) is collections.OrderedDict else {k: _strip(v, tensors, clone) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, tensors, clone) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_strip(v, tensors, clone) for v in obj)
    return obj


def _fill(obj: Any, tensors: list) -> Any:
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _fill(v, tensors)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fill(v, tensors) for v in obj)
    return obj


def pack(parts: dict, copy: tuple = ()) -> list:
    """``parts`` (name -> nested state) as [skeleton bytes, tensor, tensor, ...]. The
    tensors of the parts named in ``copy`` are copied (the others are taken by
    reference). Raises :class:`UnsafeStateError`, naming the part and the class,
    for a value that would not be read back."""
    tensors: list = []
    skeleton = {name: _strip(value, tensors, name in copy) for name, value in parts.items()}
    try:
        data = pickle.dumps({"format": 1, "parts": skeleton, "tensors": len(tensors)}, protocol=4)
        _safe_loads(data)
    except (UnsafeStateError, pickle.PicklingError, TypeError, AttributeError) as e:
        culprit = next((name for name, value in skeleton.items() if not _readable(value)), "?")
        raise UnsafeStateError(
            f"the {culprit} state holds a value ftcomm does not save ({e}): a checkpoint holds tensors and plain "
            "values only (numbers, strings, bytes, None, lists, tuples, dicts, sets, OrderedDict, torch dtypes), so "
            "that reading it back never runs code. Store that value as one of those (a scheduler's state_dict(), "
            "an int, a tensor)") from None
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8)] + tensors


def _readable(value: Any) -> bool:
    try:
        _safe_loads(pickle.dumps(value, protocol=4))
        return True
    except Exception:  # noqa: BLE001 - any failure means this part is the culprit
        return False


def _bytes_of(t: torch.Tensor) -> bytes:
    """A uint8 tensor's bytes (without numpy, which torch does not require)."""
    t = t.detach().cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""


def unpack(objects: list) -> dict:
    """The inverse of :func:`pack`. Builds plain values only: a skeleton that names
    any other class is refused (:class:`UnsafeStateError`), and nothing in it runs."""
    if not objects:
        raise ValueError("the checkpoint holds no trainer state (was it written by `ftcomm train`?)")
    try:
        meta = _safe_loads(_bytes_of(objects[0]))
    except UnsafeStateError as e:
        raise UnsafeStateError(
            f"the checkpoint's trainer state names {e}, which ftcomm never writes: the store was written by "
            "something else, or changed. Refusing to read it (it could run code). Resume from a store this job "
            "wrote, or give FaultTolerant a new ckpt_dir") from None
    except Exception as e:  # noqa: BLE001 - a damaged skeleton is reported as such
        raise ValueError(f"the checkpoint's trainer state cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != 1 or meta.get("tensors") != len(objects) - 1 \
            or not isinstance(meta.get("parts"), dict):
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError("the checkpoint's trainer state is not in a format this ftcomm reads "
                         f"(format {fmt}, {len(objects) - 1} tensors)")
    tensors = list(objects[1:])
    return {name: _fill(value, tensors) for name, value in meta["parts"].items()}
