"""scripts/reproduce_tutorial.sh and scripts/plot_progression.py (issue 10).

The end-to-end smoke run uses a tiny random Llama saved with save_pretrained next to a byte-level
tokenizer built offline (no demo model, no network), synthetic WikiText-shaped text, and copies of
the recipes with fewer calibration samples (--recipe-dir), so a real run of four configs
(fp, A, MXFP4 B, MXFP4 C: eval-ppl, RTN, GPTQ, rotation search) stays well under a minute on CPU.
The recipes themselves are checked to load unchanged apart from those sizes.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mxptq.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_tutorial.sh"
ALL_CONFIGS = ["fp", "tutorial_a_rtn", "tutorial_b_gptq", "tutorial_c_rotsearch",
               "mxfp4_a_rtn", "mxfp4_b_gptq", "mxfp4_c_rotsearch", "tutorial_a_symmetric",
               "d_mxint4", "d_mxfp4"]
SMOKE_CONFIGS = ["fp", "tutorial_a_rtn", "mxfp4_b_gptq", "mxfp4_c_rotsearch"]


def _plot_module():
    spec = importlib.util.spec_from_file_location("plot_progression", REPO / "scripts" / "plot_progression.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plot_progression"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


plot_progression = _plot_module()


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny model directory, synthetic data, small recipes
# ---------------------------------------------------------------------------------------------


def save_tiny_model(directory: Path) -> Path:
    """A random tiny Llama + a byte-level BPE tokenizer without merges (256 byte tokens + BOS/EOS),
    saved like a Hugging Face model directory."""
    from conftest import make_tiny_llama
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    # Calibration windows of the tutorial recipes are 512 tokens, evaluation windows 2048.
    model = make_tiny_llama(vocab_size=len(fast), max_position_embeddings=2048,
                            bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_wikitext(directory: Path) -> Path:
    """wiki.valid.raw / wiki.test.raw with WikiText's page layout (" = Title = " headings)."""
    rng = random.Random(0)
    words = ["the", "of", "and", "in", "a", "to", "was", "is", "for", "on", "as", "with", "by", "at"]

    def page(title: str, paragraphs: int) -> str:
        lines = ["", f" = {title} = ", ""]
        for _ in range(paragraphs):
            lines += [" " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + " . ", ""]
        return "\n".join(lines) + "\n"

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wiki.valid.raw").write_text("".join(page(f"Valid {i}", 8) for i in range(6)))
    (directory / "wiki.test.raw").write_text("".join(page(f"Test {i}", 3) for i in range(2)))
    return directory


