"""Stage `rotsearch`: greedy per-matmul-type online Hadamard rotation (tutorial config C).

Input: a quantized model (after `transform`: `MXLinear` modules with an `input_quantizer`, MX
attention modules with `k/v/q/p_quantizer`). Output: the same model with `.rotation` set on the
activation quantizers of the winning matmul types, so each computes Hᵀ·Q(H·x) (weights
untouched, so GPTQ weights stay valid; DESIGN.md "Online rotation"). Calibration: `calib_nsamples`
windows of `calib_seqlen` tokens from the `[rotation_search].split` (default `[data].calib_split`)
of WikiText-2, seeded by `[rotation_search].seed`. Writes the decisions JSON at `cache_path`.

What is rotated, per matmul type:
  q/k/v/o/gate/up/down_proj  the linear's input activation, along in_features
  kv_cache                   K (after RoPE) and V, along head_dim
  qk_matmul                  Q, along head_dim
  av_matmul                  P along the key axis: block-diagonal H_B over the P quantizer's MX
                             blocks (the key-axis length varies; see `hadamard.KeyAxisRotation`)

The greedy search (tutorial "Config C"): score = token perplexity of the model on the
calibration windows. Each round tries every remaining candidate type switched on in all layers
at once (on top of the winners so far), and commits the best one if it improves the current
score by more than `improvement_eps`; it stops when none does or none remain.

- `improvement_eps` is *relative* (the tutorial does not say): commit when
  best < current · (1 − improvement_eps). A relative threshold means the same for a model at
  perplexity 10 and at 50. With the tutorial's 0.0 it is "strictly better".
- Ties are broken by the order of `matmul_types` (deterministic).
- Candidates that cannot change anything are skipped without a forward, with the reason
  recorded: not in the model, activation quantizer bypassed in every layer, or no rotation
  for the size.

Cache: the JSON at `cache_path` records baseline, winners in order, every trial of every round,
skips, the rotation used per size, forwards and wall time, and `input_hash`, a sha256 over the
recipe sections that change the search (`[rotation_search]` except `cache_path`, the selectors,
`[gptq]`, `[formats]`, model dtype/attention), the quantized model's fingerprint (every tensor's
bytes and every quantizer's format), the calibration windows' token ids and the mxptq version;
and `content_hash`, a sha256 over the rest of the record, so a hand-edited `winners` (or score)
is not applied as if searched (issue 30). A cache with the same `input_hash` and an intact
`content_hash` is applied with no forward pass; any other (or an unreadable) cache is recomputed
and overwritten, and the report says why.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxptq import __version__
from mxptq.io import atomic_write_json, tensor_sha256
from mxptq.nn.hadamard import KeyAxisRotation, RotationSizeError, get_rotation

CACHE_SCHEMA = "mxptq.rotation_decisions/1"
IMPROVEMENT_RULE = "relative: commit the best trial when best < current * (1 - improvement_eps)"
LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# attention matmul type -> quantizer attributes of the MX attention module it rotates
ATTENTION_QUANTIZERS = {
    "kv_cache": ("k_quantizer", "v_quantizer"),
    "qk_matmul": ("q_quantizer",),
    "av_matmul": ("p_quantizer",),
}


# ---------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One matmul type: the quantizers it rotates and the rotation for each."""

    matmul_type: str
    sites: list[tuple[str, Any, Any]] = field(default_factory=list)  # (site name, quantizer, rotation)

    def enable(self) -> None:
        for _, quantizer, rotation in self.sites:
            quantizer.rotation = rotation

    def disable(self) -> None:
        for _, quantizer, _ in self.sites:
            quantizer.rotation = None

    def rotation_summary(self) -> list[dict]:
        """Distinct rotations used (one entry per size), for the cache and the report."""
        seen: dict[str, dict] = {}
        for _, _, rotation in self.sites:
            entry = rotation.to_dict()
            seen.setdefault(json.dumps(entry, sort_keys=True), entry)
        return list(seen.values())


