"""The `mxptq` command line (Typer). Thin shells: each command parses and validates the recipe,
applies the flags that override recipe keys, and calls one function of `mxptq.pipeline`.

Errors (STYLE.md rule 8, after huggingface_hub's `cli/_errors.py`): one handler,
`_MxptqGroup.invoke`, maps user errors (`MxptqError`, `typer.BadParameter`) to ONE stderr line
`error: ...` and exit code 2, Ctrl-C to the line `interrupted [during stage S]` and exit code 130;
anything else is an internal error and keeps its traceback (exit 1).
Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mxptq import __version__
from mxptq.errors import ModelError, MxptqError
from mxptq.options import RunOptions
from mxptq.progress import progress_policy
from mxptq.recipe import Recipe, default_recipe, load_recipe
from mxptq.report import as_number, format_number, get_path, interrupted_stage


class _MxptqGroup(TyperGroup):
    """The one place where errors become exit codes (applies to every subcommand, and to
    CliRunner in tests, which calls the group directly)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MxptqError as exc:
            message = str(exc)
        except typer.BadParameter as exc:  # includes a missing argument (MissingParameter)
            message = exc.format_message()
        except KeyboardInterrupt as exc:
            # Typer exits 130 without a word (issue 29). Files are written atomically, so an
            # interrupted run leaves its earlier results and no half-written file.
            stage = interrupted_stage(exc)
            typer.echo("interrupted" + (f" during stage {stage}" if stage else ""), err=True)
            raise typer.Exit(130) from None
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)


