"""The dtype the policy's forward and backward run in: bfloat16 autocast where the hardware does bfloat16 matmuls
natively, float32 elsewhere. The weights being trained (and AdamW's state) stay float32 either way.

A CPU does bfloat16 matmuls natively when it has AVX512_BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and
later; AMD Zen 4 has AVX512_BF16); without them torch emulates bfloat16 and runs 2-5x slower than float32. So
`--dtype auto` reads the CPU's flags at run time rather than assuming. Scoring keeps its own `auto` (float32 on
CPU, `sera_cli.backends.models.resolve_dtype`): its numbers are stored and compared, and bfloat16 moves a summed log-prob
by tenths of a nat, where training only needs a gradient.
"""

from __future__ import annotations

from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: str, flags: frozenset[str] | None = None) -> bool:
    """Whether `device` ('cpu' or 'cuda') runs bfloat16 matmuls in hardware."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        return bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))
    return False


def compute_dtype(dtype: str, device: str, flags: frozenset[str] | None = None) -> str:
    """The training compute dtype for `--dtype` on `device`: auto is bfloat16 where `native_bf16`, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device, flags) else "float32"
