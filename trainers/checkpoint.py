"""The run's folders: work happens in `<output>.partial/` (metrics, checkpoints, the model being written);
the finished model folder is renamed to `<output>` at the very end, so a failed run leaves no output.

A checkpoint is accelerate's full state (model, optimizer, scheduler, every process's RNG) plus the step
number, which is the data position since the batch order depends only on the seed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

from trainers.errors import ConfigError, InputError


def partial_dir(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".partial")


def latest_checkpoint(partial: Path) -> Path | None:
    """The newest complete checkpoint: `checkpoint`, or, when a save was cut between its two renames (see
    `save`), the new one still named `checkpoint.tmp` (complete once its state.json, written last, exists),
    else the previous one already moved to `checkpoint.old`."""
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        if (partial / name / "state.json").exists():
            return partial / name
    return None


def prepare_partial(partial: Path, resume: bool) -> None:
    """(Main process) a clean partial folder, or the existing one when resuming, its latest checkpoint named
    `checkpoint` (finishing a save that was cut between its renames)."""
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    elif (latest := latest_checkpoint(partial)) and latest.name != "checkpoint":
        shutil.rmtree(partial / "checkpoint", ignore_errors=True)
        os.replace(latest, partial / "checkpoint")
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(str(partial), f"cannot be created: {err.strerror}") from None


def save(accelerator, partial: Path, step: int, key: str, scheduler=None) -> None:
    """Write a checkpoint beside the old one and swap it in, so a crash mid-save keeps the old one. The
    scheduler's state goes into `state.json` (plain numbers), not into a pickle."""
    tmp, final, old = partial / "checkpoint.tmp", partial / "checkpoint", partial / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        sched = scheduler.state_dict() if scheduler is not None else None
        (tmp / "state.json").write_text(json.dumps({"step": step, "key": key, "scheduler": sched}))
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def saved_step(partial: Path) -> int:
    """The step the checkpoint in `partial` continues from (the key is checked by `restore`)."""
    return int(_state(partial / "checkpoint")["step"])


def _state(folder: Path) -> dict[str, Any]:
    """A checkpoint's state.json; a missing, truncated or malformed one is one line naming it."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_bytes())
        if isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("key"), str):
            return state
        problem = "does not hold a step and a settings key"
    except (OSError, ValueError, RecursionError) as err:
        problem = f"cannot be read ({getattr(err, 'strerror', None) or type(err).__name__})"
    raise InputError(str(path), f"{problem}: the checkpoint is damaged", hint="rerun without --resume to start over")


def restore(accelerator, partial: Path, key: str, scheduler=None) -> int:
    """Load the checkpoint; return the step to continue from.

    Nothing in it is unpickled: the weights, optimizer and RNG states load with `torch.load(weights_only=True)`
    (accelerate's loader), and `check_no_code` first refuses, in one line, a checkpoint holding any file this
    trainer does not write (a planted `custom_checkpoint_0.pkl`, which accelerate would unpickle) or a state
    file that is not plain tensors and numbers."""
    folder = partial / "checkpoint"
    state = _state(folder)
    if state["key"] != key:
        raise ConfigError(f"--resume: the checkpoint in {partial} was made with other settings or data; "
                          "rerun with the same ones, or without --resume to start over")
    check_no_code(folder)
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as err:
        raise _not_plain(folder, err) from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# What `save` writes: accelerate's model, optimizer, scaler and per-process RNG files, and our state.json.
_CHECKPOINT_FILE = re.compile(r"(pytorch_model|model)(_\d+)?\.(bin|safetensors)|optimizer(_\d+)?\.bin|"
                              r"scaler\.pt|random_states_\d+\.pkl|state\.json")


def check_no_code(folder: Path) -> None:
    """Refuse a checkpoint folder that holds a file `save` never writes, or a state file that is not plain
    tensors and numbers, naming the file. accelerate loads every state with `weights_only=True` too (see
    `restore`), but it does not say which file failed, and it ignores an RNG file it cannot load. The check
    maps the files (`mmap`) rather than reading their tensors, so it costs little for a large model."""
    from accelerate.utils.other import load

    for path in sorted(folder.iterdir()):
        if not _CHECKPOINT_FILE.fullmatch(path.name):
            raise InputError(str(path), "is not a file of a sera checkpoint, and a checkpoint is never unpickled "
                                        "beyond plain tensors",
                             hint="remove it, or rerun without --resume to start over")
        if path.suffix in (".bin", ".pkl", ".pt"):
            try:
                try:
                    load(path, map_location="cpu", mmap=True)  # weights_only=True, numpy arrays allowed
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    load(path, map_location="cpu")  # not torch's zip format: a bare pickle, still weights_only
            except pickle.UnpicklingError as err:
                if "truncated" in str(err):
                    raise _damaged(path, err) from None
                raise _not_plain(path, err) from None
            except (RuntimeError, EOFError, OSError, ValueError) as err:  # a truncated or corrupt file
                raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> InputError:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    why = lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__  # torch adds paragraphs of advice
    return InputError(str(path), f"is truncated or damaged ({why}); it was "
                                 "not loaded", hint="rerun without --resume to start over")


def _not_plain(path: Path, err: Exception) -> InputError:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    why = next((ln.rstrip(".") for ln in lines if "unsupported" in ln.lower() and "weights_only" not in ln),
               "refused by torch.load(weights_only=True)")  # torch's reason: 'unsupported GLOBAL posix.system ...'
    return InputError(str(path), f"holds code or objects, not plain tensors ({why}); it was not loaded",
                      hint="rerun without --resume to start over")


class MetricsLog:
    """`metrics.jsonl`: one JSON line per optimizer step (main process only); on resume, lines after the
    checkpoint are dropped so the file equals an uninterrupted run's."""

    def __init__(self, path: Path, start: int, main: bool):
        self.path, self.main = path, main
        self.records: list[dict[str, Any]] = []
        if path.exists():
            self.records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            self.records = [r for r in self.records if r["step"] < start]
        if main:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def save_model(accelerator, net, tok, folder: Path, merge: bool, sera: dict[str, Any], metrics: Path,
               save_tokenizer=None) -> None:
    """The trained model as a Hugging Face folder (safetensors, tokenizer, generation config), with its
    provenance (`sera.json`) and `metrics.jsonl`. LoRA runs are merged unless `merge` is False.
    `save_tokenizer(tok, folder)` writes the tokenizer (default: its save_pretrained)."""
    from accelerate.utils import DistributedType
    from transformers.utils import logging as hf_logging

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state = accelerator.get_state_dict(net) if sharded else None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(net).model
        if merge and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        shutil.rmtree(folder, ignore_errors=True)
        if state is not None:
            state = {k.removeprefix("model."): v for k, v in state.items()}
        quiet = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' own bar for writing shards
        try:
            model.save_pretrained(folder, safe_serialization=True, state_dict=state)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
        (save_tokenizer or type(tok).save_pretrained)(tok, folder)
        if getattr(model, "generation_config", None) is not None and not (folder / "generation_config.json").exists():
            model.generation_config.save_pretrained(folder)
        (folder / "sera.json").write_text(json.dumps(sera, indent=2, default=str) + "\n")
        shutil.copyfile(metrics, folder / "metrics.jsonl")
    accelerator.wait_for_everyone()


def publish(partial: Path, folder: Path, output: str) -> None:
    """(Main process) move the finished model folder to `output`, replacing an old one, and clean up."""
    out = Path(output)
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
