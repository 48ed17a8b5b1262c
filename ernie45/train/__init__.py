"""Training ERNIE 4.5 on Megatron-Core: ``train(TrainConfig(...))`` or ``ernie45 train``.

``config`` (flags, YAML, batch arithmetic) and ``trainer`` (the loop on Megatron's DDP, optimizer, scheduler and
schedules) import lazily, so ``import ernie45.train`` stays cheap for the CLI.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(name)
