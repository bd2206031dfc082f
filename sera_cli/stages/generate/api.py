"""The entry of `sera generate`: where the work runs (this process, a launcher's ranks or a Ray cluster's
actors); the generation itself is in `generation`."""

from __future__ import annotations

from sera_cli.parallel.launcher import ranked, world
from sera_cli.stages.generate.config import GenerateConfig
from sera_cli.stages.generate.generation import GenerateSummary, run_here
from sera_cli.stages.merge import finished_part, merge_parts


def generate(config: GenerateConfig) -> GenerateSummary:
    """Read prompts, sample `n` distinct responses for each, write the candidates (scored with `--score`). With
    `ray_address`, the chunks are generated on the Ray cluster's actors (`on_ray`); under a launcher of N
    processes, each generates for its shard and the first merges them (`sera_cli.parallel.launcher`)."""
    config.check()
    if config.ray_address:  # on a Ray cluster's actors
        from sera_cli.stages.generate.on_ray import ray_generate

        return ray_generate(config)
    if (w := world()).size > 1:
        return ranked(run_here, config, "generate", w, gpus_per_rank=config.tensor_parallel_size,
                      finished=finished_part, merge=merge_parts)
    return run_here(config)
