"""Long-running jobs: progress on stderr, checkpoints on a timer and on SIGINT/SIGTERM, torchrun ranks.

A job loop looks like::

    with Checkpointer(every=60) as ckpt, progress_bar(total, "couple", completed=done) as bar:
        while work_left:
            do_one_step()                      # a safe point follows each step
            bar.advance(step_size)
            if ckpt.due():
                save_checkpoint()
                ckpt.saved()                   # raises JobInterrupted after a signal: the CLI exits 130 / 143

The signal handler only sets a flag; the job saves at its next safe point and stops with a clear message and a
non-zero exit status, and the same command run again resumes. A second Ctrl-C while saving stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .console import err
from .errors import JobInterrupted


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"? {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:,.1f} s/{self.unit}", style="progress.data.speed")


class ProgressBar:
    """One task of a rich Progress: :meth:`advance` by n items; :meth:`log` prints above the bar."""

    def __init__(self, progress: Progress, task_id: Any):
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, **kw: Any) -> None:
        self._progress.update(self._task, **kw)

    def log(self, message: str) -> None:
        self._progress.console.print(message, highlight=False)


@contextmanager
def progress_bar(total: float | None, description: str, completed: float = 0, unit: str = "it",
                 disable: bool = False) -> Iterator[ProgressBar]:
    """A progress bar on stderr with count, rate, elapsed and remaining time. stdout is never redirected, so
    ``accelkit a | accelkit b`` keeps stdout for data. ``ACCELKIT_NO_PROGRESS=1`` hides it."""
    disable = disable or os.environ.get("ACCELKIT_NO_PROGRESS") == "1"
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, redirect_stdout=False, redirect_stderr=False, disable=disable, transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, completed=completed)
        yield ProgressBar(progress, task)


class Checkpointer:
    """Says when a job should save: every ``every`` seconds and as soon as SIGINT or SIGTERM arrived.

    Use as a context manager (installs the signal handlers in the main thread and restores them on exit).
    ``every=0`` saves after every step. After a signal, :meth:`saved` raises :class:`JobInterrupted`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, every: float = 60.0, what: str = "job"):
        self.every = float(every)
        self.what = what
        self.signum: int | None = None
        self._last = time.monotonic()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Checkpointer:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        self._last = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        err.print(f"{signal.Signals(signum).name}: saving a checkpoint, then stopping "
                  f"(send it again to stop at once)", highlight=False)

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    def due(self) -> bool:
        """True when a checkpoint should be saved now (timer elapsed or a signal arrived)."""
        return self.interrupted or time.monotonic() - self._last >= self.every

    def saved(self, resume_hint: str = "run the same command again to resume") -> None:
        """Call after a checkpoint was saved: restarts the timer; raises :class:`JobInterrupted` after a signal."""
        self._last = time.monotonic()
        self.stop_if_interrupted(resume_hint)

    def stop_if_interrupted(self, resume_hint: str = "run the same command again to resume") -> None:
        if self.signum is not None:
            raise JobInterrupted(f"{self.what} stopped by {signal.Signals(self.signum).name} after saving a "
                                 f"checkpoint; {resume_hint}", self.signum)


# ------------------------------------------------------------------------------------------------------- torchrun

def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (0, 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun with more than one process; returns (rank, world).

    Backend: NCCL for CUDA devices, gloo for CPU.
    """
    rank, world = dist_env()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return rank, world


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["progress_bar", "ProgressBar", "Checkpointer", "JobInterrupted", "dist_env", "init_distributed",
           "broadcast_object", "gather_objects", "barrier"]
