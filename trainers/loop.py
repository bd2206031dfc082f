"""The training loop: one function, `fit`, that reads in one sitting, and the small helpers it is made of.

It runs unchanged in one process or under `accelerate launch` (DDP; FSDP or DeepSpeed through an accelerate
config): every step takes `batch_size` pairs, split over the processes and micro-batches, and the loss is
scaled so the gradient is the mean over the step's pairs whatever the split. A 2-process run therefore
repeats the loss curve of a 1-process run with the same batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from trainers import checkpoint
from trainers.batch_order import collate_pairs, local_micro_batches
from trainers.config import TrainConfig
from trainers.encode import Encoded
from trainers.forward import PairLogps
from trainers.losses import log_ratios

STATS = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
RefSource = Callable[[list[int], dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def fit(config: TrainConfig, acc, model, pad_id: int, encoded: Sequence[Encoded], steps: list[list[int]],
        refs: RefSource, partial: Path, key: str, *, live_ref: bool = False,
        on_step: Callable[[dict[str, Any]], None] | None = None):
    """Train `model` over `steps` (row indices into `encoded`) and return (the prepared module, the metrics log).

    `refs(rows, batch)` gives the reference log-probs of the rows (`batch` is their padded whole sequences when
    `live_ref`); checkpoints go to `partial` every `config.save_steps` and resume from it when `config.resume`,
    if they were made under the same `key`. `on_step` sees each step's record.
    """
    optimizer, scheduler = make_optimizer(model, config, len(steps))
    net, optimizer = acc.prepare(PairLogps(model, pad_id, config.share_prompts, pack_pairs=config.pack_pairs), optimizer)
    # the scheduler's state is saved as JSON in the checkpoint (accelerate would pickle a registered object)
    start = checkpoint.restore(acc, partial, key, scheduler) if config.resume else 0
    log = checkpoint.MetricsLog(partial / "metrics.jsonl", start, acc.is_main_process)
    spec, params, beta = config.spec, config.loss_params(), config.resolved_beta
    per_epoch = math.ceil(len(encoded) / config.batch_size)
    for step in range(start, len(steps)):
        batch, t_step = steps[step], time.perf_counter()
        micro = local_micro_batches(batch, acc.process_index, acc.num_processes, config.micro_batch)
        totals = torch.zeros(len(STATS), dtype=torch.float64, device=acc.device)
        for j, (rows, weight) in enumerate(micro):
            # the baseline's live reference runs on the padded whole sequences
            live = collate_pairs(encoded, rows, pad_id) if live_ref else {}
            with acc.no_sync(net) if j < len(micro) - 1 else nullcontext():
                logps, ntok = net([encoded[i] for i in rows])
                ref_chosen, ref_rejected = refs(rows, {k: v.to(acc.device) for k, v in live.items()})
                n = len(rows)
                chosen = log_ratios(logps[:n], ref_chosen, ntok[:n], spec.average_logps)
                rejected = log_ratios(logps[n:], ref_rejected, ntok[n:], spec.average_logps)
                losses = spec.fn(chosen - rejected, **params)
                # sum / |step| per process, times the process count that DDP's gradient mean divides by
                acc.backward(losses.sum() * (weight * acc.num_processes / len(batch)))
            totals += weight * pair_sums(losses, chosen, rejected, beta)
        grad_norm = acc.clip_grad_norm_(net.parameters(), config.max_grad_norm or math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        means = (acc.reduce(totals, "sum") / len(batch)).tolist()
        record = {"step": step, "epoch": step // per_epoch, **dict(zip(STATS, means, strict=True)), "lr": lr,
                  "grad_norm": math.nan if grad_norm is None else float(grad_norm), "pairs": len(batch),
                  "tokens": step_tokens(encoded, batch), "seconds": round(time.perf_counter() - t_step, 4)}
        log.write(record)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < len(steps):
            checkpoint.save(acc, partial, step + 1, key, scheduler)
        if on_step:
            on_step(record)
    return net, log


def step_tokens(encoded: Sequence[Encoded], rows: Sequence[int]) -> int:
    """The tokens of a step's pairs, over all processes: each prompt once, both responses."""
    return sum(len(encoded[i].prompt) + sum(map(len, encoded[i].responses)) for i in rows)


def pair_sums(losses, chosen, rejected, beta: float) -> torch.Tensor:
    """Sums over the micro-batch of: loss, reward accuracy, margin, chosen and rejected rewards (beta * ratio)."""
    with torch.no_grad():
        rc, rr = beta * chosen.double(), beta * rejected.double()
        return torch.stack([losses.double().sum(), (rc > rr).double().sum(), (rc - rr).sum(), rc.sum(), rr.sum()])


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier of 0-based `step`: linear warmup over `warmup` steps (never 0), then
    constant, linear decay or cosine decay over the remaining steps (reaching 0 after the last step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def make_optimizer(model, config: TrainConfig, total: int):
    """AdamW (no weight decay on biases and norms) and the warmup-then-decay schedule.

    On CPU and CUDA the update is torch's fused kernel: one pass over each parameter instead of one per
    elementwise op (on CPU the per-tensor loop was 9% of a profiled `sera train` loop of SmolLM2-135M); the
    same update within float32 rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=fused or None)
    warmup = math.ceil(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, config.schedule))
    return optimizer, scheduler
