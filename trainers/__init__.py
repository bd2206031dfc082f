"""A thin direct-alignment trainer (DPO, IPO, SLiC-HF, SimPO, cDPO, rDPO) that reuses scored reference
log-probs, and the maths it shares with scoring (encoding conventions, log-probs, prompt sharing).

A leaf library: it imports torch, transformers, accelerate and peft, never `sera_cli`. `trainers.loop.fit` runs
the loop on a loaded model and encoded pairs; `sera train` (`sera_cli.stages.train.api`) reads the data, plans the
reference and loads the models around it. Names are imported lazily, so `trainers.errors` or `trainers.encode`
load no torch.
"""

from importlib import import_module

_NAMES = {"TrainConfig": "trainers.config", "LOSSES": "trainers.losses", "LossSpec": "trainers.losses"}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
