"""`sera run`: the SeRA loop and its baselines as a schedule of resumable stages (see `loop`)."""
