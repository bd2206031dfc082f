"""A thin direct-alignment trainer (DPO, IPO, SLiC-HF, SimPO, cDPO, rDPO) that reuses scored reference
log-probs. `train(TrainConfig(...))` is the whole API; `sera train` is a shell over it."""

from trainers.config import TrainConfig
from trainers.loop import TrainSummary, train
from trainers.losses import LOSSES, LossSpec

__all__ = ["LOSSES", "LossSpec", "TrainConfig", "TrainSummary", "train"]
