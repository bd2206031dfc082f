"""Generation engines: the transformers engine (prefix sharing, packed linears) and its baseline, vLLM, and the pure sampling rules they share."""

ENGINES = ("auto", "hf", "vllm")  # --engine: auto picks vllm on CUDA where it is installed, else hf
