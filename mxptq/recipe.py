"""TOML recipes: parsing and validation.

A recipe is the tutorial's TOML (`../shared/seed/tutorial_7_mx_ptq.txt`, configs A/B/C load
unchanged) plus our optional sections. Top level:

    by = "regex_name" | "name" | "type"      how selector keys are matched (default regex_name)
    ['<selector>']                            a linear selector (keys: see LinearSelectorTable)
    ['<selector>'.kv_cache]                   any of qk_matmul/av_matmul/softmax/rope/kv_cache
                                              makes ['<selector>'] an attention selector
    [gptq] + [gptq.weight_config]             MX-aware GPTQ (tutorial keys + ours)
    [rotation]                                offline rotations folded into the weights (ours)
    [rotation_search]                         greedy online-Hadamard search (tutorial keys + ours)
    [model] [data] [eval] [output] [formats]  ours, all optional

Selectors keep TOML order; the first one that matches a module wins (DESIGN.md "Recipe").

Validation happens in two layers, all before any model is loaded:
  1. "Table" models mirror the TOML keys exactly (extra="forbid", strict types), so a pydantic
     error's location *is* the TOML key path and can be reported as written;
  2. the semantic objects (Selector with resolved `Format`s, GptqConfig with its weight Format)
     are built from the tables, with cross-section rules (gptq = true needs [gptq], MXFP pairs,
     widths, block sizes) raising RecipeError with an explicit key path.
Every error is one line: `<file>: [<toml key path>] <problem>; allowed: <...>`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from mxptq.errors import FormatError, RecipeError

# --------------------------------------------------------------------------------------------
# Small vocabularies (each defined once here; formats-related ones come from mxptq.formats)
# --------------------------------------------------------------------------------------------

SelectBy = Literal["regex_name", "name", "type"]
FormatName = Literal["mxint", "mxfp"]
AttentionStage = Literal["qk_matmul", "av_matmul", "softmax", "rope", "kv_cache"]
ATTENTION_STAGES: tuple[str, ...] = AttentionStage.__args__  # type: ignore[attr-defined]
# The tutorial's greedy search walks these (q..down_proj, kv_cache); qk/av are ours.
MatmulType = Literal[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "kv_cache", "qk_matmul", "av_matmul",
]
MATMUL_TYPES: tuple[str, ...] = MatmulType.__args__  # type: ignore[attr-defined]
Dtype = Literal["float16", "bfloat16", "float32", "auto"]
Split = Literal["train", "validation", "test"]
Refit = Literal["none", "quantized_inputs", "asymmetric"]
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
DEVICE_ALLOWED = "auto, cpu, mps, cuda, cuda:N"
RESERVED_TABLES = ("gptq", "rotation", "rotation_search", "model", "data", "eval", "output", "formats")
# Linears whose input an online rotation can be fused into (issue 22: [rotation] online).
OnlineLinear = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOP_LEVEL_KEYS = ("by", *RESERVED_TABLES)
DEFAULT_OUTPUT_ROOT = Path("mxptq_output")


def _formats_module():
    # Imported lazily: mxptq.formats pulls in torch, and `mxptq --help` should not.
    from mxptq import formats

    return formats


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


def _number_only(value: Any) -> Any:
    # TOML distinguishes 1 and 1.0; accept both for a float key, but not strings or booleans.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return float(value)


def _path_like(value: Any) -> Any:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    return Path(value)


def _to_format(value: Any) -> Any:
    # A resolved Format, or its to_dict() form (a recipe read back from a report/checkpoint).
    if isinstance(value, Mapping):
        return _formats_module().Format.from_dict(dict(value))
    if hasattr(value, "element") and hasattr(value, "block_size"):
        return value
    raise PydanticCustomError("format_type", "Input should be an MX Format")


# TOML spells inf and nan too; no recipe float means anything there (issue 30: improvement_eps = inf
# passed validation, then the rotation decisions could not be written as JSON).
TomlFloat = Annotated[float, BeforeValidator(_number_only), Field(allow_inf_nan=False)]
TomlPath = Annotated[Path, BeforeValidator(_path_like)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
# `Format` stays `Any` for pydantic so this module imports without torch; the validator and
# serializer make the field round-trip through JSON (Format.to_dict / Format.from_dict).
FormatField = Annotated[Any, PlainValidator(_to_format), PlainSerializer(lambda f: f.to_dict())]


class _Table(BaseModel):
    """A TOML table: unknown keys are errors (STYLE.md rule 5)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Layer 1: tables as written in TOML
