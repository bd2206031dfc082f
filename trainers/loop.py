"""The training loop: one function, `train`, that reads in one sitting, and the small helpers it is made of.

It runs unchanged in one process or under `accelerate launch` (DDP; FSDP or DeepSpeed through an accelerate
config): every step takes `batch_size` pairs, split over the processes and micro-batches, and the loss is
scaled so the gradient is the mean over the step's pairs whatever the split. A 2-process run therefore
repeats the loss curve of a 1-process run with the same batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from trainers import checkpoint
from trainers.batch_order import longest_first_steps
from trainers.config import TrainConfig, validate
from trainers.data import (
    collate_pairs,
    compute_reference,
    local_micro_batches,
    needed_rows,
    plan_reference,
    read_pairs,
    ref_source,
    step_batches,
)
from trainers.forward import PairLogps
from trainers.losses import log_ratios
from trainers.precision import compute_dtype

STATS = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    pairs: int
    first: dict[str, Any]
    last: dict[str, Any]
    ref_source: str
    seconds: float
    output: str

    def line(self) -> str:
        ref = {"input": "reused from the input", "computed": "computed once", "input+computed":
               "reused, missing rows computed", "none": "not needed", "live": "run every step"}[self.ref_source]
        return (f"trained {self.steps:,} steps on {self.pairs:,} pairs in {self.seconds:,.0f} s (reference "
                f"log-probs {ref}): loss {self.first['loss']:.4f} -> {self.last['loss']:.4f}, reward accuracy "
                f"{self.first['reward_accuracy']:.2f} -> {self.last['reward_accuracy']:.2f} -> {self.output}")


def train(config: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainSummary:
    """Train the policy on the pairs as `config` says and write the model folder; `on_step` sees each record."""
    t0 = time.perf_counter()
    validate(config)
    partial = checkpoint.check_output(config)
    acc = make_accelerator(config)
    tok, pairs, steps, refs, plan = prepare_data(config, acc)
    model = load_policy(config, acc)  # before the partial folder: a model that fails to load leaves nothing
    if acc.is_main_process:
        checkpoint.prepare_partial(partial, config.resume)
    acc.wait_for_everyone()
    optimizer, scheduler = make_optimizer(model, config, len(steps))
    net, optimizer = acc.prepare(PairLogps(model, tok.pad_token_id, config.share_prompts), optimizer)
    acc.register_for_checkpointing(scheduler)
    key = checkpoint.run_key(config, pairs.ids)
    start = checkpoint.restore(acc, partial, key) if config.resume else 0
    log = checkpoint.MetricsLog(partial / "metrics.jsonl", start, acc.is_main_process)
    spec, params, beta = config.spec, config.loss_params(), config.resolved_beta
    per_epoch = math.ceil(len(pairs) / config.batch_size)
    with progress_bar(config.progress and acc.is_main_process, len(steps), start) as show:
        for step in range(start, len(steps)):
            batch, t_step = steps[step], time.perf_counter()
            micro = local_micro_batches(batch, acc.process_index, acc.num_processes, config.micro_batch)
            totals = torch.zeros(len(STATS), dtype=torch.float64, device=acc.device)
            for j, (rows, weight) in enumerate(micro):
                # the baseline's live reference runs on the padded whole sequences
                live = collate_pairs(pairs, rows, tok.pad_token_id) if plan.source == "live" else {}
                with acc.no_sync(net) if j < len(micro) - 1 else nullcontext():
                    logps, ntok = net([pairs.encoded[i] for i in rows])
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
                      "seconds": round(time.perf_counter() - t_step, 4)}
            log.write(record)
            if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < len(steps):
                checkpoint.save(acc, partial, step + 1, key)
            show(record)
            if on_step:
                on_step(record)
    sera = provenance_of(config, pairs, plan, log.records, acc.mixed_precision)
    checkpoint.save_model(acc, net, tok, partial / "model", not config.save_adapter, sera, log.path)
    if acc.is_main_process:
        checkpoint.publish(partial, partial / "model", config.output)
    acc.wait_for_everyone()
    return TrainSummary(len(steps), len(pairs), log.records[0], log.records[-1], plan.source,
                        time.perf_counter() - t0, config.output)


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


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator. The weights being trained stay float32; --dtype bfloat16 or float16 (and auto
    where the CPU or GPU does bfloat16 natively, `trainers.precision`) runs the forward and backward under
    autocast. --dtype decides, not an accelerate config."""
    from accelerate import Accelerator

    from sera_cli.models import resolve_device

    device = resolve_device(config.device)
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[compute_dtype(config.dtype, device)]
    try:
        return Accelerator(cpu=device == "cpu", mixed_precision=precision)
    except ValueError:  # another library in this process (a transformers Trainer) fixed accelerate's state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return Accelerator(cpu=device == "cpu", mixed_precision=precision)


