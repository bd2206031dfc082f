"""`sera run`: the SeRA loop (Algorithm 1) and its baselines as a schedule of resumable stages (see `api`)."""
