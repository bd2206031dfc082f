"""The settings of one `generate` run, as a typed, frozen config (the CLI fills it; the library reads it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from sera_cli.errors import ConfigError
from trainers.encode import MAX_LENGTH, MAX_PROMPT_LENGTH

ENGINES = ("auto", "hf", "vllm")


@dataclass(frozen=True)
class GenerateConfig:
    inputs: tuple[str, ...]
    output: str
    policy: str = "smollm2-135m"
    engine: Literal["auto", "hf", "vllm"] = "auto"
    n: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    max_redraws: int = 3
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 64  # sequences per `generate` call (hf engine)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vllm: None is 0.9 on a GPU, 0.3 on CPU
    enforce_eager: bool = False  # vllm: no graph compilation (faster start, slower generation)
    chunk_prompts: int = 64  # prompts per resumable chunk; batches never cross a chunk
    resume: bool = False
    shard: tuple[int, int] | None = None
    trust_remote_code: bool = False
    progress: bool = True
    # --score: the implicit reward of every candidate, right after generation
    score: bool = False
    ref: str | None = None
    reward: Literal["dpo", "ipo", "simpo"] = "dpo"
    beta: float = 0.1
    max_length: int | None = MAX_LENGTH
    max_prompt_length: int | None = MAX_PROMPT_LENGTH
    cache: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sampling(self) -> dict[str, Any]:
        """What decides the samples of a prompt, besides the model and the engine."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "max_redraws": self.max_redraws}

    def check(self) -> None:
        """Every problem with the settings at once, as one ConfigError."""
        p = []
        if self.engine not in ENGINES:
            p.append(f"--engine {self.engine}: expected one of {', '.join(ENGINES)}")
        if self.reward not in ("dpo", "ipo", "simpo"):
            p.append(f"--reward {self.reward}: expected dpo, ipo or simpo")
        if self.n < 1:
            p.append(f"--n must be >= 1 (got {self.n})")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0 (got {self.temperature})")
        elif self.temperature == 0 and self.n > 1:
            p.append(f"--temperature 0 is greedy decoding and cannot give --n {self.n} distinct responses "
                     "(use a temperature above 0, or --n 1)")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            p.append(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.max_redraws < 0:
            p.append(f"--max-redraws must be >= 0 (got {self.max_redraws})")
        if self.batch_size < 1 or self.chunk_prompts < 1:
            p.append("--batch-size and --chunk-prompts must be >= 1")
        if self.tensor_parallel_size < 1:
            p.append(f"--tensor-parallel-size must be >= 1 (got {self.tensor_parallel_size})")
        if self.shard and not 0 <= self.shard[0] < self.shard[1]:
            p.append(f"--shard {self.shard[0]}/{self.shard[1]}: need 0 <= i < n")
        if self.resume and self.output == "-":
            p.append("--resume needs a file output (-o FILE), not stdout")
        if self.score and self.reward in ("dpo", "ipo") and not self.ref:
            p.append(f"--score with --reward {self.reward} needs --ref (the reference model is never the policy by "
                     "default)")
        if not self.score and self.ref:
            p.append("--ref is used only with --score")
        if p:
            raise ConfigError("; ".join(p))
