"""Factories that fail in the ways users' models do."""

import torch
import torch.nn as nn


def raising():
    raise ValueError("config file missing")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:   # control flow on tensor values
            return y * 2
        return y


def data_dependent():
    return DataDependent()


def not_a_module():
    return 42


def tiny_linear():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class PinsLength(nn.Module):
    """Checks its sequence length against a constant, so the capture pins it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] != 16:
            raise ValueError("expected length 16")
        return self.lin(x)


def pins_length():
    return PinsLength()


class Bounded(nn.Module):
    """Takes a different branch for long sequences: the capture records seq <= 32 as a guard."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] > 32:
            return self.lin(self.lin(x))
        return self.lin(x)


def bounded():
    return Bounded()


_ = torch
