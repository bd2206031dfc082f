"""`sera train`: parse options into a TrainConfig, call `trainers.train`, print one summary line."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from sera_cli.backends.trackers import TRACKERS
from sera_cli.commands import options as o


def train_command(
    inputs: o.InputsArg,
    output: Annotated[str, typer.Option("--output", "-o", help="Model folder to write (safetensors, tokenizer, "
                                "metrics.jsonl, sera.json); work happens in OUTPUT.partial until the end.")],
    policy: o.PolicyOpt = "smollm2-135m",
    ref: o.RefOpt = None,
    revision: o.RevisionOpt = None,
    ref_revision: o.RefRevisionOpt = None,
    split: o.SplitOpt = None,
    subset: o.SubsetOpt = None,
    config_file: o.ConfigOpt = None,
    loss: Annotated[str, typer.Option("--loss", help="dpo, ipo, slic, simpo, cdpo or rdpo.")] = "dpo",
    beta: Annotated[float | None, typer.Option("--beta", help="Loss scale beta (IPO's tau). Default: 0.1, or 2.0 for "
                                       "simpo.")] = None,
    delta: Annotated[float, typer.Option("--delta", help="SLiC-HF hinge margin.")] = 1.0,
    gamma: Annotated[float, typer.Option("--gamma", help="SimPO target reward margin.")] = 1.0,
    eps: Annotated[float, typer.Option("--eps", help="cDPO/rDPO assumed label-flip rate, in [0, 0.5).")] = 0.1,
    recompute_ref: Annotated[bool, typer.Option("--recompute-ref", help="Compute reference log-probs with --ref even "
                                        "when the input carries others.")] = False,
    trust_stored_ref: Annotated[bool, typer.Option(
        "--trust-stored-ref", help="Use stored reference log-probs that carry no provenance (TRL's "
                                   "ref_chosen_logps/ref_rejected_logps from TRL itself) as they are.")] = False,
    live_ref: Annotated[bool, typer.Option("--live-ref", help="Run the reference model every step instead (the slow "
                                   "baseline; for comparisons).")] = False,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 5e-7,
    schedule: Annotated[Literal["linear", "cosine", "constant"], typer.Option("--schedule", help="After warmup: linear, cosine or constant.")] = "linear",
    warmup_ratio: Annotated[float, typer.Option("--warmup-ratio", help="Fraction of steps of linear warmup.")] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases, norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip gradients to this norm; 0: no "
                                         "clipping.")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per optimizer step, over all processes "
                                    "(gradients are accumulated as needed).")] = 32,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Pairs per forward pass and process.")] = 4,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data (SeRA: 1 per iteration).")] = 1,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    seed: o.SeedOpt = 42,
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank (0: full fine-tuning).")] = 0,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha (default 2 * rank).")] = None,
    save_adapter: Annotated[bool, typer.Option("--save-adapter", help="With --lora-r: save the adapter, not merged "
                                       "weights.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in "
                                                 "the backward pass (less memory, ~30% slower).")] = False,
    share_prompts: Annotated[bool, typer.Option(
        "--share-prompts", help="Run each pair's prompt once for both responses (exact; fewer FLOPs, but on a "
                                "2-core CPU slower than two whole sequences, so off by default).")] = False,
    pack_pairs: Annotated[bool, typer.Option(
        "--pack/--no-pack", help="Run each pair as one row, prompt, chosen and rejected, with a mask "
                                             "keeping the responses apart (exact; the prompt runs once). Models "
                                             "of other families run whole sequences.")] = True,
    dtype: Annotated[str, typer.Option("--dtype", help="The policy's compute dtype (its weights stay float32): "
                               "auto (bfloat16 autocast on a GPU or on a CPU with AVX512_BF16 or AMX, else "
                               "float32), float32, bfloat16 or float16. A reference computed here loads in it too "
                               "(auto: as 'score' resolves it).", callback=o.check_dtype)] = "auto",
    device: o.DeviceOpt = "auto",
    max_length: o.MaxLengthOpt = o.MAX_LENGTH,
    max_prompt_length: o.MaxPromptLengthOpt = o.MAX_PROMPT_LENGTH,
    save_steps: Annotated[int, typer.Option("--save-steps", help="Checkpoint every n steps (0: never).")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint "
                                 "in OUTPUT.partial.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    trust_remote_code: o.TrustRemoteCodeOpt = False,
    chat_template: o.ChatTemplateOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    report_to: Annotated[str, typer.Option(
        "--report-to", help="Log each step's loss, reward accuracy and learning rate to an experiment tracker "
                            f"through accelerate: {', '.join(TRACKERS[1:])} or none (install its package; "
                            "offline modes such as WANDB_MODE=offline work).",
        callback=o.choice("--report-to", TRACKERS))] = "none",
    logging_dir: Annotated[str | None, typer.Option(
        "--logging-dir", help="The tracker's folder (default: OUTPUT-runs beside the model folder).")] = None,
) -> None:
    """Train the policy one epoch with a direct alignment loss, reusing the reference log-probs of 'sera score'.

    Example: sera train scored.parquet --policy smollm2-135m --ref smollm2-135m --lr 1e-6 -o pi1/
    """
    from sera_cli.backends.chat_templates import use_chat_template

    use_chat_template(chat_template)
    from sera_cli.backends.hub import with_revision
    from sera_cli.data.console import console
    from sera_cli.data.hub_data import with_split
    from sera_cli.stages.train.api import train
    from trainers import TrainConfig

    policy, ref = with_revision(policy, revision), with_revision(ref, ref_revision, "--ref-revision", "--ref")
    config = TrainConfig(
        inputs=with_split(inputs, split, subset), output=output, policy=policy, ref=ref, loss=loss, beta=beta, delta=delta,
        gamma=gamma, eps=eps, recompute_ref=recompute_ref, trust_stored_ref=trust_stored_ref, lr=lr, schedule=schedule, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, batch_size=batch_size, micro_batch=micro_batch,
        epochs=epochs, max_steps=max_steps, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
        save_adapter=save_adapter, gradient_checkpointing=gradient_checkpointing, share_prompts=share_prompts, pack_pairs=pack_pairs, dtype=dtype, device=device,
        max_length=max_length, max_prompt_length=max_prompt_length, save_steps=save_steps, resume=resume,
        overwrite=overwrite, live_ref=live_ref, trust_remote_code=trust_remote_code, progress=not quiet,
        report_to=report_to, logging_dir=logging_dir)
    summary = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        console.print(summary.line(), soft_wrap=True)


PANELS = {
    o.IO: ("output", "split", "subset", "config_file", "overwrite", "quiet", "report_to", "logging_dir"),
    o.MODELS: ("policy", "ref", "revision", "ref_revision", "max_length", "max_prompt_length", "lora_r",
               "lora_alpha", "save_adapter", "trust_remote_code", "chat_template"),
    "Loss": ("loss", "beta", "delta", "gamma", "eps", "recompute_ref", "trust_stored_ref", "live_ref"),
    "Optimisation": ("lr", "schedule", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size", "epochs",
                     "max_steps", "seed"),
    o.PERFORMANCE: ("micro_batch", "gradient_checkpointing", "share_prompts", "pack_pairs", "dtype", "device"),
    o.RESUME: ("save_steps", "resume"),
}


def register(app: typer.Typer) -> None:
    from sera_cli.commands.edge import guarded

    app.command("train")(guarded(o.panels(train_command, PANELS)))
