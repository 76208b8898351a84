"""Stage "transform": swap the modules a recipe's selectors pick for their MX versions (RTN).

    quantize_model(model, recipe, ctx=None) -> model

Inputs: a loaded causal LM (eval mode), a validated `Recipe`. No calibration data.
Output: the same model object, modified in place: every selected `nn.Linear` becomes an
`MXLinear` (weight quantized once, here -- or kept, if the GPTQ stage already wrote MX weights into
it) unless its selector says `bypass = true` (then it stays an `nn.Linear`), every selected
attention module an `MXAttention`. Every MXLinear input quantizer of the model holds the same
`SharedInputCache` (q/k/v and gate/up quantize their common input once), stored on the model as
`model.mxptq_input_cache` (created by the first transform of a model, reused by later ones):
`model.mxptq_input_cache.enabled = False` switches sharing off, `.clear()` drops the held
result. Files written: none. When `ctx` carries a
report, the stage records its wall time/memory under `stages.transform` and its summary (per
selector: module count, formats, scale rules) under `transform` and `formats`.

Selection (DESIGN.md "Recipe", the tutorial's `quantize_module_transform_pass`):
  - by = "regex_name": `re.fullmatch(pattern, qualified_name)`;
  - by = "name": the qualified name, exactly;
  - by = "type": the module's class name ("Linear", "LlamaAttention") or its dotted path
    ("torch.nn.modules.linear.Linear").
Each module goes to the FIRST selector (TOML order) that matches it. A selector matching no
module is an error (typos are the common cause), as is a selector whose kind does not fit a
module it matches (a linear selector on a non-Linear, an attention selector on an unsupported
module). Matching walks `model.named_modules()` in registration order, so it is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mxptq.errors import ModelError, RecipeError
from mxptq.nn.attention import SUPPORTED_ATTENTION, MXAttention, is_supported_attention
from mxptq.nn.linear import MXLinear
from mxptq.nn.quantizer import SharedInputCache

_MAX_LISTED_NAMES = 40
INPUT_CACHE_ATTR = "mxptq_input_cache"  # the model's SharedInputCache (module docstring)


@dataclass
class SelectorSummary:
    pattern: str
    kind: str
    count: int
    modules: list[str]
    formats: dict[str, str | None]  # tensor/stage -> Format label (None = not quantized)
    scale_rules: list[str]
    bypass: bool = False
    gptq_weights: int = 0  # linears whose weights came from the GPTQ stage (not re-quantized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "kind": self.kind,
            "count": self.count,
            "modules": self.modules,
            "formats": self.formats,
            "scale_rules": self.scale_rules,
            "bypass": self.bypass,
            "gptq_weights": self.gptq_weights,
        }


@dataclass
class TransformSummary:
    """What `quantize_model` did, for the report."""

    by: str
    selectors: list[SelectorSummary] = field(default_factory=list)

    @property
    def num_linear(self) -> int:
        return sum(s.count for s in self.selectors if s.kind == "linear")

    @property
    def num_attention(self) -> int:
        return sum(s.count for s in self.selectors if s.kind == "attention")

    def formats(self) -> dict[str, Any]:
        """Distinct formats and scale rules in use (report key `formats`)."""
        labels = sorted({label for s in self.selectors for label in s.formats.values() if label is not None})
        rules = sorted({rule for s in self.selectors for rule in s.scale_rules})
        return {"formats": labels, "scale_rules": rules}

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "num_linear": self.num_linear,
            "num_attention": self.num_attention,
            "selectors": [s.to_dict() for s in self.selectors],
        }


def _matcher(by: str, pattern: str) -> Callable[[str, nn.Module], bool]:
    if by == "regex_name":
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise RecipeError(f"selector {pattern!r}: not a valid regular expression ({err})") from err
        return lambda name, module: regex.fullmatch(name) is not None
    if by == "name":
        return lambda name, module: name == pattern
    if by == "type":

        def by_type(name: str, module: nn.Module) -> bool:
            cls = type(module)
            return pattern in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")

        return by_type
    raise RecipeError(f"by = {by!r} is not a selection mode; allowed: regex_name, name, type")


def _fits(kind: str, module: nn.Module) -> bool:
    if kind == "linear":
        return type(module) is nn.Linear
    return is_supported_attention(module)


def _kind_error(selector: Any, name: str, module: nn.Module) -> ModelError:
    cls = type(module).__name__
    if isinstance(module, (MXLinear, MXAttention)):
        return ModelError(f"selector {selector.pattern!r}: module {name!r} is already MX-quantized ({cls})")
    expected = "torch.nn.Linear" if selector.kind == "linear" else ", ".join(SUPPORTED_ATTENTION)
    return ModelError(
        f"selector {selector.pattern!r} ({selector.kind}) matches module {name!r} of class {cls}, "
        f"which a {selector.kind} selector cannot quantize; expected: {expected}"
    )


def _name_sample(model: nn.Module, kind: str) -> str:
    """Module names a selector of `kind` could match, layer indices folded ("model.layers.<i>.mlp")."""
    names: list[str] = []
    for name, module in model.named_modules():
        if name and _fits(kind, module):
            folded = re.sub(r"\.\d+(?=\.|$)", ".<i>", name)
            if folded not in names:
                names.append(folded)
    if not names:
        names = [name for name, _ in model.named_modules() if name]
    shown = ", ".join(names[:_MAX_LISTED_NAMES])
    more = f", ... ({len(names) - _MAX_LISTED_NAMES} more)" if len(names) > _MAX_LISTED_NAMES else ""
    return shown + more


def match_selectors(model: nn.Module, recipe: Any) -> list[tuple[Any, list[str]]]:
    """-> [(selector, [qualified module names])] in TOML order; every module at most once.

    Raises ModelError for a selector that matches nothing (listing the names it could match) or
    matches a module its kind cannot quantize."""
    selectors = list(recipe.selectors)
    matchers = [_matcher(recipe.by, s.pattern) for s in selectors]
    matched: list[list[str]] = [[] for _ in selectors]
    for name, module in model.named_modules():
        for index, (selector, matches) in enumerate(zip(selectors, matchers)):
            if matches(name, module):
                if not _fits(selector.kind, module):
                    raise _kind_error(selector, name, module)
                matched[index].append(name)
                break  # first selector in TOML order wins
    for selector, names in zip(selectors, matched):
        if not names:
            raise ModelError(
                f"selector {selector.pattern!r} (by = {recipe.by}, {selector.kind}) matches no module of "
                f"{type(model).__name__}; {selector.kind} modules: {_name_sample(model, selector.kind)}"
            )
    return list(zip(selectors, matched))


def _linear_formats(config: Any) -> dict[str, Any]:
    return {key: getattr(config, key, None) for key in ("weight", "data_in", "bias")}


def _attention_formats(config: Any) -> dict[str, Any]:
    return {
        key: getattr(config, key, None) for key in ("rope", "kv_cache", "qk_matmul", "softmax", "av_matmul")
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def transform_model(model: nn.Module, recipe: Any) -> TransformSummary:
    """Swap modules in place; return what was done. (The stage function is `quantize_model`.)"""
    matches = match_selectors(model, recipe)
    summary = TransformSummary(by=recipe.by)
    # Deepest modules first, so a parent's replacement picks up its already-swapped children
    # (MXAttention keeps q/k/v/o_proj under the same names either way).
    jobs = sorted(
        ((name, selector) for selector, names in matches for name in names),
        key=lambda job: job[0].count("."),
        reverse=True,
    )
    gptq_count: dict[int, int] = {}
    cache = _input_cache(model)
    for name, selector in jobs:
        source = model.get_submodule(name)
        if selector.kind == "linear" and getattr(selector.config, "bypass", False):
            continue  # claimed by the selector (first match wins) but left an nn.Linear
        if selector.kind == "linear":
            replacement: nn.Module = MXLinear(source, selector.config, name=name, input_cache=cache)
            if replacement.weight_source == "gptq":
                gptq_count[id(selector)] = gptq_count.get(id(selector), 0) + 1
        else:
            replacement = MXAttention(source, selector.config, name=name)
        _set_submodule(model, name, replacement)

    for selector, names in matches:
        config = selector.config
        bypass = bool(getattr(config, "bypass", False))
        fmts = _linear_formats(config) if selector.kind == "linear" else _attention_formats(config)
        if bypass:
            fmts = {key: None for key in fmts}
        summary.selectors.append(
            SelectorSummary(
                pattern=selector.pattern,
                kind=selector.kind,
                count=len(names),
                modules=names,
                formats={key: (f.label if f is not None else None) for key, f in fmts.items()},
                scale_rules=sorted({_rule_name(f) for f in fmts.values() if f is not None}),
                bypass=bypass,
                gptq_weights=gptq_count.get(id(selector), 0),
            )
        )
    return summary


def _input_cache(model: nn.Module) -> SharedInputCache:
    """The model's one SharedInputCache, created (and stored on it) on first use."""
    cache = getattr(model, INPUT_CACHE_ATTR, None)
    if not isinstance(cache, SharedInputCache):
        cache = SharedInputCache()
        setattr(model, INPUT_CACHE_ATTR, cache)
    return cache


def _rule_name(fmt: Any) -> str:
    rule = fmt.scale_rule
    return str(getattr(rule, "value", rule))


def quantize_model(model: nn.Module, recipe: Any, ctx: Any = None) -> nn.Module:
    """Stage function (module docstring). Returns the same model, transformed in place."""
    report = getattr(ctx, "report", None)
    if report is None:
        transform_model(model, recipe)
        return model
    with report.stage("transform"):
        summary = transform_model(model, recipe)
    report["transform"] = summary.to_dict()
    report["formats"] = summary.formats()
    return model