# --------------------------------------------------------------------------------------------


class LinearSelectorTable(_Table):
    """`['<regex>']` for a linear layer (tutorial keys; `bias_*`, `scale_rule` are ours).

    mxint: `<t>_width` = total bits incl. sign; mxfp: `<t>_exponent_width` + `<t>_frac_width`
    (sign implied; `<t>_width` optional, must then be 1 + exp + frac). `<t>` is weight, data_in
    (the input activation) or bias. No keys for a tensor = that tensor stays in full precision.
    """

    name: FormatName | None = None
    weight_block_size: StrictInt | None = None
    weight_width: StrictInt | None = None
    weight_exponent_width: StrictInt | None = None
    weight_frac_width: StrictInt | None = None
    data_in_block_size: StrictInt | None = None
    data_in_width: StrictInt | None = None
    data_in_exponent_width: StrictInt | None = None
    data_in_frac_width: StrictInt | None = None
    bias_block_size: StrictInt | None = None
    bias_width: StrictInt | None = None
    bias_exponent_width: StrictInt | None = None
    bias_frac_width: StrictInt | None = None
    scale_rule: StrictStr | None = None
    bypass: StrictBool = False
    gptq: StrictBool = False


class AttentionStageTable(_Table):
    """`['<regex>'.kv_cache]` etc.: `bypass = true`, or the data_in_* keys of one quantizer."""

    name: FormatName | None = None
    bypass: StrictBool = False
    data_in_block_size: StrictInt | None = None
    data_in_width: StrictInt | None = None
    data_in_exponent_width: StrictInt | None = None
    data_in_frac_width: StrictInt | None = None
    scale_rule: StrictStr | None = None


class AttentionSelectorTable(_Table):
    """`['<regex>self_attn$']` with sub-tables; a missing sub-table means that stage is bypassed."""

    name: FormatName | None = None
    bypass: StrictBool = False
    scale_rule: StrictStr | None = None
    qk_matmul: AttentionStageTable | None = None
    av_matmul: AttentionStageTable | None = None
    softmax: AttentionStageTable | None = None
    rope: AttentionStageTable | None = None
    kv_cache: AttentionStageTable | None = None


class WeightConfigTable(_Table):
    """`[gptq.weight_config]`: the weight format GPTQ targets (format name from [gptq].format)."""

    weight_block_size: StrictInt | None = None
    weight_width: StrictInt | None = None
    weight_exponent_width: StrictInt | None = None
    weight_frac_width: StrictInt | None = None
    scale_rule: StrictStr | None = None


class GptqTable(_Table):
    """`[gptq]` as written: the tutorial's keys (defaults = the tutorial's values) plus ours."""

    model_name: StrictStr | None = None
    format: FormatName = "mxint"
    dataset: Literal["wikitext2"] = "wikitext2"
    nsamples: PositiveInt = 32
    seqlen: PositiveInt = 512
    cali_batch_size: PositiveInt = 8
    quantile_search: StrictBool = False
    clip_search_y: StrictBool = False
    checkpoint_dir: TomlPath | None = None
    weight_config: WeightConfigTable | None = None
    seed: StrictInt = 0
    damp_percent: Annotated[TomlFloat, Field(gt=0.0, lt=1.0)] = 0.01
    # "joint": the 32 columns of an MX block are quantized together (the reference);
    # "column": column-by-column error compensation inside the block (DESIGN.md "GPTQ for MX").
    intra_block: Literal["joint", "column"] = "joint"
    split: Split | None = None  # None = [data].calib_split
    # After the MX transform (and rotation search), fit every GPTQ linear again on the inputs the
    # quantized model gives it: "quantized_inputs" (GPTQ of W on them) or "asymmetric" (GPTAQ:
    # towards the unquantized output); mxptq/stages/refit.py. The weights-only pass still runs
    # first (the rotation search scores it).
    refit: Refit = "none"
    # true: columns in order of decreasing Hessian diagonal, MX block exponents fixed first
    # (GPTQ's act-order with static groups; mxptq/stages/gptq_math.py).
    act_order: StrictBool = False


