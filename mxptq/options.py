"""Run options that are not recipe values: how a command runs, not what it computes.

Recipe-valued flags (--model, --device, --dtype, --out, --data-dir, --limit, --max-length,
--batch-size, --backend) are applied to the Recipe by `Recipe.with_overrides` before the pipeline
sees it, so the report's recipe and hash describe what actually ran. What remains goes here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    """Options of one CLI command, passed to `mxptq.pipeline.run_*(recipe, opts)`.

    quiet: print only the result (the report path) on stdout; no progress on stderr.
    progress: rich progress bars allowed (False after --no-progress; the TTY/env policy in
        mxptq.progress still applies on top).
    force: recompute instead of refusing (or resuming from) an on-disk GPTQ checkpoint or rotation
        cache made under another recipe/model/calibration set (--force).
    checkpoint: eval-ppl only: a packed MX checkpoint directory to evaluate instead of
        quantizing from the recipe (its stored recipe is used, with `overrides` applied).
    overrides: the recipe-valued flags given on the command line ({"limit": 40, ...}, the
        keyword arguments of Recipe.with_overrides); already applied to the recipe passed to the
        pipeline, kept here for a recipe loaded later (a checkpoint's stored recipe).
    eval_fp: quantize only: also evaluate the unquantized model first (--no-fp-eval turns it off).
    evaluate: quantize only: evaluate at all (--no-eval turns every evaluation off).
    command: the CLI command that built these options ("quantize", "gptq", ...), for reports.
    argv: the command line, for reports.
    """

    quiet: bool = False
    progress: bool = True
    force: bool = False
    eval_fp: bool = True
    evaluate: bool = True
    checkpoint: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    argv: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class RunResult:
    """What a pipeline function returns to the CLI (suggested contract for mxptq.pipeline).

    report_path: the JSON report written. out_dir: the run's output directory.
    metrics: a flat {name: value} summary printed by the CLI (e.g. word_perplexity).
    """

    report_path: Path | None = None
    out_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
