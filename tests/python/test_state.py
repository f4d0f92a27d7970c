"""The trainer-state codec (ftcomm._state) in one process, no torchrun: the fast tier
(scripts/test.sh --fast runs these)."""
import collections
import pickle

import pytest
import torch

from ftcomm import _state

pytestmark = pytest.mark.fast


def test_plain_values_and_tensors_round_trip():
    weights = torch.arange(6, dtype=torch.float32).view(2, 3)
    parts = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": weights}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}]},
             "user": {"epoch": 2, "name": "run", "blob": b"\x00\x01", "none": None, "tags": {"a", "b"},
                      "ordered": collections.OrderedDict(x=1), "dtype": torch.bfloat16}}
    objects = _state.pack(parts)
    back = _state.unpack(objects)
    assert back["user"] == parts["user"]
    assert back["optimizer"]["param_groups"] == parts["optimizer"]["param_groups"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], weights)
    assert back["optimizer"]["state"][0]["step"].item() == 3.0


def test_copy_keeps_the_value_of_the_moment():
    counter = torch.zeros(3)
    objects = _state.pack({"user": {"counter": counter}, "optimizer": {"m": counter}}, copy=("user",))
    counter.add_(1)
    back = _state.unpack(objects)
    assert torch.equal(back["user"]["counter"], torch.zeros(3))  # copied at pack
    assert torch.equal(back["optimizer"]["m"], torch.ones(3))    # by reference


class _Custom:
    pass


def test_a_value_that_would_not_read_back_is_refused_when_saved():
    with pytest.raises(_state.UnsafeStateError, match="the user state holds a value ftcomm does not save"):
        _state.pack({"user": {"obj": _Custom()}, "optimizer": {}})


class _Evil:
    def __reduce__(self):
        return (print, ("ran code",))


def test_a_forged_skeleton_is_refused_and_runs_nothing(capsys):
    objects = _state.pack({"user": {"x": 1}})
    forged = pickle.dumps({"format": 1, "parts": {"user": _Evil()}, "tensors": 0}, protocol=4)
    objects[0] = torch.frombuffer(bytearray(forged), dtype=torch.uint8)
    with pytest.raises(_state.UnsafeStateError, match="Refusing to read it"):
        _state.unpack(objects)
    assert "ran code" not in capsys.readouterr().out


def test_a_damaged_or_foreign_state_is_named():
    with pytest.raises(ValueError, match="holds no trainer state"):
        _state.unpack([])
    objects = _state.pack({"user": {"x": torch.ones(2)}})
    with pytest.raises(ValueError, match="not in a format this ftcomm reads"):
        _state.unpack(objects[:1])  # a tensor missing
    with pytest.raises(ValueError, match="cannot be read"):
        _state.unpack([torch.tensor([1, 2, 3], dtype=torch.uint8)])