def write_small_recipes(directory: Path) -> Path:
    """Copies of recipes/*.toml with 4 calibration samples of 64 tokens (GPTQ and rotation search)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ALL_CONFIGS[1:]:
        text = (REPO / "recipes" / f"{name}.toml").read_text()
        text = re.sub(r"(?m)^(nsamples|calib_nsamples) = 32$", r"\1 = 4", text)
        text = re.sub(r"(?m)^(seqlen|calib_seqlen) = 512$", r"\1 = 64", text)
        (directory / f"{name}.toml").write_text(text)
    return directory


def run_script(*args: str, cwd: Path, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    if data_dir is not None:
        env["MXPTQ_DATA_DIR"] = str(data_dir)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real run of four configs on CPU; relative --model/--out resolved from the caller's cwd."""
    base = tmp_path_factory.mktemp("reproduce")
    save_tiny_model(base / "tiny")
    data_dir = write_wikitext(base / "data")
    recipes = write_small_recipes(base / "recipes")
    result = run_script("--model", "tiny", "--out", "out", "--limit", "1", "--device", "cpu",
                        "--configs", ",".join(SMOKE_CONFIGS), "--recipe-dir", str(recipes),
                        "--bundle", "results.tar.gz", cwd=base, data_dir=data_dir)
    return base, base / "out", result


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp4_a_rtn", "mxfp4_b_gptq", "mxfp4_c_rotsearch"])
def test_mxfp4_recipes_are_the_tutorial_selectors_with_e2m1(name):
    tutorial = load_recipe(REPO / "recipes" / f"{name.replace('mxfp4', 'tutorial')}.toml")
    mxfp4 = load_recipe(REPO / "recipes" / f"{name}.toml")
    assert [s.pattern for s in mxfp4.selectors] == [s.pattern for s in tutorial.selectors]
    for ours, theirs in zip(mxfp4.selectors, tutorial.selectors):
        for tensor in ("weight", "data_in", "kv_cache", "qk_matmul", "av_matmul", "softmax", "rope"):
            fmt, reference = getattr(ours.config, tensor, None), getattr(theirs.config, tensor, None)
            assert (fmt is None) == (reference is None), (ours.pattern, tensor)
            if fmt is not None:
                # OCP MX v1.0 table 1: FP4 = E2M1, blocks of 32; OCP scale rule (the mxfp default).
                assert (fmt.element.name, fmt.element.exp_bits, fmt.element.man_bits) == ("e2m1", 2, 1)
                assert fmt.block_size == 32 and fmt.scale_rule.value == "ocp"
        assert getattr(ours.config, "gptq", False) == getattr(theirs.config, "gptq", False)
    if tutorial.gptq is not None:
        expected = tutorial.gptq.model_dump(exclude={"weight", "format", "checkpoint_dir"})
        assert mxfp4.gptq.model_dump(exclude={"weight", "format", "checkpoint_dir"}) == expected
        assert mxfp4.gptq.weight.element.name == "e2m1"
        # Its own checkpoint, relative to the run directory, shared by MXFP4 B and C.
        assert mxfp4.gptq.checkpoint_dir == Path("mxfp4_output/checkpoints/config_b_gptq")
    if tutorial.rotation_search is not None:
        assert mxfp4.rotation_search.model_dump(exclude={"cache_path"}) == \
            tutorial.rotation_search.model_dump(exclude={"cache_path"})
        assert not mxfp4.rotation_search.cache_path.is_absolute()
        assert mxfp4.rotation_search.cache_path != tutorial.rotation_search.cache_path


def test_symmetric_variant_is_config_a_with_only_the_scale_rule_changed():
    a = load_recipe(REPO / "recipes" / "tutorial_a_rtn.toml")
    symmetric = load_recipe(REPO / "recipes" / "tutorial_a_symmetric.toml")
    assert symmetric.formats.mxint_scale_rule == "symmetric"
    assert len(symmetric.selectors) == len(a.selectors)
    for ours, theirs in zip(symmetric.selectors, a.selectors):
        assert ours.pattern == theirs.pattern
        for tensor in ("weight", "data_in", "kv_cache"):
            fmt, reference = getattr(ours.config, tensor, None), getattr(theirs.config, tensor, None)
            if reference is None:
                assert fmt is None
                continue
            assert fmt.scale_rule.value == "symmetric" and reference.scale_rule.value == "tutorial"
            assert (fmt.element, fmt.block_size) == (reference.element, reference.block_size)


# ---------------------------------------------------------------------------------------------
# reproduce_tutorial.sh
# ---------------------------------------------------------------------------------------------


def test_dry_run_lists_every_config_in_order_run_from_the_output_dir(tmp_path):
    result = run_script("--dry-run", "--out", "o", "--limit", "3", "--dtype", "float16", "--data-dir", "d",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("(cd ")]
    assert len(commands) == len(ALL_CONFIGS)
    out = tmp_path / "o"
    for name, line in zip(ALL_CONFIGS, commands):
        assert line.startswith(f"(cd {out} && ")
        assert f"--out {out / name}" in line
        assert "--model smollm2-135m --limit 3" in line
        # Extra flags pass through; a relative --data-dir is made absolute (mxptq runs from o/).
        assert f"--dtype float16 --data-dir {tmp_path / 'd'}" in line
        if name == "fp":
            assert " -m mxptq eval-ppl " in line
        else:
            assert f" -m mxptq quantize {REPO / 'recipes' / name}.toml " in line


