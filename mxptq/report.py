"""One JSON report schema for every command (DESIGN.md "Reports").

A report is a plain dict built up by the pipeline while it runs and written atomically at the
end. Top-level keys (schema_version 1):

- ``schema_version``, ``mxptq_version``, ``git_commit``, ``command``, ``created_at`` (UTC)
- ``recipe_name``, ``recipe`` (as parsed), ``recipe_sha256``
- ``model``: id, source, dtype, num_params, fingerprint
- ``data``: source, calibration split, evaluation split
- ``seeds``, ``device`` (type, name), ``versions`` (python, torch, transformers, lm_eval if present)
- ``formats``: the formats and scale rules in use (from the transform summary)
- ``stages``: ``{name: {"wall_s": float, "peak_mem_bytes": int | None}}`` in execution order
- stage sections: ``transform``, ``gptq``, ``rotation``, ``checkpoint``
- ``metrics``: ``{"fp": {...}, "quantized": {...}}`` each with word/byte/token perplexity and
  the evaluation protocol; ``metrics.word_perplexity`` mirrors the final model's value so
  ``mxptq report`` can compare runs of any command.
- ``non_finite`` (only when there are any): ``{"metrics.quantized.word_perplexity": "nan", ...}``,
  the NaN/inf values written as null (JSON has neither; a NaN weight gives a NaN perplexity).

Peak memory is the accelerator's (torch.cuda.max_memory_allocated) when a CUDA device is used,
else the process's peak resident set size (ru_maxrss), marked by ``peak_mem_kind``.

Reading reports back (``mxptq report``, ``scripts/plot_progression.py``): `get_path`,
`as_number` and `format_number` read keys defensively, so an older or partial report shows "-".
torch is imported only where a report is built, so reading one (and the CLI's start-up) stays light.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mxptq import __version__

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1


def get_path(data: Any, *keys: str) -> Any:
    """`data[keys[0]][keys[1]]...`, or None where a key is missing or a level is not a dict."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def as_number(value: Any) -> float | None:
    """A report value as a float: an int or float (NaN and inf kept), or the "value" of a
    ``{"value": ..., "stderr": ...}`` style metric; None for anything else (None, bool, str...)."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def format_number(value: Any, digits: int) -> str:
    """A report value for a table cell: `digits` decimals for a number (see `as_number`), "-" for
    None, ``str(value)`` for NaN, inf and non-numbers."""
    number = as_number(value)
    if number is None:
        return "-" if value is None else str(value)
    if math.isnan(number) or math.isinf(number):
        return str(number)
    return f"{number:.{digits}f}"


def _git_commit() -> str | None:
    """Commit of the mxptq source tree, if it is a git checkout (None for an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _library_versions() -> dict[str, str | None]:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions["lm_eval"] = version("lm_eval")
    except PackageNotFoundError:  # lm-eval is optional at run time (the GPU box lacks it)
        versions["lm_eval"] = None
    return versions


def device_description(device: torch.device | str) -> dict[str, Any]:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type, "name": platform.processor() or platform.machine()}


def _finite_or_null(value: Any, where: str, non_finite: dict[str, str]) -> Any:
    """`value` with every NaN/inf float replaced by None, each recorded in `non_finite` by key path."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite[where] = str(value)
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{where}.{k}" if where else str(k), non_finite) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v, f"{where}[{i}]", non_finite) for i, v in enumerate(value)]
    return value


_STAGE_NOTE = "mxptq stage: "  # a note (PEP 678) that `Report.stage` adds to a KeyboardInterrupt


def interrupted_stage(exc: BaseException) -> str | None:
    """The stage a KeyboardInterrupt stopped (noted by `Report.stage`), or None outside any stage."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith(_STAGE_NOTE):
            return note.removeprefix(_STAGE_NOTE)
    return None


class Report:
    """Collects what a run did; `write` saves it as JSON atomically."""

    def __init__(self, command: str, *, device: torch.device | str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "mxptq_version": __version__,
            "git_commit": _git_commit(),
            "command": command,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": device_description(self.device),
            "versions": _library_versions(),
            "stages": {},
            "metrics": {},
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def setdefault(self, key: str, default: Any) -> Any:
        return self.data.setdefault(key, default)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage and record its peak memory; yields the stage's record for extra fields."""
        import torch

        record: dict[str, Any] = {}
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield record
        except KeyboardInterrupt as exc:
            # Ctrl-C: the CLI's "interrupted" line names the innermost stage that was running (issue 29).
            if interrupted_stage(exc) is None:
                exc.add_note(f"{_STAGE_NOTE}{name}")
            raise
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                record["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
                record["peak_mem_kind"] = "cuda_max_allocated"
            else:
                # ru_maxrss is in KiB on Linux; it is the process peak so far, not per stage.
                record["peak_mem_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
                record["peak_mem_kind"] = "process_max_rss"
            record["wall_s"] = round(time.perf_counter() - start, 4)
            self.data["stages"][name] = record

    def write(self, path: str | Path) -> Path:
        from mxptq.io import atomic_write_json

        path = Path(path)
        total = sum(s.get("wall_s", 0.0) for s in self.data["stages"].values())
        self.data["total_wall_s"] = round(total, 4)
        # A NaN weight made report.json fail to write (issue 30): the run's record must survive it.
        non_finite: dict[str, str] = {}
        data = _finite_or_null(self.data, "", non_finite)
        if non_finite:
            data["non_finite"] = non_finite
        atomic_write_json(path, data)
        return path
