"""The experiment trackers `--report-to` takes (accelerate's names), in one place that is light to import: the
options of `sera train` and `sera run`, the run config's checks and the train stage all read it."""

TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")
