"""Running a pair's prompt once in training: forward + backward of a micro-batch of pairs, packed rows
(`trainers.packing`, the default) and a key/value cache (`--share-prompts`) against two whole sequences.

    python tests/bench/train_forward.py --pairs 16 --micro-batch 4 --repeats 5

The three variants run in this process on the same micro-batches of HH-RLHF helpful-base pairs (SmolLM2-135M,
float32, max length 256/128), alternating, the best of `--repeats` kept per micro-batch; the gradients are
compared too. Prints seconds per pair and the ratios unshared / shared and unshared / packed (> 1: it pays).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from hh import hh_pairs  # noqa: E402


def flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "?"
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    import torch

    from sera_cli.backends.models import load_model, load_tokenizer, resolve
    from trainers.encode import encode
    from trainers.forward import PairLogps

    torch.set_num_threads(args.threads)
    ref = resolve(args.model)
    tok, model = load_tokenizer(ref), load_model(ref, dtype="float32", device="cpu")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = hh_pairs(limit=args.pairs)
    enc = [encode(tok, r["prompt"], [r["chosen"], r["rejected"]], 256, 128) for r in rows]
    batches = [enc[i:i + args.micro_batch] for i in range(0, len(enc), args.micro_batch)]
    variants = {"shared": PairLogps(model, tok.pad_token_id, True),
                "unshared": PairLogps(model, tok.pad_token_id, False),
                "packed": PairLogps(model, tok.pad_token_id, False, pack_pairs=True)}
    assert variants["shared"].share, "this model cannot share prompts"
    assert variants["packed"].packs(enc), "this model cannot pack pairs"
    best = {v: [float("inf")] * len(batches) for v in variants}
    grads: dict[str, list[torch.Tensor]] = {}
    for rep in range(args.repeats):
        for b, batch in enumerate(batches):
            for name, fwd in variants.items():
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                logps, _ = fwd(batch)
                logps.sum().backward()
                best[name][b] = min(best[name][b], time.perf_counter() - t0)
                if rep == 0 and b == 0:
                    grads[name] = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    diff = {v: max((a - b).abs().max().item() for a, b in zip(grads[v], grads["unshared"], strict=True))
            for v in ("shared", "packed")}
    scale = max(g.abs().max().item() for g in grads["unshared"])
    per_pair = {v: sum(t) / len(enc) for v, t in best.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.model}, {len(enc)} HH-RLHF pairs in micro-batches of {args.micro_batch}, float32, forward + "
          f"backward, best of {args.repeats}, {args.threads} threads")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, flags {flags()}; "
          f"load average after {load}")
    for v, s in per_pair.items():
        print(f"{v:<10} {s:.3f} s/pair")
    for v in ("shared", "packed"):
        print(f"unshared / {v}: {per_pair['unshared'] / per_pair[v]:.2f}x; largest gradient difference "
              f"{diff[v]:.2e} (largest gradient {scale:.2e})")


if __name__ == "__main__":
    main()
