"""Plot and tabulate the tutorial's progression from the JSON reports of reproduce_tutorial.sh.

    python scripts/plot_progression.py DIR [--png PATH] [--table PATH] [--readme README.md]
                                       [--require-png]

Reads DIR/<config>/report.json (the layout scripts/reproduce_tutorial.sh writes) or flat
DIR/report_<config>.json files, and each run's process wall time from DIR/<config>/process.tsv,
else from DIR/timings.tsv, when present.
Writes:
- DIR/progression.png: word perplexity per config (A: RTN, B: + GPTQ, C: + rotation search), one
  series for MXINT4 and one for MXFP4, config A with the symmetric MXINT scale rule as a single
  point, the unquantized model as a horizontal line; log y-axis. Needs matplotlib (skipped with a
  warning when it is not installed, unless --require-png).
- DIR/table.md: per config its word/token perplexity, wall time of each stage, peak memory and
  rotation winners; per run its device, dtype and exact command; then the checks the issue asks
  for (fp < C < B < A for each series) and the total A -> B -> C wall time.
- with --readme: the same markdown between the markers
  `<!-- BEGIN progression-table -->` and `<!-- END progression-table -->` of that file.

Everything is computed from the committed JSON files, so the table and the plot can be rebuilt
from `benchmarks/` at any time. A benchmark helper, not a test (STYLE.md rule 12).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `python scripts/plot_progression.py` puts scripts/, not the checkout, on sys.path.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxptq.report import as_number, format_number, get_path

BEGIN_MARKER = "<!-- BEGIN progression-table -->"
END_MARKER = "<!-- END progression-table -->"

# The steps of the tutorial's progression (tutorial configs A, B, C), in order.
STEPS = ("A", "B", "C")
STEP_LABELS = {"A": "A: RTN", "B": "B: + GPTQ", "C": "C: + rotation search",
               "D": "D: rotated weights + GPTQ after rotation + search"}  # D: a table row, not plotted
MXINT4, MXFP4, MXINT4_SYMMETRIC, FP = "MXINT4", "MXFP4", "MXINT4, symmetric rule", "fp"


@dataclass(frozen=True)
class ConfigSpec:
    series: str  # FP, MXINT4, MXFP4 or MXINT4_SYMMETRIC
    step: str | None  # "A" | "B" | "C"; None for the unquantized model


# The configs reproduce_tutorial.sh runs, in its order (the directory names it writes).
CONFIGS: dict[str, ConfigSpec] = {
    "fp": ConfigSpec(FP, None),
    "tutorial_a_rtn": ConfigSpec(MXINT4, "A"),
    "tutorial_b_gptq": ConfigSpec(MXINT4, "B"),
    "tutorial_c_rotsearch": ConfigSpec(MXINT4, "C"),
    "mxfp4_a_rtn": ConfigSpec(MXFP4, "A"),
    "mxfp4_b_gptq": ConfigSpec(MXFP4, "B"),
    "mxfp4_c_rotsearch": ConfigSpec(MXFP4, "C"),
    "tutorial_a_symmetric": ConfigSpec(MXINT4_SYMMETRIC, "A"),
    "d_mxint4": ConfigSpec(MXINT4, "D"),
    "d_mxfp4": ConfigSpec(MXFP4, "D"),
}
# Stage columns of the table, in pipeline order; eval_* stages are summed into one column.
STAGE_COLUMNS = ("load", "gptq", "transform", "rotsearch", "save")


@dataclass
class Run:
    """One config's report (and its process wall time, if recorded)."""

    config: str
    path: Path
    report: dict[str, Any]
    process_wall_s: float | None = None

    @property
    def spec(self) -> ConfigSpec | None:
        return CONFIGS.get(self.config)

    @property
    def word_ppl(self) -> float | None:
        return _number(get_path(self.report, "metrics", "word_perplexity"))

    @property
    def token_ppl(self) -> float | None:
        return _number(get_path(self.report, "metrics", "token_perplexity"))

    def stage_s(self, name: str) -> float | None:
        return _number(get_path(self.report, "stages", name, "wall_s"))

    @property
    def eval_s(self) -> float | None:
        times = [_number(v.get("wall_s")) for k, v in self._stages().items() if k.startswith("eval")]
        times = [t for t in times if t is not None]
        return sum(times) if times else None

    @property
    def stages_total_s(self) -> float | None:
        times = [_number(v.get("wall_s")) for v in self._stages().values()]
        times = [t for t in times if t is not None]
        return sum(times) if times else None

    def peak_mem(self) -> tuple[float, str] | None:
        """(peak bytes over all stages, kind): GPU max allocated on CUDA, else host RSS."""
        peaks = [(_number(v.get("peak_mem_bytes")), v.get("peak_mem_kind")) for v in self._stages().values()]
        peaks = [(b, k) for b, k in peaks if b is not None]
        if not peaks:
            return None
        return max(peaks, key=lambda p: p[0])

    @property
    def rotation_winners(self) -> list[str] | None:
        winners = get_path(self.report, "rotation", "winners")
        return list(winners) if isinstance(winners, list) else None

    @property
    def command(self) -> str:
        argv = self.report.get("argv")
        if not isinstance(argv, list):
            return "-"
        return "mxptq " + " ".join(shlex.quote(str(a)) for a in argv)

    def _stages(self) -> dict[str, dict[str, Any]]:
        stages = self.report.get("stages")
        return {k: v for k, v in stages.items() if isinstance(v, dict)} if isinstance(stages, dict) else {}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A report number (`mxptq.report.as_number`); NaN counts as missing here."""
    number = as_number(value)
    return None if number is None or math.isnan(number) else number


def _config_name(candidate: str, report: dict[str, Any]) -> str:
    """The config a report belongs to: its directory/file name, else its recipe name, else "fp"
    for an evaluation of the unquantized model (eval-ppl with a recipe without selectors)."""
    if candidate in CONFIGS:
        return candidate
    recipe_name = report.get("recipe_name")
    if isinstance(recipe_name, str) and recipe_name in CONFIGS:
        return recipe_name
    if report.get("command") == "eval-ppl" and not get_path(report, "recipe", "selectors"):
        return "fp"
    return candidate


def read_timings(path: Path) -> dict[str, float]:
    """config -> process wall time (the last successful run of each config in a timings file:
    a header line, then config, wall_s, exit_status, command separated by tabs)."""
    timings: dict[str, float] = {}
    if not path.is_file():
        return timings
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2] == "0":
            try:
                timings[fields[0]] = float(fields[1])
            except ValueError:
                continue
    return timings


def load_runs(directory: Path) -> list[Run]:
    """All reports under `directory`, known configs first in reproduce_tutorial.sh's order."""
    found: dict[str, Path] = {}
    for path in sorted(directory.glob("*/report.json")):
        found[path.parent.name] = path
    for path in sorted(directory.glob("report_*.json")):
        found.setdefault(path.stem.removeprefix("report_"), path)
    if not found:
        raise SystemExit(f"error: no report.json under {directory} (expected DIR/<config>/report.json "
                         "or DIR/report_<config>.json)")
    timings = read_timings(directory / "timings.tsv")
    runs = []
    for candidate, path in found.items():
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: {path}: not a JSON report ({exc})") from None
        config = _config_name(candidate, report)
        own = read_timings(path.parent / "process.tsv") if path.name == "report.json" else {}
        wall = own.get(candidate, timings.get(config, timings.get(candidate)))
        runs.append(Run(config, path, report, wall))
    order = list(CONFIGS)
    runs.sort(key=lambda r: (order.index(r.config) if r.config in order else len(order), r.config))
    return runs


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], numeric: set[str] = frozenset()) -> list[str]:
    """A markdown table; the `numeric` columns are right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if name in numeric else "---" for name in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _series_label(run: Run) -> str:
    spec = run.spec
    if spec is None:
        return "-"
    if spec.series == FP:
        dtype = get_path(run.report, "model", "dtype")
        return f"unquantized ({dtype})" if dtype else "unquantized"
    return spec.series


def _mem_cell(run: Run) -> str:
    peak = run.peak_mem()
    if peak is None:
        return "-"
    size, kind = peak
    suffix = "" if kind == "cuda_max_allocated" else " (host RSS)"
    return f"{size / 2**30:.2f}{suffix}"


def results_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["config", "elements", "step", "word ppl", "token ppl",
              *(f"{stage} s" for stage in STAGE_COLUMNS), "eval s", "stages total s", "process s",
              "peak mem GiB", "rotation winners"]
    rows = []
    for run in runs:
        spec = run.spec
        winners = run.rotation_winners
        rows.append([
            run.config, _series_label(run), STEP_LABELS.get(spec.step, "-") if spec and spec.step else "-",
            format_number(run.word_ppl, 2), format_number(run.token_ppl, 2),
            *(format_number(run.stage_s(stage), 1) for stage in STAGE_COLUMNS),
            format_number(run.eval_s, 1), format_number(run.stages_total_s, 1),
            format_number(run.process_wall_s, 1),
            _mem_cell(run),
            "-" if winners is None else (", ".join(winners) or "none"),
        ])
    return header, rows


def details_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = ["config", "model", "device", "dtype", "scale rules", "command"]
    rows = []
    for run in runs:
        rules = get_path(run.report, "formats", "scale_rules")
        rows.append([
            run.config,
            str(get_path(run.report, "model", "id") or "-"),
            str(get_path(run.report, "device", "name") or get_path(run.report, "device", "type") or "-"),
            str(get_path(run.report, "model", "dtype") or "-"),
            ", ".join(rules) if isinstance(rules, list) and rules else "-",
            f"`{run.command}`",
        ])
    return header, rows


def series_points(runs: list[Run], series: str) -> dict[str, float]:
    """step -> word perplexity of one series (steps without a report are left out)."""
    return {run.spec.step: run.word_ppl for run in runs
            if run.spec is not None and run.spec.series == series and run.word_ppl is not None}


def fp_word_ppl(runs: list[Run]) -> float | None:
    for run in runs:
        if run.config == "fp" and run.word_ppl is not None:
            return run.word_ppl
    # No separate fp run: a quantize report carries the unquantized model's metrics too.
    for run in runs:
        value = _number(get_path(run.report, "metrics", "fp", "word_perplexity"))
        if value is not None:
            return value
    return None


def ordering_check(runs: list[Run], series: str) -> str | None:
    """'fp 33.98 < C 81.61 < B 196.22 < A 285.90: holds' (or 'does NOT hold'), None without data."""
    points = series_points(runs, series)
    fp = fp_word_ppl(runs)
    if fp is None or any(step not in points for step in STEPS):
        return None
    chain = [("fp", fp), ("C", points["C"]), ("B", points["B"]), ("A", points["A"])]
    holds = all(a[1] < b[1] for a, b in itertools.pairwise(chain))
    text = " < ".join(f"{name} {value:.2f}" for name, value in chain)
    return f"{series}: {text}: {'holds' if holds else 'does NOT hold'}"


def progression_time(runs: list[Run], series: str) -> str | None:
    by_step = {run.spec.step: run for run in runs if run.spec is not None and run.spec.series == series}
    if any(step not in by_step for step in STEPS):
        return None
    stage_totals = [by_step[step].stages_total_s for step in STEPS]
    process = [by_step[step].process_wall_s for step in STEPS]
    text = f"{series} A -> B -> C: {sum(t or 0.0 for t in stage_totals):.1f} s of pipeline stages"
    if all(p is not None for p in process):
        text += f", {sum(process):.1f} s of processes"
    return text


def markdown(runs: list[Run]) -> str:
    lines = [("Word perplexity: lm-eval `wikitext` protocol on the WikiText-2 test split (see each report's "
              "`metrics.*.protocol`). Times in seconds; \"stages total\" is the sum of the report's "
              "stages (loading and every evaluation included), \"process\" the run's wall time from "
              "`process.tsv` (adds Python start-up). Peak memory: the largest "
              "`torch.cuda.max_memory_allocated` over the stages on CUDA, else the host's peak RSS."),
             ""]
    header, rows = results_rows(runs)
    lines += _table(header, rows, numeric={h for h in header if h.endswith((" s", " ppl", " GiB"))})
    lines += ["", "Runs:", ""]
    lines += _table(*details_rows(runs))
    checks = [c for c in (ordering_check(runs, MXINT4), ordering_check(runs, MXFP4)) if c]
    times = [t for t in (progression_time(runs, MXINT4), progression_time(runs, MXFP4)) if t]
    if checks or times:
        lines += ["", "Checks:", ""]
        lines += [f"- word perplexity, {check}" for check in checks]
        lines += [f"- total wall time, {text} (C resumes B's GPTQ checkpoint, as in the tutorial)"
                  for text in times]
    rules = {run.config: run.word_ppl for run in runs if run.config in ("tutorial_a_rtn", "tutorial_a_symmetric")}
    if None not in rules.values() and len(rules) == 2:
        ratio = rules["tutorial_a_symmetric"] / rules["tutorial_a_rtn"]
        lines += [(f"- MXINT4 scale rule, config A: tutorial {rules['tutorial_a_rtn']:.2f}, symmetric "
                   f"{rules['tutorial_a_symmetric']:.2f} ({ratio:.2f}x)")]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise SystemExit(f"error: {readme}: no {BEGIN_MARKER} ... {END_MARKER} section to fill")
    text = text[: start + len(BEGIN_MARKER)] + "\n" + table + text[end:]
    readme.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on batch nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    x = {step: i for i, step in enumerate(STEPS)}
    styles = {MXINT4: {"marker": "o", "color": "tab:blue"}, MXFP4: {"marker": "s", "color": "tab:orange"}}
    for series, style in styles.items():
        points = series_points(runs, series)
        if not points:
            continue
        steps = [s for s in STEPS if s in points]
        ax.plot([x[s] for s in steps], [points[s] for s in steps], label=series, linewidth=2, **style)
        for s in steps:
            ax.annotate(f"{points[s]:.1f}", (x[s], points[s]), textcoords="offset points", xytext=(8, 4),
                        fontsize=8, color=style["color"])
    symmetric = series_points(runs, MXINT4_SYMMETRIC)
    if "A" in symmetric:
        ax.plot([x["A"]], [symmetric["A"]], linestyle="none", marker="^", markersize=8,
                markerfacecolor="none", color="tab:blue", label="MXINT4 A, symmetric scale rule")
        ax.annotate(f"{symmetric['A']:.1f}", (x["A"], symmetric["A"]), textcoords="offset points",
                    xytext=(8, 4), fontsize=8, color="tab:blue")
    fp = fp_word_ppl(runs)
    if fp is not None:
        fp_run = next((r for r in runs if r.config == "fp"), None)
        dtype = get_path(fp_run.report, "model", "dtype") if fp_run else None
        ax.axhline(fp, color="gray", linestyle="--", linewidth=1.5,
                   label=f"unquantized{f' ({dtype})' if dtype else ''}: {fp:.2f}")
    ax.set_yscale("log")
    # Plain numbers on the log axis (10^2 style labels hide the values readers compare).
    plain = FuncFormatter(lambda value, _position: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(STEPS)), [STEP_LABELS[s] for s in STEPS])
    ax.set_xlim(-0.4, len(STEPS) - 0.4)
    ax.set_ylabel("WikiText-2 word perplexity (log scale)")
    first = runs[0].report
    model = get_path(first, "model", "id") or "?"
    device = get_path(first, "device", "name") or get_path(first, "device", "type") or "?"
    ax.set_title(f"W4A4 + KV4 MX quantization of {model} ({device})", fontsize=10)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="directory with <config>/report.json files")
    parser.add_argument("--png", type=Path, help="plot path (default DIR/progression.png)")
    parser.add_argument("--table", type=Path, help="markdown path (default DIR/table.md)")
    parser.add_argument("--readme", type=Path, help="also fill this file's progression-table section")
    parser.add_argument("--require-png", action="store_true", help="fail when matplotlib is missing")
    args = parser.parse_args(argv)

    runs = load_runs(args.directory)
    table_path = args.table or args.directory / "table.md"
    table = markdown(runs)
    table_path.write_text(table, encoding="utf-8")
    print(f"table: {table_path}")
    if args.readme is not None:
        update_readme(args.readme, table)
        print(f"readme: {args.readme}")
    png_path = args.png or args.directory / "progression.png"
    try:
        plot(runs, png_path)
    except ImportError as exc:
        if args.require_png:
            raise SystemExit(f"error: cannot plot without matplotlib ({exc})") from None
        print(f"warning: {png_path} not written: matplotlib is not installed ({exc}); rerun this "
              "script where it is to draw the plot from the same reports", file=sys.stderr)
        return 0
    print(f"plot: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
