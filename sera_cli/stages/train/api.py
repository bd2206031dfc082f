"""`sera train`: read and check the pairs, plan the reference, load the policy, run the trainer's loop
(`trainers.loop.fit`), and write the model folder with its provenance.

Everything that knows about files, provenance, model specs and the console is here; the loop itself, its
losses and its checkpoints are the `trainers` library, which never imports `sera_cli`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sera_cli.backends.trackers import TRACKERS
from sera_cli.data.console import console
from sera_cli.data.errors import ConfigError, InputError
from sera_cli.data.hashing import digest
from sera_cli.data.tables import check_folder_writable, inputs_of, refuse_overwrite
from sera_cli.stages.score import precision
from sera_cli.stages.train.data import TrainModels, compute_reference, plan_reference, read_pairs, ref_source
from trainers import checkpoint
from trainers.batch_order import longest_first_steps, needed_rows, step_batches
from trainers.config import TrainConfig
from trainers.precision import compute_dtype

# Settings that do not change the numbers of a run: a checkpoint made with other values still resumes.
_NOT_IN_KEY = ("output", "resume", "overwrite", "progress", "save_steps", "ref_batch_tokens", "report_to",
               "logging_dir")


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
    """Train the policy on the pairs as `config` says and write the model folder; `on_step` sees each record.
    The output is locked for the whole run, as `score` locks its output, so a second trainer of the same
    --output stops at once instead of both reporting success."""
    check_output(config)
    out = Path(config.output)
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # folders the lock file makes
    try:
        with output_lock(config):
            return _train(config, on_step)
    except BaseException:
        for d in made:  # a failed run leaves nothing, not even the folders made for its lock
            try:
                d.rmdir()
            except OSError:
                break
        raise


def output_lock(config: TrainConfig):
    """The output's lock (`locking.pid_lock`, a hidden file beside the output), taken by the main process only:
    the processes of one launch are one run."""
    from contextlib import nullcontext

    from sera_cli.data.locking import pid_lock

    if int(os.environ.get("RANK", "0")) != 0:
        return nullcontext()
    out = Path(config.output)
    lock = out.with_name(f".{out.name}.train-lock")
    return pid_lock(lock, lambda pid: f"{config.output}: another sera process (pid {pid}) is training into this "
                                      f"output (its lock {lock} is held); wait for it to finish or choose another "
                                      "--output")


def _train(config: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None) -> TrainSummary:
    from trainers.loop import fit

    t0 = time.perf_counter()
    config.check()
    partial = check_output(config)
    acc = make_accelerator(config)
    if acc.is_main_process and (acc.num_processes > 1 or launched()):  # a launcher's run says how many ran
        console.print(world_line(config, acc.num_processes, acc.device.type, acc.distributed_type.value),
                      soft_wrap=True, highlight=False, markup=False)
    models = TrainModels.of(config)  # resolved once for the whole stage
    tok, pairs, steps, refs, plan = prepare_data(config, acc, models)
    dtypes = precision.reference_dtype(plan, config.dtype, acc.device.type), compute_dtype(config.dtype,
                                                                                             acc.device.type)
    model = load_policy(config, acc, models)  # before the partial folder: a model that fails to load leaves nothing
    if acc.is_main_process and (note := precision.dtype_note(*dtypes)):  # after loading: a failure stays one line
        console.print(note, soft_wrap=True, highlight=False, markup=False)
    if acc.is_main_process:
        checkpoint.prepare_partial(partial, config.resume)
    acc.wait_for_everyone()
    start = checkpoint.saved_step(partial) if config.resume else 0
    track = start_tracking(config, acc)
    with progress_bar(config.progress and acc.is_main_process, len(steps), start) as show:
        def step_done(record: dict[str, Any]) -> None:
            show(record)
            if track:
                acc.log({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"},
                        step=record["step"])
            if on_step:
                on_step(record)

        net, log = fit(config, acc, model, tok.pad_token_id, pairs.encoded, steps, refs, partial,
                       run_key(config, pairs.ids), live_ref=plan.source == "live", on_step=step_done)
    if track:
        acc.end_training()
    sera = provenance_of(config, pairs, plan, log.records, acc.mixed_precision,
                         {"world_size": acc.num_processes, "distributed_type": acc.distributed_type.value}, dtypes[0], models)
    from sera_cli.backends.models import save_tokenizer

    checkpoint.save_model(acc, net, tok, partial / "model", not config.save_adapter, sera, log.path,
                          save_tokenizer)
    if acc.is_main_process:
        checkpoint.publish(partial, partial / "model", config.output)
    acc.wait_for_everyone()
    return TrainSummary(len(steps), len(pairs), log.records[0], log.records[-1], plan.source,
                        time.perf_counter() - t0, config.output)


def check_output(config: TrainConfig) -> Path:
    """Fail before any work when the output folder cannot be made; return the partial folder."""
    out = Path(config.output)
    for folder in (out, checkpoint.partial_dir(out)):  # both are replaced as a whole
        refuse_overwrite(folder, inputs_of(config, config.logging_dir), folder=True)
    if config.logging_dir:
        check_folder_writable(config.logging_dir, inputs_of(config), what="--logging-dir")
    if out.exists() and not config.overwrite:
        raise InputError(config.output, "already exists", hint="choose another --output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(config.output, "is a file; the output is a model folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(config.output, f"cannot be written: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(config.output, f"cannot be written: no permission on {parent}")
    partial = checkpoint.partial_dir(out)
    if config.resume and not checkpoint.latest_checkpoint(partial):
        raise ConfigError(f"--resume: no checkpoint in {partial} (the run saves one every --save-steps steps)")
    return partial


def run_key(config: TrainConfig, ids: list[str]) -> str:
    """What a checkpoint must agree on to be resumed: the settings that shape the numbers and the data."""
    settings = {k: v for k, v in config.as_dict().items() if k not in _NOT_IN_KEY}
    return digest({"config": settings, "rows": digest(ids)})


def logging_dir(config: TrainConfig) -> str:
    return config.logging_dir or f"{str(config.output).rstrip('/')}-runs"


def start_tracking(config: TrainConfig, acc) -> bool:
    """accelerate's trackers (`--report-to`): the run's settings as hyperparameters, one log per step."""
    if config.report_to == "none":
        return False
    hparams = {k: v for k, v in vars(config).items() if isinstance(v, int | float | str | bool)}
    acc.init_trackers("sera-train", config=hparams)
    return True


def make_accelerator(config: TrainConfig):
    """accelerate's Accelerator. The weights being trained stay float32; --dtype bfloat16 or float16 (and auto
    where the CPU or GPU does bfloat16 natively, `trainers.precision`) runs the forward and backward under
    autocast. --dtype decides, not an accelerate config."""
    from accelerate import Accelerator

    from sera_cli.backends.models import resolve_device

    device = resolve_device(config.device)
    precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[compute_dtype(config.dtype, device)]
    kwargs = {"cpu": device == "cpu", "mixed_precision": precision}
    if config.report_to not in TRACKERS:
        raise ConfigError(f"--report-to {config.report_to}: expected one of {', '.join(TRACKERS)}")
    if config.report_to != "none":
        from accelerate.utils import (
            is_mlflow_available,
            is_tensorboard_available,
            is_trackio_available,
            is_wandb_available,
        )

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                     "mlflow": is_mlflow_available, "trackio": is_trackio_available}[config.report_to]
        if not available():
            raise ConfigError(f"--report-to {config.report_to}: the package is not installed "
                              f"(pip install {config.report_to})")
        kwargs.update(log_with=config.report_to, project_dir=logging_dir(config))
    try:
        return Accelerator(**kwargs)
    except ValueError:  # another library in this process (a transformers Trainer) fixed accelerate's state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def prepare_data(config: TrainConfig, acc, models: TrainModels):
    """Tokenizer, encoded pairs, the batch order, and the reference log-probs this process needs."""
    import numpy as np
    from accelerate.utils import set_seed

    from sera_cli.backends.models import load_tokenizer

    set_seed(config.seed)
    tok = load_tokenizer(models.policy, config.trust_remote_code)
    pairs = read_pairs(config, tok, models)
    steps = step_batches(len(pairs), config.batch_size, config.epochs, config.seed, config.max_steps)
    if config.length_sort:
        steps = longest_first_steps(steps, pairs.encoded)
    plan = plan_reference(config, pairs, tok, models)
    if plan.chosen is not None:
        mine = needed_rows(steps, acc.process_index, acc.num_processes, config.micro_batch)
        plan = compute_reference(plan, pairs, np.intersect1d(mine, plan.todo()), config, acc.device)
    return tok, pairs, steps, ref_source(plan, config, acc.device), plan


def load_policy(config: TrainConfig, acc, models: TrainModels):
    """The policy in training mode, float32 weights (see `make_accelerator` for the compute dtype), LoRA if asked."""
    from sera_cli.backends.models import load_model
    from sera_cli.data.errors import ConfigError

    ref = models.policy
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


def launched() -> bool:
    """Whether a launcher started this process (`accelerate launch` sets ACCELERATE_* even for one process,
    torchrun sets WORLD_SIZE), so a launch that fell back to one process says so."""
    return "WORLD_SIZE" in os.environ or any(k.startswith("ACCELERATE_") for k in os.environ)


def world_line(config: TrainConfig, processes: int, device: str, kind: str) -> str:
    """What the run is about to do, said before it starts: how many processes and the batch per step."""
    per = -(-config.batch_size // processes)
    return (f"training on {processes} process{'es' if processes > 1 else ''} ({kind}, {device}): effective batch "
            f"{config.batch_size} pairs per optimizer step ({'up to ' if processes > 1 else ''}{per} per process, "
            f"micro-batches of {config.micro_batch})")


def provenance_of(config: TrainConfig, pairs, plan, records: list[dict[str, Any]],
                  mixed_precision: str, world: dict[str, Any], ref_dtype: str | None,
                  models: TrainModels) -> dict[str, Any]:
    """`sera.json`: the run's config (with the dtype the policy ran in, float32 weights either way), the
    identities of the base model and reference, the data's provenance, and how many processes trained."""
    from sera_cli.backends.chat_templates import folded_record, folded_rows
    from sera_cli.data import provenance
    from sera_cli.data.hashing import digest

    settings = {k: v for k, v in config.as_dict().items() if k != "progress"}
    settings["dtype"] = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, "float32")
    return provenance.record(
        "train", settings, requested_dtype=config.dtype,
        models={"policy": models.policy.identity(), "ref": plan.model.identity() if plan.model else None},
        reference={"source": plan.source, "logps": plan.identity, "dtype": ref_dtype,
                   "dtype_differs": ref_dtype is not None and ref_dtype != settings["dtype"]},
        data={"rows": len(pairs), "ids": digest(pairs.ids)}, steps=len(records),
        first=records[0] if records else None, last=records[-1] if records else None,
        **world, parents=pairs.parents,
        **folded_record(folded_rows(pairs.encoded)))


@contextmanager
def progress_bar(enabled: bool, total: int, start: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar on stderr with the last step's loss and reward accuracy, and the pairs and tokens
    trained per second so far (step time, without checkpoints)."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from sera_cli.data.console import Progress

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]}  reward acc {task.fields[acc]}  {task.fields[speed]}"))
    done = {"pairs": 0, "tokens": 0, "seconds": 0.0}
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=total, completed=start, loss="-", acc="-", speed="", unit="steps")

        def show(r: dict[str, Any]) -> None:
            for k in done:
                done[k] += r.get(k, 0)
            s = max(done["seconds"], 1e-9)
            bar.update(task, advance=1, loss=f"{r['loss']:.4f}", acc=f"{r['reward_accuracy']:.2f}",
                       speed=f"{done['pairs'] / s:,.1f} pairs/s  {done['tokens'] / s:,.0f} tokens/s")

        yield show
