"""Where people-facing output goes: stderr, so stdout stays free for Parquet in pipelines."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.progress import Progress as RichProgress


class _Console(Console):
    """A progress bar or spinner (a rich `Live`) draws only on a terminal. Rich prints a bar's last frame to a
    file or pipe when it stops; here it does not, so a log or captured stderr holds the summary line, or the one
    error line, and no bar."""

    def push_render_hook(self, hook) -> None:
        if isinstance(hook, Live) and not self.is_terminal:
            hook.transient = True
        super().push_render_hook(hook)

    def print(self, *objects, **kwargs) -> None:
        """Lines of text are never wrapped in a log file or pipe (a terminal wraps them itself); tables and other
        renderables keep the console's width."""
        if "soft_wrap" not in kwargs and not self.is_terminal and all(isinstance(o, str) for o in objects):
            kwargs["soft_wrap"] = True
        super().print(*objects, **kwargs)


console = _Console(stderr=True, highlight=False)


def log_every() -> float:
    """Seconds between progress lines when stderr is not a terminal ($SERA_LOG_EVERY, default 30)."""
    try:
        return max(0.0, float(os.environ.get("SERA_LOG_EVERY", "30")))
    except ValueError:
        return 30.0


class Progress(RichProgress):
    """rich's Progress on a terminal; elsewhere (a log file, a scheduler, `nohup`) the same bar, which draws
    nothing, plus one plain line per task every `log_every()` seconds, so a long job is never silent."""

    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **kwargs)
        self._every, self._last = log_every(), {}

    def update(self, task_id, **kw) -> None:
        super().update(task_id, **kw)
        if self.console.is_terminal or self.disable:
            return
        now = time.monotonic()
        last = self._last.setdefault(task_id, now)
        if now - last < self._every:
            return
        self._last[task_id] = now
        task = self._tasks[task_id]
        done = f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else f"{task.completed:,.0f}"
        if task.fields.get("unit"):  # what the count counts (tokens, prompts, steps...): its rate is in the same unit
            done += f" {task.fields['unit']}"
        pct = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
        eta = f", about {task.time_remaining:,.0f} s left" if task.time_remaining else ""
        extra = "  ".join(f"{k} {v}" for k, v in task.fields.items() if k != "unit" and v not in ("", "-", None))
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {task.description}: {done}{pct}, "
                         f"{task.elapsed or 0:,.0f} s{eta}{'  ' + extra if extra else ''}\n")
        sys.stderr.flush()

    def advance(self, task_id, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def stop(self) -> None:
        """rich ends a bar with an empty line off a terminal; a log gets none."""
        if self.disable or self.console.is_interactive or self.console.is_jupyter:
            super().stop()
        else:
            self.live.stop()
