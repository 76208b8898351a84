"""The run context handed to every stage: `stage(model, recipe, ctx) -> model`.

It carries what a stage needs besides the model and the recipe — the tokenizer, the data
source, the device to compute on, the report being built — so that no stage reads globals.
The pipeline (mxptq/pipeline.py) creates one per command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mxptq.report import Report


@dataclass
class RunContext:
    """State shared by the stages of one run.

    tokenizer: the model's tokenizer (calibration windows, evaluation).
    data: a `mxptq.data.WikiText` source (local directory or Hugging Face datasets).
    device: where stages compute. The model itself may stay on the CPU (GPTQ moves one layer
        at a time to this device).
    report: the JSON report being built; stages add their section and time themselves with
        ``report.stage(name)``.
    model_info: identity of the loaded model (`mxptq.models.ModelInfo`): id, dtype, fingerprint.
    force: recompute instead of refusing a stale on-disk cache/checkpoint.
    progress: whether stages may show progress bars (the CLI's --quiet/--no-progress and TTY policy).
    """

    tokenizer: Any = None
    data: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Report = field(default_factory=lambda: Report("library"))
    model_info: Any = None
    force: bool = False
    progress: bool = True
