"""The driver behind the CLI commands: load -> stages -> save -> eval -> report.

Data flows one way (DESIGN.md "The pipeline"):

    recipe ─► load model ─► [eval fp] ─► rotate ─► gptq ─► transform (RTN) ─► rotsearch ─► save ─► eval ─► report

Each stage is a plain function ``stage(model, recipe, ctx) -> model`` (mxptq/stages/); this module
owns loading, the data source, the output directory and the report, so no stage does. The CLI
(mxptq/cli.py) parses flags into the recipe and `RunOptions`, then calls one `run_*` function.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Any

import torch

from mxptq.context import RunContext
from mxptq.errors import OutputError, RecipeError
from mxptq.options import RunOptions, RunResult
from mxptq.recipe import Recipe
from mxptq.report import Report


def _open(recipe: Recipe, opts: RunOptions, command: str) -> tuple[Any, RunContext]:
    """Load the model and build the run context (tokenizer, data source, report)."""
    from mxptq.data import WikiText
    from mxptq.models import load_model, resolve_dtype

    recipe.require_model_name()
    device = _requested_device(recipe.model.device)
    # Resolve dtype "auto" against the device the model will run on, before GPTQ's CPU load
    # below could turn it into float32 (then A would be evaluated in fp16 and B/C in fp32).
    dtype = str(resolve_dtype(recipe.model.dtype, device)).removeprefix("torch.")
    model_cfg = recipe.model.model_copy(update={"name": recipe.model_name, "dtype": dtype})
    report = _new_report(command, recipe, opts, device)
    with report.stage("load"):
        # Stages that calibrate layer by layer move one layer at a time to the accelerator, so
        # the model is loaded on the CPU when GPTQ runs (models larger than GPU memory work).
        load_cfg = model_cfg.model_copy(update={"device": "cpu"}) if _needs_gptq(recipe) else model_cfg
        model, tokenizer, info = load_model(load_cfg)
    data = WikiText(recipe.data.dir)
    report["model"] = info.to_dict()
    report["data"] = {
        "dataset": "wikitext-2-raw-v1",
        "source": data.source,
        "calib_split": recipe.data.calib_split,
        "eval_split": recipe.data.eval_split,
    }
    report["seeds"] = {
        "gptq": recipe.gptq.seed if recipe.gptq else None,
        "rotation_search": recipe.rotation_search.seed if recipe.rotation_search else None,
    }
    ctx = RunContext(
        tokenizer=tokenizer, data=data, device=report.device, report=report,
        model_info=info, force=opts.force, progress=opts.progress and not opts.quiet,
    )
    return model, ctx


def _new_report(command: str, recipe: Recipe, opts: RunOptions, device: torch.device) -> Report:
    report = Report(command, device=device)
    report["argv"] = list(opts.argv)
    report["recipe_name"] = recipe.name
    report["recipe"] = recipe.to_dict()
    report["recipe_sha256"] = recipe.sha256
    return report


def _requested_device(device: str) -> torch.device:
    from mxptq.models import resolve_device

    return resolve_device(device)


def _needs_gptq(recipe: Recipe) -> bool:
    return recipe.gptq is not None and any(
        getattr(s.config, "gptq", False) for s in recipe.selectors if s.kind == "linear"
    )


def _report_path(recipe: Recipe, opts: RunOptions) -> Path:
    """<out>/report.json, its directory checked before any model work (see `_checked_dir`)."""
    where = "--out:" if "out" in opts.overrides else f"{recipe.source_path or '<recipe>'}: [output.dir]"
    return _checked_dir(recipe.output_dir, where) / "report.json"


def _checked_dir(directory: Path, where: str, hint: str = "") -> Path:
    # Issue 29: an --out that is a file or not writable used to fail at save time, minutes into
    # the run, with a traceback.
    from mxptq.io import writable_dir_problem

    problem = writable_dir_problem(directory)
    if problem is not None:
        raise OutputError(f"{where} cannot write to {directory} ({problem}); allowed: a directory that "
                          f"exists or can be created, with write permission{hint}")
    return directory


def _evaluate(model: Any, recipe: Recipe, ctx: RunContext, name: str) -> dict[str, Any]:
    from mxptq.evaluate import evaluate_wikitext

    with ctx.report.stage(f"eval_{name}"):
        metrics = evaluate_wikitext(
            model, ctx.tokenizer, ctx.data, split=recipe.data.eval_split,
            max_length=recipe.eval.max_length, batch_size=recipe.eval.batch_size,
            limit=recipe.eval.limit, backend=recipe.eval.backend, cuda_graphs=recipe.eval.cuda_graphs,
        )
    ctx.report["metrics"][name] = metrics
    return metrics


def _quantize_in_memory(model: Any, recipe: Recipe, ctx: RunContext) -> Any:
    """rotate -> gptq -> transform -> rotsearch -> refit, each timed in the report (the transform
    stage records its own time with its summary)."""
    from mxptq.stages.transform import quantize_model

    if recipe.rotation is not None:
        from mxptq.stages.rotate import run_rotation

        with ctx.report.stage("rotate"):
            model = run_rotation(model, recipe, ctx)
    reference_layers = None
    if _needs_gptq(recipe):
        from mxptq.stages.gptq import decoder_layers, run_gptq

        if recipe.gptq.refit != "none":
            # The refit starts again from the unquantized weights: keep a copy of the layers (host
            # memory) before GPTQ writes into them.
            reference_layers = copy.deepcopy(decoder_layers(model)[1])
        with ctx.report.stage("gptq"):
            model = run_gptq(model, recipe, ctx)
        model.to(ctx.device)
    model = quantize_model(model, recipe, ctx)
    if recipe.rotation_search is not None:
        from mxptq.stages.rotsearch import run_rotation_search

        with ctx.report.stage("rotsearch"):
            model = run_rotation_search(model, recipe, ctx)
    if reference_layers is not None:
        from mxptq.stages.refit import run_refit

        with ctx.report.stage("refit"):
            model = run_refit(model, reference_layers, recipe, ctx)
        del reference_layers
    return model


def _finish(ctx: RunContext, report_path: Path, metrics: dict[str, Any] | None) -> RunResult:
    final = metrics or {}
    if final:
        ctx.report["metrics"]["word_perplexity"] = final.get("word_perplexity")
        ctx.report["metrics"]["token_perplexity"] = final.get("token_perplexity")
    path = ctx.report.write(report_path)
    summary = {k: final[k] for k in ("word_perplexity", "token_perplexity") if k in final}
    return RunResult(report_path=path, out_dir=report_path.parent, metrics=summary)


def run_quantize(recipe: Recipe, opts: RunOptions) -> RunResult:
    """`mxptq quantize`: the whole pipeline; writes <out>/report.json and <out>/checkpoint/."""
    report_path = _report_path(recipe, opts)
    model, ctx = _open(recipe, opts, "quantize")
    out_dir = report_path.parent
    if opts.eval_fp and opts.evaluate:
        model.to(ctx.device)
        _evaluate(model, recipe, ctx, "fp")
    model = _quantize_in_memory(model, recipe, ctx)
    if recipe.output.checkpoint:
        from mxptq.checkpoint import save_quantized

        with ctx.report.stage("save"):
            summary = save_quantized(
                model, recipe, out_dir / "checkpoint", tokenizer=ctx.tokenizer,
                model_info=ctx.model_info, report=ctx.report.data,
                rotation_decisions=ctx.report.data.get("rotation"),
            )
        ctx.report["checkpoint"] = summary.to_dict()
    metrics = _evaluate(model, recipe, ctx, "quantized") if opts.evaluate else None
    return _finish(ctx, report_path, metrics)


def run_gptq(recipe: Recipe, opts: RunOptions) -> RunResult:
    """`mxptq gptq`: only the GPTQ stage (fills [gptq].checkpoint_dir); no evaluation."""
    if not _needs_gptq(recipe):
        raise RecipeError(
            f"{recipe.source_path}: [gptq] `mxptq gptq` needs a [gptq] table and at least one linear "
            "selector with gptq = true"
        )
    from mxptq.stages.gptq import run_gptq as gptq_stage

    report_path = _report_path(recipe, opts)
    model, ctx = _open(recipe, opts, "gptq")
    with ctx.report.stage("gptq"):
        gptq_stage(model, recipe, ctx)
    return _finish(ctx, report_path, None)


def run_rotsearch(recipe: Recipe, opts: RunOptions) -> RunResult:
    """`mxptq rotsearch`: gptq (resumed from its checkpoint) + transform + the search; no eval."""
    if recipe.rotation_search is None:
        raise RecipeError(f"{recipe.source_path}: [rotation_search] `mxptq rotsearch` needs a "
                          "[rotation_search] table")
    report_path = _report_path(recipe, opts)
    model, ctx = _open(recipe, opts, "rotsearch")
    _quantize_in_memory(model, recipe, ctx)
    return _finish(ctx, report_path, None)


def run_eval_ppl(recipe: Recipe | None, opts: RunOptions) -> RunResult:
    """`mxptq eval-ppl`: perplexity of a packed checkpoint (--checkpoint), of the recipe's
    quantized model (quantized in memory), or of the unquantized model (a recipe with no
    selectors, i.e. --model alone)."""
    if opts.checkpoint is not None:
        return _eval_checkpoint(opts)
    assert recipe is not None
    report_path = _report_path(recipe, opts)
    model, ctx = _open(recipe, opts, "eval-ppl")
    if recipe.selectors:
        model = _quantize_in_memory(model, recipe, ctx)
        name = "quantized"
    else:
        name = "fp"
    model.to(ctx.device)
    metrics = _evaluate(model, recipe, ctx, name)
    return _finish(ctx, report_path, metrics)


def _checkpoint_report_path(checkpoint: Path) -> Path:
    """Where `eval-ppl --checkpoint DIR` writes its report without --out: DIR_eval_report.json
    beside DIR (RUN/checkpoint -> RUN/checkpoint_eval_report.json).

    IMPORTANT: not the stored recipe's [output].dir: that is the quantize run's directory, and its
    report.json (the run's result) was overwritten silently (issue 29).
    """
    if checkpoint.name in ("", ".."):  # "." or "RUN/checkpoint/..": name it by the real directory
        checkpoint = checkpoint.resolve()
    return checkpoint.parent / f"{checkpoint.name}_eval_report.json"


def _eval_checkpoint(opts: RunOptions) -> RunResult:
    from mxptq.checkpoint import load_quantized, read_recipe
    from mxptq.data import WikiText

    if "out" in opts.overrides:
        report_path = _checked_dir(Path(opts.overrides["out"]), "--out:") / "report.json"
    else:
        report_path = _checkpoint_report_path(opts.checkpoint)
        _checked_dir(report_path.parent, "--checkpoint:",
                     f"; or pass --out DIR (without it the report goes beside the checkpoint, as {report_path.name})")
    # Flags given on the command line (data dir, limit, device...) win over the stored recipe.
    recipe = read_recipe(opts.checkpoint).with_overrides(**opts.overrides)
    report = _new_report("eval-ppl", recipe, opts, _requested_device(recipe.model.device))
    with report.stage("load"):
        model, tokenizer, meta = load_quantized(opts.checkpoint, device=report.device)
    report["checkpoint"] = {"dir": str(opts.checkpoint), **meta.to_dict()}
    data = WikiText(recipe.data.dir)
    ctx = RunContext(tokenizer=tokenizer, data=data, device=report.device, report=report,
                     progress=opts.progress and not opts.quiet)
    metrics = _evaluate(model, recipe, ctx, "quantized")
    return _finish(ctx, report_path, metrics)


def release(model: Any) -> None:
    """Free a model's memory between runs in one process (benchmarks, tests)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