def _key_axis_rotation_supported(quantizer: Any, rotation: KeyAxisRotation) -> bool:
    """Does this quantizer class apply `rotation.conjugate` (needed for the varying key axis)?
    Probed on a row whose length is not a multiple of the block: a quantizer that composes
    forward/inverse itself returns the padded length."""
    probe = type(quantizer)(quantizer.fmt, rotation)
    row = torch.ones(1, rotation.block + 1)
    try:
        return probe(row).shape == row.shape
    except (RuntimeError, ValueError):
        return False


def collect_candidates(model: nn.Module, matmul_types: list[str]) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates in `matmul_types` order, and {matmul type: reason} for the skipped ones."""
    found: dict[str, list[tuple[str, Any, int | None]]] = {t: [] for t in matmul_types}
    for name, module in model.named_modules():
        quantizer = getattr(module, "input_quantizer", None)
        if quantizer is not None and getattr(module, "matmul_type", None) in found:
            found[module.matmul_type].append((name, quantizer, module.in_features))
        elif isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in found:
            # A plain nn.Linear: its selector bypasses it, or no selector picked it.
            found[name.rsplit(".", 1)[-1]].append((name, None, module.in_features))
        for attention_type, attrs in ATTENTION_QUANTIZERS.items():
            if attention_type in found and all(hasattr(module, a) for a in attrs):
                size = None if attention_type == "av_matmul" else module.head_dim
                found[attention_type].extend((f"{name}.{a}", getattr(module, a), size) for a in attrs)

    candidates, skipped = [], {}
    for matmul_type in matmul_types:
        sites = found[matmul_type]
        if not sites:
            skipped[matmul_type] = "not present in the model"
            continue
        active = [(n, q, size) for n, q, size in sites if q is not None and q.fmt is not None]
        unfused = [site for site in active if getattr(site[1], "fused_rotation", None) is None]
        if active and not unfused:
            skipped[matmul_type] = "input already rotated online with the rotation folded into the weight ([rotation] online)"
            continue
        active = unfused
        if not active:
            skipped[matmul_type] = (
                "activation not quantized in any layer (bypassed or not selected): a rotation cannot change anything"
            )
            continue
        candidate = Candidate(matmul_type)
        try:
            for site, quantizer, size in active:
                if size is None:
                    rotation = KeyAxisRotation(quantizer.fmt.block_size)
                    if not _key_axis_rotation_supported(quantizer, rotation):
                        raise RotationSizeError(
                            f"{type(quantizer).__name__} does not apply Rotation.conjugate, which the "
                            "variable-length key axis needs"
                        )
                else:
                    rotation = get_rotation(size, block_size=quantizer.fmt.block_size)
                candidate.sites.append((site, quantizer, rotation))
        except RotationSizeError as exc:
            skipped[matmul_type] = f"no rotation: {exc}"
            continue
        candidates.append(candidate)
    return candidates, skipped


# ---------------------------------------------------------------- the search
def greedy_search(
    candidates: list[Candidate], score: Callable[[], float], improvement_eps: float
) -> dict[str, Any]:
    """Greedy forward selection. `score()` evaluates the model as it currently is (lower is
    better). Leaves the winners enabled and every other candidate disabled. Returns
    {"baseline", "final", "winners", "rounds"}; each round lists every trial's score."""
    for candidate in candidates:
        candidate.disable()
    order = {c.matmul_type: i for i, c in enumerate(candidates)}
    baseline = current = score()
    remaining = list(candidates)
    winners: list[str] = []
    rounds: list[dict[str, Any]] = []
    while remaining:
        trials: dict[str, float] = {}
        for candidate in remaining:
            candidate.enable()
            trials[candidate.matmul_type] = score()
            candidate.disable()
        # NaN/inf (a diverged trial) never wins; ties go to the earlier matmul type.
        best = min(remaining, key=lambda c: (_finite_or_inf(trials[c.matmul_type]), order[c.matmul_type]))
        best_score = _finite_or_inf(trials[best.matmul_type])
        committed = best_score < current * (1.0 - improvement_eps)
        rounds.append(
            {
                "round": len(rounds) + 1,
                "current": _json_float(current),
                "trials": {t: _json_float(s) for t, s in trials.items()},
                "best": best.matmul_type,
                "committed": committed,
            }
        )
        if not committed:
            break
        best.enable()
        winners.append(best.matmul_type)
        current = best_score
        remaining.remove(best)
    return {"baseline": baseline, "final": current, "winners": winners, "rounds": rounds}


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _json_float(value: float) -> float | None:
    """JSON has no NaN/inf: a diverged score is stored as null."""
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------- hashing
def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every state tensor (name, dtype, shape, bytes) and every activation quantizer's
    format: what the quantized model computes, GPTQ weights included."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    # Sorted: a set's order changes with PYTHONHASHSEED, and so did the cache key (issue 30).
    attributes = sorted(
        {"input_quantizer", "rope_quantizer", "scores_quantizer"}
        | {a for attrs in ATTENTION_QUANTIZERS.values() for a in attrs}
    )
    for name, module in model.named_modules():
        for attr in attributes:
            quantizer = getattr(module, attr, None)
            if quantizer is not None and hasattr(quantizer, "fmt"):
                label = quantizer.fmt.label if quantizer.fmt is not None else "bypass"
                digest.update(f"{name}.{attr}={label}|".encode())
    return digest.hexdigest()


