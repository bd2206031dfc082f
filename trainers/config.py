"""The settings of one training run, as a typed, frozen config (the CLI fills it; the trainer reads it)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH
from trainers.errors import ConfigError
from trainers.losses import LOSSES, LossSpec

SCHEDULES = ("linear", "cosine", "constant")



class Settings:
    """A frozen dataclass of settings (`TrainConfig` and every stage's config derive from it): `as_dict` is the
    record provenance keeps and resume keys are made from."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

@dataclass(frozen=True, kw_only=True)
class TrainConfig(Settings):
    """The settings of one training run (`sera train`): data, models, loss, optimiser and checkpoints."""

    inputs: tuple[str, ...]
    output: str
    policy: str
    ref: str | None = None
    loss: str = "dpo"
    beta: float | None = None  # None: the loss's default (LossSpec.default_beta)
    delta: float = 1.0  # SLiC-HF hinge margin
    gamma: float = 1.0  # SimPO target margin (gamma / beta = 0.5 with the default beta 2.0)
    eps: float = 0.1  # cDPO / rDPO assumed label-flip rate
    recompute_ref: bool = False
    trust_stored_ref: bool = False  # use stored reference log-probs that carry no provenance as they are
    lr: float = 5e-7
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    batch_size: int = 32  # pairs per optimizer step, over all processes and accumulation steps
    micro_batch: int = 4  # pairs per forward pass and process
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 42
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: int | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    save_adapter: bool = False  # LoRA: save the adapter instead of merged weights
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # the policy's compute dtype (trainers.precision) and the reference's load dtype
    device: str = "auto"
    max_length: int | None = MAX_LENGTH
    max_prompt_length: int | None = MAX_PROMPT_LENGTH
    ref_batch_tokens: int = 1024
    save_steps: int = 50  # checkpoint every n steps (0: never)
    resume: bool = False
    overwrite: bool = False
    live_ref: bool = False  # run the reference model every step (the baseline that reuse is measured against)
    # run a pair's prompt once for both responses (exact); off by default: with 2 CPU threads it measured slower
    # than two whole sequences (docs/performance.md); packing (pack_pairs) runs the prompt once faster
    share_prompts: bool = False
    # each pair as one row [prompt | chosen | rejected] with a mask keeping the responses apart (exact; the
    # prompt runs once in one pass; trainers.packing): the training forward and the reference pass
    pack_pairs: bool = True
    length_sort: bool = True  # inside each step, micro-batches of similar length (trainers.batch_order)
    trust_remote_code: bool = False
    progress: bool = True
    report_to: str = "none"  # an accelerate tracker: tensorboard, wandb, mlflow, trackio, or none
    logging_dir: str | None = None  # the tracker's folder (None: <output>-runs beside the model folder)

    @property
    def spec(self) -> LossSpec:
        return LOSSES[self.loss]

    def loss_params(self) -> dict[str, float]:
        """The hyper-parameters the loss function takes, with beta resolved to the loss's default."""
        values = {"beta": self.resolved_beta, "delta": self.delta, "gamma": self.gamma, "eps": self.eps}
        return {name: values[name] for name in self.spec.params}

    @property
    def resolved_beta(self) -> float:
        return self.spec.default_beta if self.beta is None else self.beta


    def check(self) -> None:
        """Every out-of-range or contradictory setting at once, as the user typed it, in one ConfigError."""
        out = [f"--{f.name.replace('_', '-')} must be a finite number (got {v})" for f in fields(self)
               if isinstance(v := getattr(self, f.name), float) and not math.isfinite(v)]
        if out:  # NaN compares false with every bound below, so it would pass them (the CLI refuses it earlier)
            raise ConfigError("; ".join(out))
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss}: expected one of {', '.join(LOSSES)}")
        if not 0 < self.lr < 1:
            out.append(f"--lr must be in (0, 1) (got {self.lr:g})")
        if not self.resolved_beta > 0:
            out.append(f"--beta must be > 0 (got {self.resolved_beta:g})")
        if "eps" in self.spec.params and not 0 <= self.eps < 0.5:
            out.append(f"--eps must be in [0, 0.5) (got {self.eps:g})")
        if self.schedule not in SCHEDULES:
            out.append(f"--schedule {self.schedule}: expected one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio:g})")
        for name in ("batch_size", "micro_batch", "epochs"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("weight_decay", "max_grad_norm", "lora_r", "save_steps", "lora_dropout"):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"--max-steps must be >= 1 (got {self.max_steps})")
        if not self.spec.needs_ref and self.ref:
            out.append(f"--loss {self.loss} is reference-free: drop --ref")
        if self.recompute_ref and not self.ref:
            out.append("--recompute-ref needs --ref (the model whose log-probs to compute)")
        if self.live_ref and not self.ref:
            out.append("--live-ref needs --ref (the model to run every step)")
        if self.save_adapter and not self.lora_r:
            out.append("--save-adapter needs --lora-r (there is no adapter in full fine-tuning)")
        if out:
            raise ConfigError("; ".join(out))
