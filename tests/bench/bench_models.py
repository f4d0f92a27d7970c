"""The MLP the Python benchmarks train (importable: torchrun puts a script's folder on sys.path)."""
import torch.nn as nn


def mlp(widths):
    """Linear layers of the given widths with ReLUs between them."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])