def search_inputs(recipe: Any, model: nn.Module, windows: torch.Tensor) -> dict[str, Any]:
    """Everything the search result depends on (hashed into `input_hash`)."""
    data = recipe.to_dict()
    rotation_search = dict(data.get("rotation_search") or {})
    rotation_search.pop("cache_path", None)  # where the cache lives does not change its content
    gptq = dict(data.get("gptq") or {})
    gptq.pop("checkpoint_dir", None)
    model_section = data.get("model") or {}
    return {
        "rotation_search": rotation_search,
        "by": data.get("by"),
        "selectors": data.get("selectors"),
        "gptq": gptq or None,
        "formats": data.get("formats"),
        **({"rotation": data["rotation"]} if data.get("rotation") is not None else {}),
        "model": {k: model_section.get(k) for k in ("dtype", "attn_implementation")},
        "model_fingerprint": model_fingerprint(model),
        "calibration_windows_sha256": tensor_sha256(windows),
        "improvement_rule": IMPROVEMENT_RULE,
        "mxptq_version": __version__,
    }


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def input_hash(inputs: dict[str, Any]) -> str:
    return _json_sha256(inputs)


def content_hash(record: dict[str, Any]) -> str:
    """sha256 of a decisions record less its own `content_hash`: the winners applied on a hit and
    the scores and rotations the report copies from it."""
    return _json_sha256({k: v for k, v in record.items() if k != "content_hash"})


# ---------------------------------------------------------------- cache
def read_cache(path: Path, inputs: dict[str, Any]) -> tuple[dict | None, str]:
    """(cache, status) for the current search inputs. status: "hit", "missing",
    "stale: ... <changed inputs>", "corrupt: ..." or "unreadable: ..."; only a hit returns the cache."""
    if not path.exists():
        return None, "missing"
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"unreadable: {exc}"
    if not isinstance(cache, dict) or cache.get("schema") != CACHE_SCHEMA:
        return None, f"unreadable: not a {CACHE_SCHEMA} file"
    if cache.get("input_hash") != input_hash(inputs):
        old = cache.get("inputs") if isinstance(cache.get("inputs"), dict) else {}
        changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        return None, f"stale: recomputed because these inputs changed: {', '.join(changed) or 'unknown'}"
    if cache.get("content_hash") != content_hash(cache):
        return None, "corrupt: recomputed because the decisions do not match their content_hash (edited?)"
    return cache, "hit"