def prepare_data(config: TrainConfig, acc):
    """Tokenizer, encoded pairs, the batch order, and the reference log-probs this process needs."""
    import numpy as np
    from accelerate.utils import set_seed

    from sera_cli.models import load_tokenizer, resolve

    set_seed(config.seed)
    tok = load_tokenizer(resolve(config.policy), config.trust_remote_code)
    pairs = read_pairs(config, tok)
    steps = step_batches(len(pairs), config.batch_size, config.epochs, config.seed, config.max_steps)
    if config.length_sort:
        steps = longest_first_steps(steps, pairs.encoded)
    plan = plan_reference(config, pairs, tok)
    if plan.chosen is not None:
        mine = needed_rows(steps, acc.process_index, acc.num_processes, config.micro_batch)
        plan = compute_reference(plan, pairs, np.intersect1d(mine, plan.todo()), config, acc.device)
    return tok, pairs, steps, ref_source(plan, config, acc.device), plan


def load_policy(config: TrainConfig, acc):
    """The policy in training mode, float32 weights (see `make_accelerator` for the compute dtype), LoRA if asked."""
    from sera_cli.errors import ConfigError
    from sera_cli.models import load_model, resolve

    ref = resolve(config.policy)
    if ref.adapter and config.lora_r:
        raise ConfigError(f"--policy {config.policy} is a LoRA adapter: drop --lora-r to keep training it")
    model = load_model(ref, "float32", str(acc.device), config.trust_remote_code, train=True)
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                                                 lora_dropout=config.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name in recent transformers
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model, config: TrainConfig, total: int):
    """AdamW (no weight decay on biases and norms) and the warmup-then-decay schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, config.schedule))
    return optimizer, scheduler


def provenance_of(config: TrainConfig, pairs, plan, records: list[dict[str, Any]],
                  mixed_precision: str = "no") -> dict[str, Any]:
    """`sera.json`: the run's config (with the dtype the policy ran in, float32 weights either way), the
    identities of the base model and reference, the data's provenance."""
    from sera_cli import provenance
    from sera_cli.hashing import digest
    from sera_cli.models import resolve

    settings = {k: v for k, v in config.as_dict().items() if k != "progress"}
    settings["dtype"] = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")
    return provenance.record(
        "train", settings, requested_dtype=config.dtype,
        models={"policy": resolve(config.policy).identity(), "ref": plan.model.identity() if plan.model else None},
        reference={"source": plan.source, "logps": plan.identity},
        data={"rows": len(pairs), "ids": digest(pairs.ids)}, steps=len(records),
        first=records[0] if records else None, last=records[-1] if records else None,
        parents=pairs.parents)


@contextmanager
def progress_bar(enabled: bool, total: int, start: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar on stderr with the last step's loss and reward accuracy."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sera_cli.console import console

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]}  reward acc {task.fields[acc]}"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=total, completed=start, loss="-", acc="-")
        yield lambda r: bar.update(task, advance=1, loss=f"{r['loss']:.4f}", acc=f"{r['reward_accuracy']:.2f}")
