"""Where people-facing output goes: stderr, so stdout stays free for Parquet in pipelines."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live


class _Console(Console):
    """A progress bar or spinner (a rich `Live`) draws only on a terminal. Rich prints a bar's last frame to a
    file or pipe when it stops; here it does not, so a log or captured stderr holds the summary line, or the one
    error line, and no bar."""

    def push_render_hook(self, hook) -> None:
        if isinstance(hook, Live) and not self.is_terminal:
            hook.transient = True
        super().push_render_hook(hook)


console = _Console(stderr=True, highlight=False)
