"""Nested Python state (an optimizer's state_dict, the trainer's own dict) as tensors
plus one byte tensor, which is how the store and the resync carry it."""
from __future__ import annotations

import ctypes
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


def _strip(obj: Any, tensors: list) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return _TensorRef(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list) -> Any:
    if isinstance(obj, _TensorRef):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, tensors) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_fill(v, tensors) for v in obj)
    return obj


def pack(parts: dict) -> list:
    """``parts`` (name -> nested state) as [skeleton bytes, tensor, tensor, ...]."""
    tensors: list = []
    skeleton = {name: _strip(value, tensors) for name, value in parts.items()}
    data = pickle.dumps({"format": 1, "parts": skeleton, "tensors": len(tensors)}, protocol=4)
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8)] + tensors


def _bytes_of(t: torch.Tensor) -> bytes:
    """A uint8 tensor's bytes (without numpy, which torch does not require)."""
    t = t.detach().cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel()) if t.numel() else b""


def unpack(objects: list) -> dict:
    """The inverse of :func:`pack`."""
    if not objects:
        raise ValueError("the checkpoint holds no trainer state (was it written by `ftcomm train`?)")
    meta = pickle.loads(_bytes_of(objects[0]))
    if meta.get("format") != 1 or meta["tensors"] != len(objects) - 1:
        raise ValueError("the checkpoint's trainer state is not in a format this ftcomm reads "
                         f"(format {meta.get('format')}, {len(objects) - 1} tensors)")
    tensors = list(objects[1:])
    return {name: _fill(value, tensors) for name, value in meta["parts"].items()}
