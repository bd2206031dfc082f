"""Tiny random models (hidden 64, 2 layers) of six model families, each with its family's real tokenizer and
chat template, built from the tokenizer files in ../shared/data/tokenizers (see its PROVENANCE.md).

- Llama 3: Meta's tiktoken ranks as a byte-level BPE, the 256 special tokens after them (128,256 entries).
- Qwen2: the tokenizer folder as shipped (ChatML template, `<|im_end|>`, no BOS).
- Mistral: the Llama-2 SentencePiece vocabulary (Mistral-7B v0.1's), `[INST]` template that refuses a system
  turn and non-alternating roles, as Mistral's does.
- Phi-3: its vocabulary (`<|end|>`, `<|user|>`, `<|assistant|>`) with Phi-3's template.
- Gemma 2 / Gemma 3: Gemma-LIKE vocabularies, not Gemma's own (none could be had): Gemma's special-token layout
  (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<start_of_turn>`/`<end_of_turn>` at 106/107, resp. 105/106),
  the SentencePiece pieces of the Llama-2 vocabulary after them, unused tokens up to 256,000 (262,144), and
  gemma-2b-it's real chat template (which refuses a system turn). Gemma 2 soft-caps its logits.

Templates written here are short equivalents of each family's published template for the roles tests use.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers"
FAMILIES = ("llama3", "qwen2", "mistral", "gemma2", "gemma3", "phi3")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + "
    "'<|end|>\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# (end-of-turn token, text that marks the template and must never appear in a response)
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>", "gemma2": "<end_of_turn>",
               "gemma3": "<end_of_turn>", "phi3": "<|end|>"}
TEMPLATE_TEXT = {"llama3": "<|start_header_id|>", "qwen2": "<|im_start|>", "mistral": "[INST]",
                 "gemma2": "<start_of_turn>", "gemma3": "<start_of_turn>", "phi3": "<|assistant|>"}


def _fast(tokenizer_object, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, **special)


def _gguf(name: str, file: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / name, gguf_file=file)


def llama3_tokenizer():
    from transformers.convert_slow_tokenizer import TikTokenConverter

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    special += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(special) + 2)]
    class Ranks(TikTokenConverter):
        def load_tiktoken_bpe(self, path):  # base64 token, rank per line (no tiktoken package needed)
            lines = Path(path).read_text().splitlines()
            return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}

    backend = Ranks(str(TOKENIZERS / "llama3" / "tokenizer.model"), pattern=LLAMA3_PATTERN,
                    extra_special_tokens=special).converted()
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)])
    tok = _fast(backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def qwen2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS / "qwen2")


def mistral_tokenizer():
    tok = _gguf("llama-spm", "ggml-vocab-llama-spm.gguf")
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


def phi3_tokenizer():
    tok = _gguf("phi3", "ggml-vocab-phi-3.gguf")
    tok.chat_template = PHI3_TEMPLATE
    if tok.eos_token != "<|end|>":  # Phi-3 instruct ends a turn, and generation, with <|end|>
        tok.eos_token = "<|end|>"
    return tok


def gemma_tokenizer(version: int):
    """A Gemma-like tokenizer: Gemma's special-token ids, Llama-2 SentencePiece pieces, Gemma 2's template."""
    from tokenizers import Tokenizer

    base = _gguf("llama-spm", "ggml-vocab-llama-spm.gguf")
    spec = json.loads(base.backend_tokenizer.to_str())
    turn = 106 if version == 2 else 105
    size = 256000 if version == 2 else 262144
    layout = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", turn: "<start_of_turn>",
              turn + 1: "<end_of_turn>"}
    pieces = [p for p, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
              if p not in ("<unk>", "<s>", "</s>")]
    vocab: dict[str, int] = {}
    free = (i for i in range(size) if i not in layout)
    for piece in pieces:
        vocab[piece] = next(free)
    for i in free:
        vocab[f"<unused{i}>"] = i
    for i, t in layout.items():
        vocab[t] = i
    spec["model"]["vocab"] = vocab
    spec["model"]["unk_token"] = "<unk>"
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in sorted(layout.items())]
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<bos>",
                              "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}
    tok = _fast(Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    config = json.loads((TOKENIZERS / "gemma2-template" / "tokenizer_config.json").read_text())
    tok.chat_template = config["chat_template"]
    return tok


def tokenizer(family: str):
    return {"llama3": llama3_tokenizer, "qwen2": qwen2_tokenizer, "mistral": mistral_tokenizer,
            "phi3": phi3_tokenizer, "gemma2": lambda: gemma_tokenizer(2), "gemma3": lambda: gemma_tokenizer(3)}[
        family]()


def model_config(family: str, tok):
    """A tiny config of the family: hidden 64, 2 layers, the tokenizer's vocabulary."""
    from transformers import AutoConfig

    vocab = max(len(tok), max(tok.get_vocab().values()) + 1)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2)
    if family in ("llama3", "mistral"):
        kind, extra = ("llama", dict(rope_theta=500000.0)) if family == "llama3" else ("mistral", {})
        return AutoConfig.for_model(kind, vocab_size=vocab, tie_word_embeddings=False, **common, **extra)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", vocab_size=vocab, tie_word_embeddings=False, **common)
    if family == "phi3":
        return AutoConfig.for_model("phi3", vocab_size=vocab, tie_word_embeddings=False, **common)
    if family == "gemma2":
        return AutoConfig.for_model("gemma2", vocab_size=vocab, head_dim=16, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0, sliding_window=4096, tie_word_embeddings=False,
                                    **common)
    return AutoConfig.for_model("gemma3_text", vocab_size=vocab, head_dim=16, sliding_window=4096,
                                tie_word_embeddings=False, **common)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` with its tokenizer into `folder`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer(family)
    config = model_config(family, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[family])
    favour(model, tok, eot)
    model.generation_config.eos_token_id = [eot]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def favour(model, tok, eot: int, p: float = 0.3) -> None:
    """Make the end-of-turn token likely (about `p` per step) so sampled replies end within a few tokens.

    Every input embedding gets a large constant first coordinate, so the last hidden state's first coordinate is
    large and positive whatever the text; the output row of `eot` reads it, the others ignore it."""
    import math

    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 20.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[eot] = 0.0
        ids = torch.tensor([tok("Hello there, how are you?", add_special_tokens=False)["input_ids"]])
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
        h0 = float(hidden[:, 0].min())
        assert h0 > 0, "the constant coordinate did not dominate the hidden state"
        head[eot, 0] = math.log(p / (1 - p) * head.shape[0]) / h0
