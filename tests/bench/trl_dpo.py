"""TRL 1.16's DPOTrainer as a user runs it: one script, one process, the pairs of a Parquet file in file order.

`tests/bench/train.py --whole-process` times this script from start to exit against `sera train`; it prints one
JSON line with the phases it can see from inside (model load, trainer set-up with TRL's tokenization and
reference pass, the training loop, saving the model) and the logged step losses.

    python tests/bench/trl_dpo.py PAIRS.parquet MODEL_FOLDER OUT [--lr 1e-6 --beta 0.1 ...]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-save", action="store_true", help="do not save the trained model")
    args = p.parse_args()
    t_imports = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter()
    rows = Dataset(pq.read_table(args.pairs).select(["prompt", "chosen", "rejected"]))
    config = DPOConfig(output_dir=args.out, precompute_ref_log_probs=True,
                       precompute_ref_batch_size=args.micro_batch, per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.batch_size // args.micro_batch, max_length=args.max_length,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, beta=args.beta,
                       max_grad_norm=1.0, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not torch.cuda.is_available(), bf16=False, seed=args.seed, disable_tqdm=True,
                       dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=rows, processing_class=tok)
    if len(trainer.train_dataset) != len(rows):
        sys.exit(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs")
    # the file's order, one epoch (the benchmark writes the rows in sera's seeded step order)
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    t_setup = time.perf_counter()
    trainer.train()
    t_loop = time.perf_counter()
    if not args.no_save:
        trainer.save_model(args.out)
    end = time.perf_counter()
    print(json.dumps({"imports_s": t_imports - T_START, "load_s": t_load - t_imports,
                      "setup_s": t_setup - t_load, "loop_s": t_loop - t_setup, "save_s": end - t_loop,
                      "in_process_s": end - t_imports, "pairs": len(rows),
                      "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))


if __name__ == "__main__":
    main()
