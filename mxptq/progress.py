"""Progress reporting for long loops (layers, calibration batches, evaluation windows).

Policy (`progress_mode`):
  * "bar"   - rich progress bars on stderr: only when stderr is a TTY and nothing disabled them;
  * "plain" - occasional plain log lines on stderr (start, every `interval_s`, end): when stderr
              is not a TTY (CI logs, batch jobs, pipes), or `--no-progress`, or the environment
              sets MXPTQ_NO_PROGRESS=1 or CI=true;
  * "off"   - nothing at all: `--quiet`.
Results never go through here; they go to stdout (STYLE.md rule 8).

Why a ContextVar and not a module global or a parameter: the CLI decides the policy once per
command (`with progress_policy(...)`), and deep library code (a GPTQ layer loop) needs it without
threading a flag through every signature. A ContextVar is scoped: the `with` block restores the
previous value, so two CliRunner invocations in one test process, or threads, do not leak
settings into each other, and code that never sets it gets the environment-derived default.
`RunContext` (mxptq.context) may also carry the on/off flag for stages that want to read it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, TextIO, TypeVar

T = TypeVar("T")
ProgressMode = Literal["bar", "plain", "off"]

_TRUE = {"1", "true", "yes", "on"}


def _env_disables_bars(environ: dict[str, str] | os._Environ[str]) -> bool:
    return (
        environ.get("MXPTQ_NO_PROGRESS", "").strip().lower() in _TRUE
        or environ.get("CI", "").strip().lower() in _TRUE
    )


def decide_mode(
    *,
    quiet: bool = False,
    no_progress: bool = False,
    stream: TextIO | None = None,
    environ: dict[str, str] | None = None,
) -> ProgressMode:
    """The policy as a pure function (tested directly)."""
    if quiet:
        return "off"
    stream = sys.stderr if stream is None else stream
    env = os.environ if environ is None else environ
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if no_progress or _env_disables_bars(env) or not is_tty:
        return "plain"
    return "bar"


@dataclass
class ProgressPolicy:
    mode: ProgressMode
    stream: TextIO | None = None  # None = sys.stderr at the time of writing
    interval_s: float = 30.0  # plain mode: at most one line per interval (plus start and end)
    # A live rich Progress shared by nested track() calls (layers > batches), so nested loops
    # render as stacked bars instead of fighting over the terminal.
    _live: object | None = field(default=None, repr=False)
    _depth: int = field(default=0, repr=False)

    @property
    def out(self) -> TextIO:
        return sys.stderr if self.stream is None else self.stream


_POLICY: ContextVar[ProgressPolicy | None] = ContextVar("mxptq_progress_policy", default=None)


def current_policy() -> ProgressPolicy:
    policy = _POLICY.get()
    if policy is None:
        policy = ProgressPolicy(mode=decide_mode())
    return policy


def progress_enabled() -> bool:
    """True when rich progress bars are shown (stderr is a TTY and nothing disabled them)."""
    return current_policy().mode == "bar"


@contextlib.contextmanager
def progress_policy(
    *,
    quiet: bool = False,
    no_progress: bool = False,
    stream: TextIO | None = None,
    interval_s: float = 30.0,
    mode: ProgressMode | None = None,
) -> Iterator[ProgressPolicy]:
    """Set the progress policy for the code run inside the block (the CLI does this once)."""
    chosen = mode if mode is not None else decide_mode(quiet=quiet, no_progress=no_progress, stream=stream)
    policy = ProgressPolicy(mode=chosen, stream=stream, interval_s=interval_s)
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _len_or_none(iterable: Iterable[object]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `iterable`, reporting progress on stderr according to the current policy."""
    policy = current_policy()
    if total is None:
        total = _len_or_none(iterable)
    if policy.mode == "off":
        yield from iterable
    elif policy.mode == "plain":
        yield from _track_plain(iterable, description, total, policy)
    else:
        yield from _track_bar(iterable, description, total, policy)


def _track_plain(
    iterable: Iterable[T], description: str, total: int | None, policy: ProgressPolicy
) -> Iterator[T]:
    def line(done: int, suffix: str = "") -> None:
        of_total = f"/{total}" if total is not None else ""
        policy.out.write(f"[mxptq] {description}: {done}{of_total}{suffix}\n")
        policy.out.flush()

    start = last = time.monotonic()
    done = 0
    line(0)
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= policy.interval_s:
            line(done, f" ({now - start:.0f}s)")
            last = now
    line(done, f" done in {time.monotonic() - start:.1f}s")


def _track_bar(
    iterable: Iterable[T], description: str, total: int | None, policy: ProgressPolicy
) -> Iterator[T]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    owner = policy._live is None
    if owner:
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=policy.out),
            transient=False,
        )
        progress.start()
        policy._live = progress
    progress = policy._live
    task_id = progress.add_task(description, total=total)  # type: ignore[attr-defined]
    policy._depth += 1
    try:
        for item in iterable:
            yield item
            progress.advance(task_id)  # type: ignore[attr-defined]
    finally:
        policy._depth -= 1
        if owner:
            progress.stop()  # type: ignore[attr-defined]
            policy._live = None
        else:
            # Inner loops vanish when done so the outer bar stays readable.
            progress.remove_task(task_id)  # type: ignore[attr-defined]
