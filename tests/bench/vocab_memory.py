"""Peak memory against vocabulary size: response-token log-probs of 8 pairs with 1,500-token responses on a
random Llama-shaped model (hidden 64, 2 layers) with a 32k and a 256k vocabulary.

Each measurement runs in its own subprocess, so each peak RSS (ru_maxrss) is that computation's alone:
- sera score: `sera_cli.backends.logps.batched.sequences_logps` (the prompt run once per pair, the vocabulary
  projection in position x vocabulary blocks, `trainers.vocab_chunks`);
- TRL-style: full logits of one sequence at a time, log_softmax, gather (what a full-logits trainer holds);
- one training step: sera's `trainers.forward.PairLogps` forward+backward of one pair, against the same
  full-logits computation under autograd.

Printed beside each peak: the model and data alone, the parameters' gradients (a training step's, one per
weight: the [vocabulary, hidden] embedding and head make them grow with the vocabulary whatever computes the
log-probs), and what is left, the log-prob computation's own memory. sera's score and training step run twice:
as shipped (logits under `trainers.vocab_chunks.FULL_LOGITS` entries are made whole) and in blocks at every
size.

Run: python tests/bench/vocab_memory.py [--pairs 8 --response-tokens 1500 --prompt-tokens 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def data(vocab: int, pairs: int, prompt: int, response: int):
    import torch

    g = torch.Generator().manual_seed(1)
    return [(torch.randint(3, vocab, (prompt,), generator=g).tolist(),
             [torch.randint(3, vocab, (response,), generator=g).tolist() for _ in range(2)]) for _ in range(pairs)]


def full_logps(m, ids: list[int], plen: int):
    import torch

    x = torch.tensor([ids])
    logits = m(input_ids=x).logits[0, plen - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, x[0, plen:].unsqueeze(-1)).sum()


def child(what: str, vocab: int, pairs: int, prompt: int, response: int, blocked: bool = False) -> None:
    import torch

    torch.set_num_threads(2)
    if blocked:  # the position x vocabulary blocks at every size (by default small logits are made whole)
        import trainers.vocab_chunks

        trainers.vocab_chunks.FULL_LOGITS = 0
    m = model(vocab)
    rows = data(vocab, pairs, prompt, response)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if what == "sera-score":
        from sera_cli.backends.logps.batched import sequences_logps

        m.eval()
        sequences_logps(m, [(p + r, len(p)) for p, rs in rows for r in rs], 0, batch_tokens=4096)
    elif what == "trl-score":
        m.eval()
        with torch.no_grad():
            for p, rs in rows:
                for r in rs:
                    full_logps(m, p + r, len(p))
    elif what == "sera-train":
        from trainers.encode import Encoded
        from trainers.forward import PairLogps

        m.train()
        p, rs = rows[0]
        lp, _ = PairLogps(m, 0)([Encoded(p, (rs[0], rs[1]), False)])
        lp.sum().backward()
    elif what == "trl-train":
        m.train()
        p, rs = rows[0]
        sum(full_logps(m, p + r, len(p)) for r in rs).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the parameters' gradients (full fine-tuning holds one per weight, [vocabulary, hidden] for the embedding
    # and the head whatever computes the log-probs): what is left of the peak is the log-prob computation's own
    grads = sum(p.grad.numel() * p.grad.element_size() for p in m.parameters() if p.grad is not None)
    print(json.dumps({"what": what, "vocab": vocab, "peak_mb": peak / 1024, "model_and_data_mb": base / 1024,
                      "grads_mb": grads / 2**20, "own_mb": (peak - base) / 1024 - grads / 2**20,
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--response-tokens", type=int, default=1500)
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--blocked", action="store_true", help="(child) blocks at every vocabulary size")
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.pairs, a.prompt_tokens, a.response_tokens, a.blocked)
        return
    results = {}
    runs = [(w, False) for w in ("sera-score", "trl-score", "sera-train", "trl-train")]
    runs += [("sera-score", True), ("sera-train", True)]
    for what, blocked in runs:
        name = what + (" (blocks)" if blocked else "")
        for vocab in (32768, 262144):
            out = subprocess.run([sys.executable, __file__, "--child", what, str(vocab), "--pairs", str(a.pairs),
                                  "--prompt-tokens", str(a.prompt_tokens), "--response-tokens",
                                  str(a.response_tokens), *(["--blocked"] if blocked else [])],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name, vocab] = r
            print(f"{name:20s} vocab {vocab:>7,}: peak RSS {r['peak_mb']:8,.0f} MB (model+data "
                  f"{r['model_and_data_mb']:6,.0f} MB, parameter gradients {r['grads_mb']:5,.0f} MB, the "
                  f"computation's own {r['own_mb']:7,.0f} MB), {r['seconds']:6.1f} s", flush=True)
    print()
    for name in dict.fromkeys(n for n, _ in results):
        small, large = results[name, 32768], results[name, 262144]
        print(f"{name:20s}: from 32k to 256k the peak grows {100 * (large['peak_mb'] / small['peak_mb'] - 1):6.1f}%,"
              f" the model and data {100 * (large['model_and_data_mb'] / small['model_and_data_mb'] - 1):5.1f}%, "
              f"the computation's own memory {100 * (large['own_mb'] / small['own_mb'] - 1):6.1f}%")


if __name__ == "__main__":
    main()
