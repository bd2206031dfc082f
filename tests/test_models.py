"""Model resolution: HF folders, PEFT adapters, GGUF files, the embedded default, and clear errors."""

from __future__ import annotations

import pytest
import torch

from sera_cli.backends.models import default_gguf, load_model, load_tokenizer, resolve
from sera_cli.data.errors import ModelError
from trainers.logps import collate, sequence_logps


def test_peft_adapter_folder_scores_like_its_merged_model(tmp_path, tiny_policy):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    ref = resolve(str(adapter))
    assert ref.kind == "peft" and ref.adapter == str(adapter) and ref.path == tiny_policy
    assert ref.fingerprint != resolve(tiny_policy).fingerprint
    batch = collate([([1, 2, 3, 4, 5, 6], 2)], 2)
    with torch.no_grad():
        ours, _ = sequence_logps(load_model(ref, "float32", "cpu"), **batch)
        merged, _ = sequence_logps(peft_model.merge_and_unload().eval(), **batch)
        plain, _ = sequence_logps(load_model(resolve(tiny_policy), "float32", "cpu"), **batch)
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=0)
    assert abs(ours.item() - plain.item()) > 1e-3  # the adapter changed something


def test_gguf_file_resolves_to_the_cached_conversion(smol):
    ref = resolve(str(default_gguf()))
    assert ref.kind == "gguf" and ref.path == smol.path and ref.fingerprint == smol.fingerprint
    tok = load_tokenizer(ref)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model folder or file"):
        resolve(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="a model file must be .gguf"):
        resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve(str(tmp_path))