# --------------------------------------------------------------------------------------------
# Sections that are both table and semantic object (fields == TOML keys)
# --------------------------------------------------------------------------------------------


class RotationSearchConfig(_Table):
    """`[rotation_search]`: tutorial keys (defaults = tutorial's values) plus seed/split."""

    calib_nsamples: PositiveInt = 32
    calib_seqlen: PositiveInt = 512
    improvement_eps: Annotated[TomlFloat, Field(ge=0.0)] = 0.0
    cache_path: TomlPath | None = None
    matmul_types: Annotated[list[MatmulType], Field(min_length=1)] = Field(
        default_factory=lambda: list(MATMUL_TYPES)
    )
    seed: StrictInt = 0
    split: Split | None = None  # None = [data].calib_split


class RotationConfig(_Table):
    """`[rotation]` (ours, issue 22 / config D): rotations folded into the weights before GPTQ.

    residual: R1 -- fold every RMSNorm scale into the linears that read it, untie tied
        embeddings, rotate the residual stream by a random-sign Hadamard matrix (QuaRot R1).
    heads: R2 -- rotate each attention head's values (v_proj rows, o_proj columns) by a
        random-sign Hadamard matrix of head_dim (QuaRot R2).
    online: linears whose input is rotated at run time by a Hadamard H with Hᵀ folded into their
        weight (QuaRot's online down_proj rotation): GPTQ then quantizes W Hᵀ on inputs H x.
    seed: the random signs (one generator, drawn in a fixed order).
    """

    residual: StrictBool = True
    heads: StrictBool = True
    online: list[OnlineLinear] = Field(default_factory=lambda: ["down_proj"])
    seed: StrictInt = 0


class ModelConfig(_Table):
    """`[model]`. name: HF id | local dir | .gguf file | "smollm2-135m" (the demo model)."""

    name: StrictStr | None = None
    # auto: float16 on CUDA (as the tutorial), float32 on the CPU (see mxptq.models.resolve_dtype)
    dtype: Dtype = "auto"
    device: Annotated[StrictStr, Field(pattern=rf"^({DEVICE_PATTERN})$")] = "auto"
    # The tutorial builds quantized models with "eager"; MXAttention keeps the fused SDPA kernel
    # whenever no enabled stage needs the scores, so sdpa is the faster default with equal results.
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    trust_remote_code: StrictBool = False


class DataConfig(_Table):
    """`[data]`. dir: a directory with wiki.{valid,test}.raw; None = Hugging Face datasets."""

    dir: TomlPath | None = None
    # No train split is available offline here (DESIGN.md "Data"): calibrate on validation.
    calib_split: Split = "validation"
    eval_split: Split = "test"


class EvalConfig(_Table):
    """`[eval]`: perplexity evaluation (lm-eval `wikitext` protocol, tutorial's max_length/batch)."""

    tasks: Annotated[list[Literal["wikitext"]], Field(min_length=1)] = Field(
        default_factory=lambda: ["wikitext"]
    )
    max_length: Annotated[StrictInt, Field(ge=2)] = 2048
    batch_size: PositiveInt = 8
    limit: PositiveInt | None = None
    backend: Literal["native", "lm-eval", "both"] = "native"  # both: native metrics + lm-eval's, compared
    # Native evaluator on CUDA: replay forwards from CUDA graphs (falls back to eager, and says so
    # in the report, when a model cannot be captured). Off = plain eager forwards.
    cuda_graphs: StrictBool = True


class OutputConfig(_Table):
    """`[output]`. dir defaults to mxptq_output/<recipe file stem> (relative to the cwd)."""

    dir: TomlPath | None = None
    checkpoint: StrictBool = True


class FormatsConfig(_Table):
    """`[formats]`: default scale rule per format family (a selector's `scale_rule` wins)."""

    mxint_scale_rule: StrictStr | None = None
    mxfp_scale_rule: StrictStr | None = None


# --------------------------------------------------------------------------------------------
# Layer 2: semantic objects
# --------------------------------------------------------------------------------------------


