"""On-policy candidates: N distinct sampled responses per prompt, with a transformers or a vLLM engine."""