@pytest.mark.parametrize("args, message", [
    (["--configs", "tutorial_a_rtn,nope"], "--configs: unknown config 'nope'"),
    (["--limit", "x"], "--limit must be a positive integer"),
    (["--model"], "--model needs a value"),
    (["--model", "--device", "cpu"], "--model needs a value"),
])
def test_bad_options_exit_2_before_running_anything(tmp_path, args, message):
    result = run_script("--out", "o", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_failing_run_stops_the_script_with_its_exit_status(tmp_path):
    result = run_script("--model", "./no-such-model", "--out", "o", "--configs", "fp,tutorial_a_rtn",
                        "--device", "cpu", cwd=tmp_path)
    # mxptq's user-error exit code (cli.py), passed through unchanged.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model './no-such-model' not found" in result.stderr
    assert "error: fp failed with exit status 2" in result.stderr
    assert "total wall time:" in result.stdout and "(exit status 2)" in result.stdout
    rows = list(csv.reader((tmp_path / "o" / "timings.tsv").open(), delimiter="\t"))
    assert [row[0] for row in rows[1:]] == ["fp"] and rows[1][2] == "2"  # A never ran
    assert (tmp_path / "o" / "fp" / "process.tsv").read_text().splitlines()[1].split("\t")[2] == "2"
    assert not (tmp_path / "o" / "summary.md").exists()


def test_smoke_run_writes_reports_summary_plot_and_bundle(smoke_run):
    base, out, result = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "total wall time:" in result.stdout and "(exit status 0)" in result.stdout
    # Not a TTY: plain log lines, no rich progress bars.
    assert "━" not in result.stderr
    for name in SMOKE_CONFIGS:
        report = json.loads((out / name / "report.json").read_text())
        assert report["command"] == ("eval-ppl" if name == "fp" else "quantize")
        assert report["argv"][report["argv"].index("--out") + 1] == str(out / name)
        assert report["model"]["path"] == str(base / "tiny")
        assert report["metrics"]["quantized" if name != "fp" else "fp"]["n_documents"] == 1
        if name != "fp":
            assert report["recipe_name"] == name
            assert report["recipe"]["source_path"] == str(base / "recipes" / f"{name}.toml")
            # The baseline is the fp run's job; quantize skips its own when mxptq offers the flag.
            assert ("fp" in report["metrics"]) == ("--no-fp-eval" not in report["argv"])
    # The unquantized model evaluated once, by the fp run: the quantize runs skipped theirs.
    assert "word_perplexity" in json.loads((out / "fp" / "report.json").read_text())["metrics"]["fp"]

    timings = list(csv.reader((out / "timings.tsv").open(), delimiter="\t"))
    assert timings[0] == ["config", "wall_s", "exit_status", "command"]
    assert [row[0] for row in timings[1:]] == SMOKE_CONFIGS
    assert all(row[2] == "0" and float(row[1]) > 0 for row in timings[1:])
    for row in timings[1:]:  # the same row, next to the config's report
        own = list(csv.reader((out / row[0] / "process.tsv").open(), delimiter="\t"))
        assert own == [timings[0], row]

    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in summary[2:]][1:] == SMOKE_CONFIGS[1:]
    table = (out / "table.md").read_text()
    for name in SMOKE_CONFIGS:
        assert f"| {name} |" in table
    assert (out / "progression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with tarfile.open(base / "results.tar.gz") as bundle:
        members = sorted(m.name.removeprefix("./") for m in bundle.getmembers() if m.isfile())
    assert members == sorted([
        *(f"{name}/report.json" for name in SMOKE_CONFIGS),
        *(f"{name}/process.tsv" for name in SMOKE_CONFIGS),
        "mxfp4_output/checkpoints/config_c_rotsearch/rotation_decisions.json",
        "progression.png", "summary.md", "table.md", "timings.tsv",
    ])


def test_smoke_run_keeps_gptq_and_rotation_state_inside_the_output_dir(smoke_run):
    base, out, result = smoke_run
    assert result.returncode == 0, result.stderr[-3000:]
    gptq_dir = out / "mxfp4_output" / "checkpoints" / "config_b_gptq"
    assert gptq_dir.is_dir() and any(gptq_dir.iterdir())
    assert (out / "mxfp4_output" / "checkpoints" / "config_c_rotsearch" / "rotation_decisions.json").is_file()
    # Nothing relative landed in the caller's directory.
    assert sorted(p.name for p in base.iterdir()) == ["data", "out", "recipes", "results.tar.gz", "tiny"]
    # C resumed every GPTQ layer from B's checkpoint (B and C share it, as in the tutorial).
    b = json.loads((out / "mxfp4_b_gptq" / "report.json").read_text())["gptq"]["layers"]
    c = json.loads((out / "mxfp4_c_rotsearch" / "report.json").read_text())["gptq"]["layers"]
    assert len(c) == len(b) == 2
    assert not any(layer["from_checkpoint"] for layer in b)
    assert all(layer["from_checkpoint"] for layer in c)


# ---------------------------------------------------------------------------------------------
# plot_progression.py on synthetic reports
# ---------------------------------------------------------------------------------------------

# word perplexities of a made-up run: fp < C < B < A for both series
PPL = {"fp": 30.0, "tutorial_a_rtn": 300.0, "tutorial_b_gptq": 200.0, "tutorial_c_rotsearch": 80.0,
       "mxfp4_a_rtn": 150.0, "mxfp4_b_gptq": 100.0, "mxfp4_c_rotsearch": 60.0, "tutorial_a_symmetric": 600.0}


def synthetic_report(name: str, ppl: float) -> dict:
    fp = name == "fp"
    stages = {"load": {"wall_s": 10.0, "peak_mem_bytes": 0, "peak_mem_kind": "cuda_max_allocated"},
              ("eval_fp" if fp else "eval_quantized"): {"wall_s": 5.0, "peak_mem_bytes": 3 * 2**30,
                                                        "peak_mem_kind": "cuda_max_allocated"}}
    if "gptq" in name or "rotsearch" in name:
        stages["gptq"] = {"wall_s": 20.0 if "gptq" in name else 1.0, "peak_mem_bytes": 2**30,
                          "peak_mem_kind": "cuda_max_allocated"}
    report = {
        "command": "eval-ppl" if fp else "quantize",
        "recipe_name": "recipe" if fp else name,  # what eval-ppl without a recipe records
        "recipe": {"selectors": [] if fp else [{"pattern": "x"}]},
        "argv": ["eval-ppl" if fp else "quantize", "--model", "smollm2-135m", "--out", f"/o/{name}"],
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"},
        "model": {"id": "smollm2-135m", "dtype": "float16"},
        "formats": {"scale_rules": [] if fp else ["symmetric" if "symmetric" in name else "tutorial"]},
        "stages": stages,
        "metrics": {"word_perplexity": ppl, "token_perplexity": ppl / 2},
    }
    if "rotsearch" in name:
        stages["rotsearch"] = {"wall_s": 15.0, "peak_mem_bytes": 2 * 2**30, "peak_mem_kind": "cuda_max_allocated"}
        report["rotation"] = {"winners": ["up_proj", "kv_cache"]}
    return report


def write_synthetic(directory: Path, ppl: dict[str, float]) -> Path:
    for name, value in ppl.items():
        (directory / name).mkdir(parents=True)
        (directory / name / "report.json").write_text(json.dumps(synthetic_report(name, value)))
    lines = ["config\twall_s\texit_status\tcommand"] + [f"{name}\t{i + 20}.5\t0\tx" for i, name in enumerate(ppl)]
    (directory / "timings.tsv").write_text("\n".join(lines) + "\n")
    # A run's own process.tsv wins over the log (a config directory merged from another run).
    (directory / "fp" / "process.tsv").write_text("config\twall_s\texit_status\tcommand\nfp\t99.0\t0\tx\n")
    return directory


def table_rows(text: str, first_header: str) -> list[dict[str, str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split(" | ")))))
    return rows