class LinearConfig(_Table):
    """What a linear selector does. A None format = that tensor is not quantized.
    bypass: the selector claims the module (first match wins) but leaves it unquantized."""

    weight: FormatField | None = None
    data_in: FormatField | None = None
    bias: FormatField | None = None
    bypass: bool = False
    gptq: bool = False


class AttentionConfig(_Table):
    """What an attention selector does: one activation format per stage, None = bypassed."""

    qk_matmul: FormatField | None = None
    av_matmul: FormatField | None = None
    softmax: FormatField | None = None
    rope: FormatField | None = None
    kv_cache: FormatField | None = None


class Selector(_Table):
    pattern: str
    kind: Literal["linear", "attention"]
    config: LinearConfig | AttentionConfig


class GptqConfig(_Table):
    model_name: str | None = None
    format: FormatName = "mxint"
    dataset: Literal["wikitext2"] = "wikitext2"
    nsamples: int = 32
    seqlen: int = 512
    cali_batch_size: int = 8
    quantile_search: bool = False
    clip_search_y: bool = False
    checkpoint_dir: Path | None = None
    weight: FormatField
    seed: int = 0
    damp_percent: float = 0.01
    intra_block: Literal["joint", "column"] = "joint"
    split: Split | None = None
    refit: Refit = "none"
    act_order: bool = False