# ---------------------------------------------------------------- stage
def run_rotation_search(model: nn.Module, recipe: Any, ctx: Any) -> nn.Module:
    """Stage `rotsearch` (see the module docstring). Returns the model with the winning
    rotations set; records a `rotation` section in `ctx.report` when there is one.

    ctx (`mxptq.context.RunContext`): `tokenizer`; `data`, the WikiText source (when None,
    `mxptq.data.WikiText(recipe.data.dir)` is opened); `device`, where the model is scored (the
    model is moved there); `force`, recompute even when the cache matches; `report`."""
    from mxptq.data import WikiText, calibration_windows
    from mxptq.evaluate import calib_perplexity

    cfg = recipe.rotation_search
    if cfg is None:
        return model
    start = time.perf_counter()
    device = getattr(ctx, "device", None)
    if device is not None:
        model.to(device)
    split = cfg.split or recipe.data.calib_split
    source = getattr(ctx, "data", None) or WikiText(recipe.data.dir)
    windows = calibration_windows(
        ctx.tokenizer, source, split, cfg.calib_nsamples, cfg.calib_seqlen, cfg.seed
    )

    candidates, skipped = collect_candidates(model, list(cfg.matmul_types))
    by_type = {c.matmul_type: c for c in candidates}
    inputs = search_inputs(recipe, model, windows)
    expected = input_hash(inputs)
    cache_path = Path(cfg.cache_path) if cfg.cache_path is not None else None

    if cache_path is None:
        cache, status = None, "disabled (no cache_path)"
    elif getattr(ctx, "force", False):
        cache, status = None, "ignored (--force): recomputed"
    else:
        cache, status = read_cache(cache_path, inputs)
    if cache is not None and all(w in by_type for w in cache["winners"]):
        for candidate in candidates:
            candidate.disable()
        for winner in cache["winners"]:
            by_type[winner].enable()
        result = dict(cache, cache_status="hit", forwards_this_run=0)
    else:
        if cache is not None:  # same hash but a winner is no longer a candidate: internal drift
            status = "stale: a cached winner is not a candidate any more"
        forwards = 0

        def score() -> float:
            nonlocal forwards
            forwards += 1
            with torch.no_grad():
                return float(calib_perplexity(model, windows))

        search = greedy_search(candidates, score, cfg.improvement_eps)
        result = {
            "schema": CACHE_SCHEMA,
            "input_hash": expected,
            "inputs": inputs,
            "metric": "token perplexity on the calibration windows",
            "calibration": {
                "split": split,
                "nsamples": cfg.calib_nsamples,
                "seqlen": cfg.calib_seqlen,
                "seed": cfg.seed,
                "source": getattr(source, "source", None),
            },
            "improvement_eps": cfg.improvement_eps,
            "improvement_rule": IMPROVEMENT_RULE,
            "baseline": _json_float(search["baseline"]),
            "final": _json_float(search["final"]),
            "winners": search["winners"],
            "rounds": search["rounds"],
            "candidates": [c.matmul_type for c in candidates],
            "skipped": skipped,
            "rotations": {c.matmul_type: c.rotation_summary() for c in candidates},
            "score_evaluations": forwards,
            "device": str(device) if device is not None else None,
            "wall_time_s": round(time.perf_counter() - start, 3),
        }
        result["content_hash"] = content_hash(result)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, result)
        result = dict(result, cache_status=status, forwards_this_run=forwards)

    report = getattr(ctx, "report", None)
    if report is not None:
        report["rotation"] = {
            "cache_path": str(cache_path) if cache_path is not None else None,
            "cache_status": result["cache_status"],
            "winners": result["winners"],
            "baseline": result["baseline"],
            "final": result["final"],
            "rounds": result["rounds"],
            "skipped": result["skipped"],
            "rotations": {w: result["rotations"][w] for w in result["winners"]},
            "improvement_rule": IMPROVEMENT_RULE,
            "score_evaluations_this_run": result["forwards_this_run"],
            "search_wall_time_s": result["wall_time_s"],
            "input_hash": expected,
        }
    return model