def test_plot_writes_png_and_table_rows_from_the_reports(tmp_path):
    directory = write_synthetic(tmp_path / "run", dict(reversed(list(PPL.items()))))  # order must not matter
    assert plot_progression.main([str(directory)]) == 0
    assert (directory / "progression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (directory / "table.md").read_text()
    rows = table_rows(table, "config | elements")
    assert [row["config"] for row in rows] == list(PPL)  # reproduce_tutorial.sh's order
    by_name = {row["config"]: row for row in rows}
    assert by_name["fp"]["elements"] == "unquantized (float16)"
    assert by_name["fp"]["process s"] == "99.0"
    assert by_name["tutorial_b_gptq"]["word ppl"] == "200.00"
    assert by_name["tutorial_b_gptq"]["token ppl"] == "100.00"
    # load 10 + gptq 20 + eval 5; timings.tsv row index 5 (reversed order) -> 25.5 s
    assert by_name["tutorial_b_gptq"]["stages total s"] == "35.0"
    assert by_name["tutorial_b_gptq"]["process s"] == "25.5"
    assert by_name["tutorial_c_rotsearch"]["rotsearch s"] == "15.0"
    assert by_name["tutorial_c_rotsearch"]["peak mem GiB"] == "3.00"
    assert by_name["tutorial_c_rotsearch"]["rotation winners"] == "up_proj, kv_cache"
    assert by_name["tutorial_a_rtn"]["rotation winners"] == "-"
    details = {row["config"]: row for row in table_rows(table, "config | model")}
    assert details["fp"]["device"] == "NVIDIA H100 80GB HBM3"
    assert details["tutorial_a_symmetric"]["scale rules"] == "symmetric"
    assert details["mxfp4_b_gptq"]["command"] == "`mxptq quantize --model smollm2-135m --out /o/mxfp4_b_gptq`"
    assert "MXINT4: fp 30.00 < C 80.00 < B 200.00 < A 300.00: holds" in table
    assert "MXFP4: fp 30.00 < C 60.00 < B 100.00 < A 150.00: holds" in table
    # stages: A 10 + 5, B 10 + 20 + 5, C 10 + 1 + 15 + 5 -> 81 s; processes: 26.5 + 25.5 + 24.5 s
    assert "MXINT4 A -> B -> C: 81.0 s of pipeline stages, 76.5 s of processes" in table
    assert "tutorial 300.00, symmetric 600.00 (2.00x)" in table


def test_plot_reports_a_broken_ordering_and_reads_flat_report_files(tmp_path):
    ppl = dict(PPL, tutorial_c_rotsearch=250.0)  # C worse than B
    directory = tmp_path / "flat"
    directory.mkdir()
    for name, value in ppl.items():
        (directory / f"report_{name}.json").write_text(json.dumps(synthetic_report(name, value)))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{plot_progression.BEGIN_MARKER}\nold table\n{plot_progression.END_MARKER}\nrest\n")
    assert plot_progression.main([str(directory), "--readme", str(readme)]) == 0
    table = (directory / "table.md").read_text()
    assert "MXINT4: fp 30.00 < C 250.00 < B 200.00 < A 300.00: does NOT hold" in table
    rows = table_rows(table, "config | elements")
    assert {row["process s"] for row in rows} == {"-"}  # no timings.tsv: process time unknown
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert table in text