class Recipe(_Table):
    """A validated recipe. Build with `load_recipe(path)`; never mutate (frozen), use
    `with_overrides` for CLI flags."""

    by: SelectBy = "regex_name"
    selectors: list[Selector] = Field(default_factory=list)
    gptq: GptqConfig | None = None
    rotation: RotationConfig | None = None
    rotation_search: RotationSearchConfig | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    formats: FormatsConfig = Field(default_factory=FormatsConfig)
    source_path: Path | None = None  # not part of the hash

    @property
    def name(self) -> str:
        """The recipe's name in reports: the file stem ("tutorial_a_rtn")."""
        return self.source_path.stem if self.source_path is not None else "recipe"

    @property
    def model_name(self) -> str | None:
        """[model].name, else [gptq].model_name (tutorial), else None; --model overrides both."""
        if self.model.name is not None:
            return self.model.name
        return self.gptq.model_name if self.gptq is not None else None

    def require_model_name(self) -> str:
        name = self.model_name
        if name is None:
            raise RecipeError(
                f"{self.source_path or '<recipe>'}: [model.name] no model given; "
                "allowed: set [model].name or [gptq].model_name, or pass --model "
                "(an HF id, a local directory, a .gguf file or smollm2-135m)"
            )
        return name

    @property
    def output_dir(self) -> Path:
        if self.output.dir is not None:
            return self.output.dir
        return DEFAULT_OUTPUT_ROOT / self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-able canonical form (Formats as dicts, Paths as strings)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Inverse of to_dict (a recipe stored in a report or checkpoint)."""
        return cls.model_validate(dict(data))

    @property
    def sha256(self) -> str:
        """Hash of the canonical parsed recipe: TOML key order, comments and spelling variants
        (1 vs 1.0) do not change it; selector order does (first match wins)."""
        canonical = self.to_dict()
        canonical.pop("source_path", None)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def with_overrides(
        self,
        *,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        out: str | Path | None = None,
        data_dir: str | Path | None = None,
        limit: int | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
        backend: str | None = None,
    ) -> Recipe:
        """A copy with CLI flags applied (None = keep the recipe's value). Values are validated
        like the TOML keys they override; errors name the flag."""
        sections: dict[str, Any] = {}

        def override(section: str, flag: str, key: str, value: Any) -> None:
            if value is None:
                return
            current = sections.get(section, getattr(self, section))
            data = current.model_dump()
            data[key] = str(value) if isinstance(value, Path) else value
            try:
                sections[section] = type(current).model_validate(data)
            except ValidationError as exc:
                raise RecipeError(_validation_error_line(exc, f"{flag}", (), type(current), flag=flag)) from None

        override("model", "--model", "name", model)
        override("model", "--device", "device", device)
        override("model", "--dtype", "dtype", dtype)
        override("output", "--out", "dir", out)
        override("data", "--data-dir", "dir", data_dir)
        override("eval", "--limit", "limit", limit)
        override("eval", "--max-length", "max_length", max_length)
        override("eval", "--batch-size", "batch_size", batch_size)
        override("eval", "--backend", "backend", backend)
        if model is not None and self.gptq is not None:
            # One truth for the model: GPTQ calibrates the model that is actually loaded.
            sections["gptq"] = self.gptq.model_copy(update={"model_name": model})
        return self.model_copy(update=sections)


# --------------------------------------------------------------------------------------------
# Error lines
# --------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A key as it would be written in TOML: bare if possible, else a literal 'string'."""
    if _BARE_KEY.fullmatch(key):
        return key
    if "'" not in key and "\n" not in key:
        return f"'{key}'"
    return json.dumps(key)


def toml_path(parts: Sequence[str | int]) -> str:
    return ".".join(toml_key(p) for p in parts if isinstance(p, str))


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _got(value: Any) -> str:
    """'got string "4"', 'got table' (tables are not spelled out)."""
    kind = _toml_type(value)
    return f"got {kind}" if isinstance(value, dict) else f"got {kind} {_toml_value(value)}"


def _line(source: str, path: Sequence[str | int], problem: str, allowed: str | None = None) -> str:
    where = f"[{toml_path(path)}] " if path else ""
    tail = f"; allowed: {allowed}" if allowed else ""
    return f"{source}: {where}{problem}{tail}"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _model_at(cls: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel]:
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            break
        sub = _unwrap_model(cls.model_fields[part].annotation)
        if sub is None:
            break
        cls = sub
    return cls


def _validation_error_line(
    exc: ValidationError,
    source: str,
    prefix: Sequence[str | int],
    cls: type[BaseModel],
    *,
    flag: str | None = None,
) -> str:
    """Translate the first pydantic error into our one-line form, naming the TOML key."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    kind = err["type"]
    value = err.get("input")
    ctx = err.get("ctx") or {}
    path: tuple[str | int, ...] = () if flag else (*prefix, *loc)
    got = _got(value)

    if kind == "extra_forbidden":
        parent = _model_at(cls, loc[:-1])
        allowed = list(parent.model_fields)
        key = str(loc[-1])
        return _line(source, path, f"unknown key{_did_you_mean(key, allowed)}", ", ".join(allowed))
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(value, allowed) if isinstance(value, str) else ""
        problem = f"{_toml_value(value)} is not allowed{hint}" if isinstance(value, str) else f"expected a string, {got}"
        return _line(source, path, problem, ", ".join(allowed))
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bounds = [f"{symbols[name]} {ctx[name]}" for name in symbols if name in ctx]
        return _line(source, path, f"{_toml_value(value)} is out of range", " and ".join(bounds) or None)
    if kind == "finite_number":
        # pydantic checks finiteness before the range, so the range is read from the field itself.
        field = _model_at(cls, loc[:-1]).model_fields.get(str(loc[-1]))
        limits = {name: getattr(m, name) for m in getattr(field, "metadata", ()) for name in symbols if hasattr(m, name)}
        bounds = " and ".join(f"{symbols[name]} {limit}" for name, limit in limits.items())
        return _line(source, path, f"{_toml_value(value)} is not a finite number", f"a finite number {bounds}".strip())
    if kind == "too_short":
        return _line(source, path, "must not be empty", f"at least {ctx.get('min_length', 1)} entry")
    if kind == "string_pattern_mismatch":
        return _line(source, path, f"{_toml_value(value)} is not allowed", DEVICE_ALLOWED)
    if kind == "missing":
        return _line(source, path, "missing required key")
    expected = {
        "int_type": "an integer",
        "bool_type": "true or false",
        "string_type": "a string",
        "float_type": "a number",
        "list_type": "an array",
        "model_type": "a table",
        "dict_type": "a table",
        "model_attributes_type": "a table",
    }.get(kind)
    if expected is not None:
        return _line(source, path, f"expected {expected}, {got}")
    return _line(source, path, str(err["msg"]).removeprefix("Value error, "))


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class _Parser:
    """Turns a TOML dict into a Recipe, raising RecipeError on the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: Sequence[str | int], problem: str, allowed: str | None = None) -> RecipeError:
        return RecipeError(_line(self.source, path, problem, allowed))

    def table(self, cls: type[_Table], data: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(data, dict):
            raise self.fail(path, f"expected a table, {_got(data)}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_validation_error_line(exc, self.source, path, cls)) from None

    # -- formats ------------------------------------------------------------------------------
    # The format rules themselves (widths, OCP pairs, block size range, which scale rule applies
    # to which family) live in mxptq.formats; here we only decide which TOML key to blame.

    def scale_rule(self, value: str | None, path: tuple[str, ...], family: str | None) -> tuple[str, ...] | None:
        """Check a scale rule against the format family (if known); returns the key path it
        came from, or None when no rule is given."""
        if value is None:
            return None
        probe = {"mxint": {"width": 8}, "mxfp": {"exponent_width": 4, "frac_width": 3}}
        for name in [family] if family else list(probe):
            try:
                _formats_module().Format.from_keys(name, scale_rule=value, **probe[name])
            except FormatError as exc:
                raise self.fail(path, str(exc)) from None
        return path

    @staticmethod
    def rule_for(
        family: str | None, formats: FormatsConfig, *written: tuple[str | None, tuple[str, ...]]
    ) -> tuple[str | None, tuple[str, ...] | None]:
        """The scale rule that applies and where it was written: the most specific of `written`
        (sub-table, then selector), else [formats].<family>_scale_rule, else (None, None) = the
        format's default (defined once, in mxptq.formats)."""
        for value, path in written:
            if value is not None:
                return value, path
        if family is not None:
            key = f"{family}_scale_rule"
            value = getattr(formats, key)
            if value is not None:
                return value, ("formats", key)
        return None, None

    def format(
        self,
        path: tuple[str, ...],
        tensor: str,
        values: Mapping[str, Any],
        name: str | None,
        rule: tuple[str | None, tuple[str, ...] | None],
        name_path: tuple[str, ...],
    ) -> Any:
        """Build the Format of one tensor (`weight`, `data_in`, `bias`) from `<tensor>_*` keys,
        or None when none of them is given (that tensor is not quantized). `rule` is the scale
        rule and the key path it was written at (None, None = the format's default)."""
        Format = _formats_module().Format
        key = {part: f"{tensor}_{part}" for part in ("block_size", "width", "exponent_width", "frac_width")}
        given = {part: values[k] for part, k in key.items() if values.get(k) is not None}
        if not given:
            return None
        if name is None:
            raise self.fail(name_path, f"missing key 'name' (needed by the {tensor}_* keys)", "mxint, mxfp")
        element_keys = {part: given.get(part) for part in ("width", "exponent_width", "frac_width")}
        try:
            Format.from_keys(name, **element_keys)
        except FormatError as exc:
            raise self.fail((*path, key[self._element_key_to_blame(name, element_keys)]), str(exc)) from None
        block_size = given.get("block_size", 32)
        try:
            Format.from_keys(name, **element_keys, block_size=block_size)
        except FormatError as exc:
            raise self.fail((*path, key["block_size"]), str(exc)) from None
        scale_rule, rule_path = rule
        try:
            return Format.from_keys(name, **element_keys, block_size=block_size, scale_rule=scale_rule)
        except FormatError as exc:
            raise self.fail(rule_path or path, str(exc)) from None

    @staticmethod
    def _element_key_to_blame(name: str, element_keys: Mapping[str, int | None]) -> str:
        width, exp_bits, man_bits = element_keys["width"], element_keys["exponent_width"], element_keys["frac_width"]
        if name == "mxint":
            if exp_bits is not None:
                return "exponent_width"
            return "frac_width" if man_bits is not None else "width"
        if exp_bits is None:
            return "exponent_width"
        if man_bits is None:
            return "frac_width"
        if width is not None:
            try:  # the pair alone is fine -> the width disagrees with it
                _formats_module().Format.from_keys(name, exponent_width=exp_bits, frac_width=man_bits)
                return "width"
            except FormatError:
                pass
        return "exponent_width"

    # -- selectors ----------------------------------------------------------------------------

    def selector(self, pattern: str, data: Any, by: str, formats: FormatsConfig,
                 gptq: GptqConfig | None) -> Selector:
        path = (pattern,)
        if not isinstance(data, dict):
            if pattern.isidentifier():
                raise self.fail(path, f"unknown key{_did_you_mean(pattern, TOP_LEVEL_KEYS)}",
                                ", ".join(TOP_LEVEL_KEYS) + ", or a selector table")
            raise self.fail(path, f"expected a selector table, {_got(data)}")
        if by == "regex_name":
            try:
                re.compile(pattern)
            except re.error as exc:
                raise self.fail(path, f"invalid regular expression: {exc}",
                                "a Python regex, matched with re.fullmatch against module names") from None
        if any(stage in data for stage in ATTENTION_STAGES):
            return self.attention_selector(pattern, data, formats)
        table: LinearSelectorTable = self.table(LinearSelectorTable, data, path)
        rule = self.rule_for(table.name, formats, (table.scale_rule, (*path, "scale_rule")))
        values = table.model_dump()
        weight, data_in, bias = (
            self.format(path, tensor, values, table.name, rule, (*path, "name"))
            for tensor in ("weight", "data_in", "bias")
        )
        if table.gptq:
            if table.bypass:
                raise self.fail((*path, "gptq"), "gptq = true contradicts bypass = true",
                                "one of gptq = true, bypass = true")
            if gptq is None:
                raise self.fail((*path, "gptq"), "gptq = true needs a [gptq] table",
                                "add [gptq] with [gptq.weight_config], or set gptq = false")
            if weight is None:
                weight = gptq.weight  # inherit: GPTQ decides the weight format
            elif weight != gptq.weight:
                # IMPORTANT: transform's RTN pass must leave GPTQ weights unchanged, which only
                # holds when both use the same format.
                raise self.fail((*path, "weight_width"),
                                f"weight format {weight.label} differs from [gptq.weight_config] "
                                f"{gptq.weight.label}", f"{gptq.weight.label} when gptq = true")
        if table.bypass:
            weight = data_in = bias = None
        config = LinearConfig(weight=weight, data_in=data_in, bias=bias, bypass=table.bypass, gptq=table.gptq)
        return Selector(pattern=pattern, kind="linear", config=config)

    def attention_selector(self, pattern: str, data: dict[str, Any], formats: FormatsConfig) -> Selector:
        path = (pattern,)
        table: AttentionSelectorTable = self.table(AttentionSelectorTable, data, path)
        stages: dict[str, Any] = {}
        for stage in ATTENTION_STAGES:
            stage_table: AttentionStageTable | None = getattr(table, stage)
            stage_path = (*path, stage)
            if stage_table is None or stage_table.bypass or table.bypass:
                stages[stage] = None
                continue
            name = stage_table.name or table.name
            rule = self.rule_for(name, formats, (stage_table.scale_rule, (*stage_path, "scale_rule")),
                                 (table.scale_rule, (*path, "scale_rule")))
            name_path = (*stage_path, "name") if table.name is None else (*path, "name")
            fmt = self.format(stage_path, "data_in", stage_table.model_dump(), name, rule, name_path)
            if fmt is None:
                raise self.fail(stage_path, "neither bypass = true nor a data_in format",
                                "bypass = true, or data_in_block_size with data_in_width (mxint) or "
                                "data_in_exponent_width + data_in_frac_width (mxfp)")
            stages[stage] = fmt
        return Selector(pattern=pattern, kind="attention", config=AttentionConfig(**stages))

    # -- whole recipe ---------------------------------------------------------------------------

    def recipe(self, raw: dict[str, Any], source_path: Path | None) -> Recipe:
        by = raw.get("by", "regex_name")
        if by not in SelectBy.__args__:  # type: ignore[attr-defined]
            allowed = list(SelectBy.__args__)  # type: ignore[attr-defined]
            if not isinstance(by, str):
                raise self.fail(("by",), f"expected a string, {_got(by)}", ", ".join(allowed))
            raise self.fail(("by",), f"{_toml_value(by)} is not allowed{_did_you_mean(by, allowed)}", ", ".join(allowed))

        sections: dict[str, Any] = {}
        for name, cls in (("formats", FormatsConfig), ("model", ModelConfig), ("data", DataConfig),
                          ("eval", EvalConfig), ("output", OutputConfig),
                          ("rotation", RotationConfig), ("rotation_search", RotationSearchConfig)):
            if name in raw:
                sections[name] = self.table(cls, raw[name], (name,))
        formats: FormatsConfig = sections.get("formats", FormatsConfig())
        for family in ("mxint", "mxfp"):
            key = f"{family}_scale_rule"
            self.scale_rule(getattr(formats, key), ("formats", key), family)

        gptq = self.gptq(raw["gptq"], formats) if "gptq" in raw else None

        selectors = []
        for key, value in raw.items():
            if key in TOP_LEVEL_KEYS:
                continue
            close = difflib.get_close_matches(key, RESERVED_TABLES, n=1, cutoff=0.8)
            if close and isinstance(value, dict) and re.fullmatch(r"[a-z_]+", key):
                # e.g. [rotation_serach]: almost certainly a misspelt section, not a selector.
                raise self.fail((key,), f"unknown table (did you mean [{close[0]}]?)",
                                ", ".join(f"[{t}]" for t in RESERVED_TABLES) + ", or a selector table")
            selectors.append(self.selector(key, value, by, formats, gptq))

        output: OutputConfig = sections.get("output", OutputConfig())
        if output.dir is None:
            stem = source_path.stem if source_path is not None else "recipe"
            sections["output"] = output.model_copy(update={"dir": DEFAULT_OUTPUT_ROOT / stem})
        return Recipe(by=by, selectors=selectors, gptq=gptq, source_path=source_path, **sections)

    def gptq(self, data: Any, formats: FormatsConfig) -> GptqConfig:
        table: GptqTable = self.table(GptqTable, data, ("gptq",))
        path = ("gptq", "weight_config")
        if table.weight_config is None:
            raise self.fail(path, "missing table [gptq.weight_config] (the weight format GPTQ targets)",
                            "weight_block_size with weight_width (mxint) or weight_exponent_width + "
                            "weight_frac_width (mxfp)")
        rule = self.rule_for(table.format, formats, (table.weight_config.scale_rule, (*path, "scale_rule")))
        weight = self.format(path, "weight", table.weight_config.model_dump(), table.format, rule,
                             ("gptq", "format"))
        if weight is None:
            raise self.fail(path, "no weight format given",
                            "weight_block_size with weight_width (mxint) or weight_exponent_width + "
                            "weight_frac_width (mxfp)")
        fields = table.model_dump(exclude={"weight_config"})
        return GptqConfig(weight=weight, **fields)


def _toml_syntax_error_line(source: str, exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's tomllib only puts the position into the message: "... (at line 3, column 7)".
    text = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if match:
        return f"{source}: line {match[1]}, column {match[2]}: invalid TOML: {text[: match.start()]}"
    return f"{source}: invalid TOML: {text}"


def parse_recipe(text: str, source: str = "<recipe>", source_path: Path | None = None) -> Recipe:
    """Parse and validate recipe TOML text. `source` names it in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(_toml_syntax_error_line(source, exc)) from None
    return _Parser(source).recipe(raw, source_path)


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file. Raises RecipeError naming the file and key."""
    source = str(path)
    file_path = Path(path)
    if not file_path.exists():
        raise RecipeError(f"{source}: file not found; allowed: a path to a TOML recipe file")
    if not file_path.is_file():
        raise RecipeError(f"{source}: not a file; allowed: a path to a TOML recipe file")
    try:
        text = file_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "allowed: a UTF-8 TOML file") from None
    return parse_recipe(text, source, file_path)


def default_recipe(**overrides: Any) -> Recipe:
    """A recipe with no selectors (evaluates the unquantized model), e.g. for `eval-ppl --model`."""
    # Runs of different models must not overwrite each other's report: name the output after
    # the model (mxptq_output/eval-<model stem>) unless --out says otherwise.
    model = overrides.get("model")
    stem = Path(str(model)).name.removesuffix(".gguf") if model else "model"
    recipe = Recipe(output=OutputConfig(dir=DEFAULT_OUTPUT_ROOT / f"eval-{stem}"))
    return recipe.with_overrides(**overrides) if overrides else recipe
