"""The entry of `sera score`: where the work runs (this process, a launcher's ranks or a Ray cluster's actors);
the scoring itself is in `scoring`."""

from __future__ import annotations

from sera_cli.parallel.launcher import ranked, world
from sera_cli.stages.merge import finished_part, merge_parts
from sera_cli.stages.score.config import ScoreConfig
from sera_cli.stages.score.scoring import ScoreSummary, run_here


def score(config: ScoreConfig) -> ScoreSummary:
    """Read the inputs, score them, write the output atomically. With `ray_address`, the chunks are scored on the
    Ray cluster's actors (`on_ray`); under a launcher of N processes, each scores its shard and the first merges
    them (`sera_cli.parallel.launcher`); else in this process."""
    config.check()
    if config.ray_address:  # on a Ray cluster's actors
        from sera_cli.stages.score.on_ray import ray_score

        return ray_score(config)
    if (w := world()).size > 1:
        return ranked(run_here, config, "score", w, finished=finished_part, merge=merge_parts)
    return run_here(config)