app = typer.Typer(
    cls=_MxptqGroup,
    name="mxptq",
    help="Post-training MX (microscaling) quantization of LLMs, driven by TOML recipes: "
    "round-to-nearest -> GPTQ -> online-Hadamard rotation search, with perplexity evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # Help texts name TOML tables like [gptq]; rich markup would swallow them as tags.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mxptq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """mxptq: MX post-training quantization driven by TOML recipes."""


# ---------------------------------------------------------------------------------------------
# Shared options
# ---------------------------------------------------------------------------------------------

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="The TOML recipe.", show_default=False)]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Model: HF id, local dir, .gguf file or smollm2-135m. "
                 "Overrides [model].name and [gptq].model_name."),
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps. Overrides [model].device.")]
DtypeOpt = Annotated[
    str | None, typer.Option("--dtype", help="float16, bfloat16, float32 or auto. Overrides [model].dtype.")
]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output directory. Overrides [output].dir.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Directory with wiki.{valid,test}.raw. Overrides [data].dir."),
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="Evaluate only the first N documents. Overrides [eval].limit.")
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Discard an existing GPTQ checkpoint or rotation cache and recompute "
                 "(without it, a stale GPTQ checkpoint is refused and a stale rotation cache recomputed)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the report path; no progress.")]
NoProgressOpt = Annotated[
    bool,
    typer.Option("--no-progress", help="No progress bars (plain log lines on stderr instead). "
                 "Also: MXPTQ_NO_PROGRESS=1 or CI=true."),
]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="native, lm-eval, or both (native metrics, with lm-eval's "
                             "and their relative difference also in the report). Overrides [eval].backend.")
]
MaxLengthOpt = Annotated[
    int | None, typer.Option("--max-length", help="Window length in tokens. Overrides [eval].max_length.")
]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", help="Overrides [eval].batch_size.")]


def _load(recipe_path: Path | None, **overrides: Any) -> Recipe:
    if recipe_path is None:
        return default_recipe(**_given(overrides))
    return load_recipe(recipe_path).with_overrides(**overrides)


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in overrides.items() if value is not None}


def _pipeline_function(command: str, function_name: str) -> Callable[..., Any]:
    """mxptq.pipeline.<function_name>, or a clear error naming the stage that is not built."""
    try:
        pipeline = importlib.import_module("mxptq.pipeline")
    except ModuleNotFoundError as exc:
        if exc.name != "mxptq.pipeline":
            raise  # a missing dependency *inside* the pipeline is an internal error
        raise MxptqError(
            f"`mxptq {command}` is not built yet: the recipe is valid, but mxptq.pipeline does not exist"
        ) from None
    function = getattr(pipeline, function_name, None)
    if function is None:
        raise MxptqError(
            f"`mxptq {command}` is not built yet: the recipe is valid, but mxptq.pipeline has no "
            f"{function_name}()"
        )
    return function


def _print_result(result: Any, quiet: bool) -> None:
    """Results to stdout: the report path (always), metrics (unless --quiet)."""
    report_path = result if isinstance(result, Path) else getattr(result, "report_path", None)
    metrics = getattr(result, "metrics", None) or {}
    if not quiet:
        for name, value in metrics.items():
            typer.echo(f"{name} = {format_number(value, 4)}")
    if report_path is not None:
        typer.echo(str(report_path) if quiet else f"report: {report_path}")


def _run(
    command: str,
    function_name: str,
    recipe_path: Path | None,
    *,
    quiet: bool,
    no_progress: bool,
    force: bool,
    checkpoint: Path | None = None,
    run_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> None:
    # eval-ppl --checkpoint without a RECIPE: the pipeline uses the checkpoint's stored recipe
    # (with `opts.overrides` applied), so there is no recipe to pass.
    recipe = None if (recipe_path is None and checkpoint is not None) else _load(recipe_path, **overrides)
    function = _pipeline_function(command, function_name)
    options = RunOptions(
        quiet=quiet, progress=not (quiet or no_progress), force=force, checkpoint=checkpoint,
        overrides=_given(overrides), command=command, argv=tuple(sys.argv[1:]), **(run_options or {}),
    )
    with progress_policy(quiet=quiet, no_progress=no_progress):
        result = function(recipe, options)
    _print_result(result, quiet)


# ---------------------------------------------------------------------------------------------
# Stage commands
# ---------------------------------------------------------------------------------------------


@app.command()
def quantize(
    recipe: RecipeArg,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    no_progress: NoProgressOpt = False,
    no_fp_eval: Annotated[
        bool, typer.Option("--no-fp-eval", help="Skip the unquantized baseline evaluation (the report then "
                           "holds only the quantized model's metrics).")
    ] = False,
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip every evaluation: quantize, save, report.")
    ] = False,
    backend: BackendOpt = None,
    max_length: MaxLengthOpt = None,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Run the recipe end to end: [gptq] if present, MX transform (RTN), [rotation_search] if
    present, save the checkpoint, evaluate perplexity (unquantized and quantized), write report.json."""
    _run("quantize", "run_quantize", recipe, quiet=quiet, no_progress=no_progress, force=force, model=model,
         device=device, dtype=dtype, out=out, data_dir=data_dir, limit=limit, backend=backend,
         max_length=max_length, batch_size=batch_size,
         run_options={"eval_fp": not (no_fp_eval or no_eval), "evaluate": not no_eval})


@app.command()
def gptq(
    recipe: RecipeArg,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Run only the [gptq] stage (writes per-layer checkpoints to [gptq].checkpoint_dir)."""
    _run("gptq", "run_gptq", recipe, quiet=quiet, no_progress=no_progress, force=force, model=model,
         device=device, dtype=dtype, out=out, data_dir=data_dir, limit=limit)


@app.command()
def rotsearch(
    recipe: RecipeArg,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Run the [rotation_search] stage (decisions cached at [rotation_search].cache_path)."""
    _run("rotsearch", "run_rotsearch", recipe, quiet=quiet, no_progress=no_progress, force=force, model=model,
         device=device, dtype=dtype, out=out, data_dir=data_dir, limit=limit)


@app.command("eval-ppl")
def eval_ppl(
    recipe: Annotated[
        Path | None,
        typer.Argument(metavar="[RECIPE]", help="The TOML recipe; leave out to evaluate the unquantized "
                       "--model, or a --checkpoint.", show_default=False),
    ] = None,
    model: ModelOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Evaluate a saved MX checkpoint directory. Its report goes to "
                     "DIR_eval_report.json beside DIR (RUN/checkpoint -> RUN/checkpoint_eval_report.json), "
                     "never over the quantize run's RUN/report.json; --out OUT writes OUT/report.json instead."),
    ] = None,
    backend: BackendOpt = None,
    max_length: MaxLengthOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    data_dir: DataDirOpt = None,
    limit: LimitOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """WikiText-2 word perplexity (lm-eval `wikitext` protocol) of a model, a recipe applied
    to it, or a saved checkpoint."""
    if recipe is None and model is None and checkpoint is None:
        raise typer.BadParameter("give a RECIPE, --model or --checkpoint")
    _run("eval-ppl", "run_eval_ppl", recipe, quiet=quiet, no_progress=no_progress, force=force, checkpoint=checkpoint,
         model=model, device=device, dtype=dtype, out=out, data_dir=data_dir, limit=limit,
         max_length=max_length, batch_size=batch_size, backend=backend)


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


def _format_label(fmt: Any) -> str:
    return "-" if fmt is None else str(getattr(fmt, "label", fmt))


def _selector_formats(selector: Any) -> str:
    config = selector.config
    if selector.kind == "attention":
        parts = [f"{stage}={_format_label(getattr(config, stage))}"
                 for stage in ("kv_cache", "qk_matmul", "av_matmul", "softmax", "rope")
                 if getattr(config, stage) is not None]
        return ", ".join(parts) or "all bypassed"
    if config.bypass:
        return "bypass"
    parts = [f"{tensor}={_format_label(getattr(config, tensor))}"
             for tensor in ("weight", "data_in", "bias") if getattr(config, tensor) is not None]
    if config.gptq:
        parts.append("gptq")
    return ", ".join(parts) or "not quantized"


def summarize_module_names(names: Sequence[str]) -> list[str]:
    """Compress `model.layers.0.mlp.up_proj ... model.layers.29.mlp.up_proj` into
    `model.layers.{0-29}.mlp.up_proj` (numbers of one component become ranges)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    singles: list[str] = []
    for name in names:
        parts = name.split(".")
        numeric = [i for i, part in enumerate(parts) if part.isdigit()]
        if len(numeric) != 1:
            singles.append(name)
            continue
        index = numeric[0]
        key = (*parts[:index], "{}", *parts[index + 1:])
        groups.setdefault(key, []).append(int(parts[index]))
    out = []
    for key, numbers in groups.items():
        out.append(".".join(key).replace("{}", "{" + _ranges(sorted(set(numbers))) + "}"))
    return out + singles


def _ranges(numbers: list[int]) -> str:
    spans, start = [], numbers[0]
    for previous, current in zip(numbers, numbers[1:] + [None]):
        if current is None or current != previous + 1:
            spans.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(spans)


@app.command()
def validate(
    recipe: RecipeArg,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Also load this model and show which modules each selector matches."),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Parse and validate a recipe: TOML syntax, unknown keys, types, widths and block sizes,
    format names and MXFP element pairs, scale rules, selector regexes, `gptq = true` without
    [gptq], GPTQ/selector weight formats, rotation_search matmul types. With --model, also
    match the selectors against the model's modules (a selector matching nothing is an error)."""
    from rich.console import Console
    from rich.table import Table

    parsed = _load(recipe, model=model, device=device, dtype=dtype)
    # Not a terminal (a log, a pipe, a test): wide enough that module names are never folded.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    if model is None:
        table = Table(title=f"{recipe}: {len(parsed.selectors)} selectors (by = {parsed.by})")
        for column in ("#", "selector", "kind", "formats"):
            table.add_column(column, overflow="fold")
        for index, selector in enumerate(parsed.selectors):
            table.add_row(str(index), selector.pattern, selector.kind, _selector_formats(selector))
        console.print(table)
        typer.echo(f"ok: {recipe} is valid (sha256 {parsed.sha256[:12]})")
        return

    loaded_model, match_selectors = _model_and_matcher(parsed)
    try:
        matches = match_selectors(loaded_model, parsed)
        failure = None
    except ModelError as exc:
        # match_selectors refuses a recipe with a selector that matches nothing (or a module its
        # kind cannot quantize). Show what each selector matches on its own, then fail.
        failure = exc
        matches = []
        for selector in parsed.selectors:
            alone = parsed.model_copy(update={"selectors": [selector]})
            try:
                matches.append((selector, match_selectors(loaded_model, alone)[0][1]))
            except ModelError as single:
                matches.append((selector, str(single)))
    title = f"{recipe} on {model}" + (" (each selector alone)" if failure else "")
    table = Table(title=title)
    for column in ("#", "selector", "kind", "formats", "modules", "matched"):
        table.add_column(column, overflow="fold")
    for index, (selector, names) in enumerate(matches):
        if isinstance(names, str):  # this selector's own error
            count, shown = "-", "no match (see the error line)"
        else:
            count, shown = str(len(names)), "\n".join(summarize_module_names(names))
        table.add_row(str(index), selector.pattern, selector.kind, _selector_formats(selector), count, shown)
    console.print(table)
    if failure is not None:
        raise failure
    typer.echo(f"ok: {recipe} is valid for {model} (sha256 {parsed.sha256[:12]})")


def _model_and_matcher(recipe: Recipe) -> tuple[Any, Callable[[Any, Recipe], list[tuple[Any, list[str]]]]]:
    try:
        models = importlib.import_module("mxptq.models")
        transform = importlib.import_module("mxptq.stages.transform")
    except ModuleNotFoundError as exc:
        if exc.name not in ("mxptq.models", "mxptq.stages.transform"):
            raise
        raise MxptqError(f"`mxptq validate --model` is not built yet: {exc.name} does not exist") from None
    model, _tokenizer, _info = models.load_model(recipe.model)
    return model, transform.match_selectors


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _read_report(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MxptqError(f"{path}: report file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MxptqError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(data, dict):
        raise MxptqError(f"{path}: not a JSON report (top level is not an object)")
    return data


def report_rows(paths: Iterable[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (keys read defensively: a missing key is '-')."""
    reports = [(path, _read_report(path)) for path in paths]
    stage_names: list[str] = []
    for _path, data in reports:
        stages = data.get("stages")
        for name in stages if isinstance(stages, dict) else {}:
            if name not in stage_names:
                stage_names.append(name)
    header = ["config", "word ppl", "token ppl", *(f"{name} s" for name in stage_names), "peak mem GiB"]
    rows = []
    for path, data in reports:
        name = data.get("recipe_name") if isinstance(data.get("recipe_name"), str) else path.stem
        peaks = [as_number(get_path(data, "stages", stage, "peak_mem_bytes")) for stage in stage_names]
        peaks = [p for p in peaks if p is not None]
        rows.append([
            name,
            format_number(get_path(data, "metrics", "word_perplexity"), 4),
            format_number(get_path(data, "metrics", "token_perplexity"), 4),
            *(format_number(get_path(data, "stages", stage, "wall_s"), 1) for stage in stage_names),
            f"{max(peaks) / 2**30:.2f}" if peaks else "-",
        ])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def escape(cell: str) -> str:
        return re.sub(r"\|", r"\\|", cell)

    lines = ["| " + " | ".join(map(escape, header)) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


@app.command()
def report(
    reports: Annotated[list[Path], typer.Argument(metavar="REPORT.json...", help="Reports to compare.")],
    markdown: Annotated[
        bool | None,
        typer.Option("--markdown/--rich", help="Markdown table (default when stdout is not a terminal) "
                     "or a rich table."),
    ] = None,
) -> None:
    """Compare reports: config, word/token perplexity, stage wall times, peak memory."""
    header, rows = report_rows(reports)
    use_markdown = markdown if markdown is not None else not sys.stdout.isatty()
    if use_markdown:
        typer.echo(markdown_table(header, rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout).print(table)


def main() -> None:
    """Console-script entry point (`mxptq`, `python -m mxptq`)."""
    app(prog_name="mxptq")
