"""GPTQ stage: layer-by-layer MX-aware GPTQ over a decoder-only model (issue 6, config B).

    run_gptq(model, recipe, ctx, *, windows=None, force=None) -> model

Inputs: an unquantized Hugging Face causal LM whose decoder layers form one `nn.ModuleList`
(Llama family: `model.model.layers`), the recipe's `[gptq]` section and its linear selectors with
`gptq = true`. Calibration: `[gptq].nsamples` windows of `[gptq].seqlen` tokens from WikiText-2
(`[gptq].split`, else `[data].calib_split`; seeded by `[gptq].seed`), or `windows` when given.

Lifecycle (the GPTQ reference's "sequential" driver, Frantar et al. 2022):
  1. capture the inputs of decoder layer 0 (hidden states plus the keyword arguments the model
     passes its layers: position embeddings, attention mask...) with a forward pre-hook that
     stops the model there;
  2. for each layer, on the accelerator (the model itself stays where it is, normally the CPU;
     one layer and the calibration activations live on the device):
       - find the layer's GPTQ linears in forward order and group those that read the same
         input tensor (q/k/v, gate/up): one Hessian H = 2/N sum x x^T (fp32) per group;
       - group by group ("true sequential"): accumulate H from the layer's current weights
         (earlier groups already quantized, so o_proj/down_proj see the inputs the quantized
         model will produce), run `mx_gptq` once on the group's stacked weights (the rows of a
         GPTQ problem are independent, so this equals one run per linear), write Q into the
         `nn.Linear` weights in the model dtype and set `linear._mxptq_gptq_fmt = fmt`;
       - recompute the layer's outputs with the quantized weights: the next layer's inputs;
  3. with `[gptq].checkpoint_dir`: each finished layer is saved (gptq_checkpoint.py); a rerun
     loads the finished layers, recomputes the inputs of the first missing layer through them and
     continues: the final weights are bit-identical to an uninterrupted run.

Only weights are quantized during calibration: activation quantizers (data_in, KV cache) are not
applied, as in the tutorial's reference pass (its `[gptq]` runs before the module transform).

Weight format of a linear: its selector's weight format, which must equal [gptq.weight_config]
(else RecipeError: GPTQ weights for one grid would be re-rounded onto another by the transform);
a `gptq = true` selector without weight keys uses [gptq.weight_config]. Scale search:
`clip_search_y = true` -> "output" (minimise ||X dW^T|| per block; with `quantile_search` too,
the clip-ratio candidates are the same, so output wins), else `quantile_search` -> "quantile",
else "absmax". `gptq = true` linears outside the decoder layers are not calibrated (listed in the
report as skipped; the transform rounds them).

Results go to `ctx.report["gptq"]` (when ctx has a report): settings, per layer and per linear
the relative output error sqrt(tr(dW H dW^T) / tr(W H W^T)) = ||X dW^T|| / ||X W^T|| of GPTQ and
of RTN for the same linear, the damping used, seconds and peak accelerator memory per layer.
`gptq_calibrate` does the work and returns that dict.

ctx attributes read (all optional except where noted): device, tokenizer + data (needed unless
`windows` is given), report, force, model_info (its fingerprint keys the checkpoint; without it
the weights are fingerprinted here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mxptq import __version__
from mxptq.errors import DataError, ModelError, RecipeError
from mxptq.formats import Format, quantize
from mxptq.io import tensor_sha256
from mxptq.stages.gptq_checkpoint import LayerCheckpoints
from mxptq.stages.gptq_math import mx_gptq, output_energy, output_error

GPTQ_FORMAT_ATTR = "_mxptq_gptq_fmt"  # read by mxptq.nn.linear.MXLinear


@dataclass
class _LayerInput:
    """One calibration batch at a decoder layer's input: what the model passes the layer."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _StopForward(Exception):
    """Raised by our hooks to end a forward pass once they have what they need."""


@dataclass(frozen=True)
class _Settings:
    device: torch.device
    scale_search: str
    intra_block: str
    damp_percent: float
    act_order: bool = False


def gptq_settings(recipe: Any, ctx: Any) -> _Settings:
    """`[gptq]`'s algorithm settings (stage gptq and stage refit run the same GPTQ)."""
    cfg = recipe.gptq
    return _Settings(
        device=_device(ctx, recipe),
        scale_search="output" if cfg.clip_search_y else "quantile" if cfg.quantile_search else "absmax",
        intra_block=cfg.intra_block,
        damp_percent=cfg.damp_percent,
        act_order=cfg.act_order,
    )


def run_gptq(
    model: nn.Module, recipe: Any, ctx: Any, *, windows: torch.Tensor | None = None, force: bool | None = None
) -> nn.Module:
    """The GPTQ stage (module docstring): GPTQ weights written into the model's linears."""
    summary = gptq_calibrate(model, recipe, ctx, windows=windows, force=force)
    report = getattr(ctx, "report", None)
    if report is not None:
        report["gptq"] = summary
    return model


def gptq_calibrate(
    model: nn.Module, recipe: Any, ctx: Any, *, windows: torch.Tensor | None = None, force: bool | None = None
) -> dict[str, Any]:
    """`run_gptq` without touching ctx.report: -> the report dict (module docstring)."""
    cfg = recipe.gptq
    if cfg is None:
        raise RecipeError(f"{recipe.source_path or '<recipe>'}: [gptq] is missing; the GPTQ stage needs it")
    prefix, layers = decoder_layers(model)
    per_layer, skipped = _gptq_linears(model, recipe, prefix, len(layers))
    settings = gptq_settings(recipe, ctx)
    if windows is None:
        windows = _calibration_windows(recipe, ctx)
    force = bool(getattr(ctx, "force", False)) if force is None else force
    store = None
    if cfg.checkpoint_dir is not None:
        store = LayerCheckpoints(
            cfg.checkpoint_dir,
            _checkpoint_inputs(model, recipe, ctx, per_layer, windows, settings),
            len(layers),
        )
    finished = store.open(force=force) if store is not None else {}

    summary: dict[str, Any] = {
        "scale_search": settings.scale_search,
        "intra_block": settings.intra_block,
        "damp_percent": settings.damp_percent,
        "act_order": settings.act_order,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "cali_batch_size": cfg.cali_batch_size,
        "split": cfg.split or recipe.data.calib_split,
        "seed": cfg.seed,
        "device": str(settings.device),
        "checkpoint_dir": None if cfg.checkpoint_dir is None else str(cfg.checkpoint_dir),
        "skipped_linears": skipped,
        "layers": [],
    }
    start = time.perf_counter()
    first_missing = 0
    while first_missing < len(layers) and first_missing in finished:
        _load_layer(store, first_missing, per_layer[first_missing], model)
        summary["layers"].append({**finished[first_missing], "from_checkpoint": True})
        first_missing += 1
    peak = 0
    if first_missing < len(layers):
        _reset_peak(settings.device)
        batches = _capture_first_layer_inputs(model, layers[0], windows, cfg.cali_batch_size, settings.device)
        for index in range(first_missing):  # inputs of the first missing layer, through the finished ones
            batches = _run_on_device(
                layers[index], settings.device, lambda layer, inputs=batches: _forward(layer, inputs)
            )
        peak = _peak(settings.device) or 0
        todo = range(first_missing, len(layers))
        for index in _track(todo, "GPTQ layers", enabled=bool(getattr(ctx, "progress", True))):
            record, batches = _quantize_layer(
                index, layers[index], per_layer[index], model, batches, settings
            )
            if store is not None:
                store.save_layer(index, _layer_tensors(model, per_layer[index]), record)
            summary["layers"].append({**record, "from_checkpoint": False})
            peak = max(peak, record["peak_mem_bytes"] or 0)
        del batches
    summary.update(_totals(summary["layers"]))
    summary["wall_s"] = round(time.perf_counter() - start, 4)
    summary["peak_mem_bytes"] = peak if settings.device.type == "cuda" else None
    return summary


# -- one layer -----------------------------------------------------------------------------------


def _quantize_layer(
    index: int,
    layer: nn.Module,
    formats: dict[str, Format],
    model: nn.Module,
    batches: list[_LayerInput],
    settings: _Settings,
) -> tuple[dict[str, Any], list[_LayerInput]]:
    """GPTQ of one decoder layer (module docstring, step 2) -> (report record, next inputs)."""
    start = time.perf_counter()
    _reset_peak(settings.device)
    linears = {name: model.get_submodule(name) for name in formats}
    record: dict[str, Any] = {"index": index, "linears": {}}

    def work(layer_on_device: nn.Module) -> list[_LayerInput]:
        for group in _input_groups(layer_on_device, linears, batches[0]):
            H = _hessian(layer_on_device, linears[group[0]], batches)
            for fmt in dict.fromkeys(formats[name] for name in group):
                names = [name for name in group if formats[name] == fmt]
                record["linears"].update(_gptq_linears_sharing_h(names, linears, H, fmt, settings))
            del H
        return _forward(layer_on_device, batches)

    outputs = _run_on_device(layer, settings.device, work)
    record.update(_totals([record]) if record["linears"] else {"rel_error": None, "rel_error_rtn": None})
    if settings.device.type == "cuda":
        torch.cuda.synchronize(settings.device)
    record["seconds"] = round(time.perf_counter() - start, 4)
    record["peak_mem_bytes"] = _peak(settings.device)
    return record, outputs


def _gptq_linears_sharing_h(
    names: list[str], linears: dict[str, nn.Linear], H: torch.Tensor, fmt: Format, settings: _Settings
) -> dict[str, dict[str, Any]]:
    """mx_gptq on the stacked weights of linears that share H; write back; per-linear stats."""
    weights = [linears[name].weight for name in names]
    Qs, stats = stacked_gptq([weight.detach() for weight in weights], H, fmt, settings)
    out: dict[str, dict[str, Any]] = {}
    for name, weight, Q in zip(names, weights, Qs):
        W_model = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(Q.to(weight.dtype))
        setattr(linears[name], GPTQ_FORMAT_ATTR, fmt)
        energy = output_energy(W_model, H)
        out[name] = {
            "format": fmt.label,
            "shared_hessian_with": [other for other in names if other != name],
            "output_error": output_error(W_model, weight, H),
            "output_error_rtn": output_error(W_model, quantize(W_model, fmt), H),
            "output_energy": energy,
            "damp_percent": stats.damp_percent,
            "cholesky_retries": stats.cholesky_retries,
            "fallback_rtn": stats.fallback_rtn,
            "dead_columns": stats.dead_columns,
        }
        out[name]["rel_error"] = _relative(out[name]["output_error"], energy)
        out[name]["rel_error_rtn"] = _relative(out[name]["output_error_rtn"], energy)
    return out


def stacked_gptq(
    targets: list[torch.Tensor], H: torch.Tensor, fmt: Format, settings: _Settings
) -> tuple[list[torch.Tensor], Any]:
    """One `mx_gptq` over the stacked rows of several weights that share H (the rows of a GPTQ
    problem are independent, so this equals one run per weight, with one Cholesky of H)."""
    Q, stats = mx_gptq(
        torch.cat([target.to(torch.float32) for target in targets]),
        H,
        fmt,
        damp_percent=settings.damp_percent,
        scale_search=settings.scale_search,
        intra_block=settings.intra_block,
        act_order=settings.act_order,
    )
    return list(Q.split([target.shape[0] for target in targets])), stats


def _input_groups(layer: nn.Module, linears: dict[str, nn.Linear], batch: _LayerInput) -> list[list[str]]:
    """The layer's GPTQ linears in forward order, consecutive ones that read the very same input
    tensor grouped (q/k/v; gate/up). Found by running one batch with hooks that keep references
    to the inputs, so no tensor memory can be reused and `is` is a safe identity test."""
    calls: list[tuple[str, torch.Tensor]] = []
    names_of = {id(module): name for name, module in linears.items()}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls.append((names_of[id(module)], args[0]))

    handles = [module.register_forward_pre_hook(record) for module in linears.values()]
    try:
        layer(batch.hidden, *batch.args, **batch.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    previous: torch.Tensor | None = None
    for name, x in calls:
        if name in seen:
            continue  # a linear called twice is calibrated on its first call's input only
        seen.add(name)
        if groups and x is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = x
    missing = sorted(set(linears) - seen)
    if missing:
        raise ModelError(
            f"GPTQ: linears {missing} are selected with gptq = true but their layer's forward never calls them"
        )
    return groups


def _linear_inputs(
    layer: nn.Module, linear: nn.Module, batches: list[_LayerInput], transform: Any = None
) -> Iterator[torch.Tensor]:
    """Per batch, the [tokens, in_features] fp32 input `linear` multiplies in `layer`'s forward,
    after `transform` when given (stage refit: the quantized linear's input quantizer). Each
    forward is stopped at the linear's input (nothing after it is needed)."""
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if transform is None else transform(args[0])
        captured.append(x.reshape(-1, module.in_features).to(torch.float32))
        raise _StopForward

    for batch in batches:
        handle = linear.register_forward_pre_hook(grab)
        try:
            layer(batch.hidden, *batch.args, **batch.kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ModelError("GPTQ: a layer's forward never called one of its calibrated linears")
        yield captured.pop()


def _hessian(layer: nn.Module, linear: nn.Module, batches: list[_LayerInput], transform: Any = None) -> torch.Tensor:
    """H = 2/N sum x x^T (fp32) over the inputs x of `linear` on all calibration tokens (after
    `transform`, see `_linear_inputs`)."""
    columns = linear.in_features
    H = torch.zeros(columns, columns, dtype=torch.float32, device=linear.weight.device)
    n_tokens = 0
    for x in _linear_inputs(layer, linear, batches, transform):
        H.addmm_(x.t(), x)
        n_tokens += x.shape[0]
    return H.mul_(2.0 / max(n_tokens, 1))


def _forward(layer: nn.Module, batches: list[_LayerInput]) -> list[_LayerInput]:
    """The layer's outputs for every batch, as inputs of the next layer (same kwargs)."""
    outputs = []
    for batch in batches:
        out = layer(batch.hidden, *batch.args, **batch.kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out  # transformers < 5 returns a tuple
        outputs.append(_LayerInput(hidden, batch.args, batch.kwargs))
    return outputs


def _run_on_device(layer: nn.Module, device: torch.device, work: Any) -> Any:
    """Move one layer to the accelerator, run `work(layer)` without autograd, move it back."""
    home = next(layer.parameters()).device
    layer.to(device)
    try:
        with torch.no_grad():
            return work(layer)
    finally:
        layer.to(home)


# -- model structure and selectors ---------------------------------------------------------------


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder layers: the longest ModuleList named *layers
    (Llama, Mistral, Qwen...) or *h (GPT-2 style)."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h") and len(module)
    ]
    if not candidates:
        raise ModelError(
            f"GPTQ: {type(model).__name__} has no list of decoder layers (a ModuleList named 'layers')"
        )
    return max(candidates, key=lambda item: len(item[1]))


def _gptq_linears(
    model: nn.Module, recipe: Any, prefix: str, n_layers: int
) -> tuple[list[dict[str, Format]], list[str]]:
    """-> ([{linear name: weight Format}] per decoder layer, gptq linears outside the layers)."""
    from mxptq.stages.transform import match_selectors

    cfg = recipe.gptq
    per_layer: list[dict[str, Format]] = [{} for _ in range(n_layers)]
    skipped: list[str] = []
    for selector, names in match_selectors(model, recipe):
        config = selector.config
        if selector.kind != "linear" or not config.gptq or config.bypass:
            continue
        if config.weight is not None and config.weight != cfg.weight:
            raise RecipeError(
                f"{recipe.source_path or '<recipe>'}: ['{selector.pattern}'] weight format {config.weight.label} "
                f"differs from [gptq.weight_config] {cfg.weight.label}; allowed: the same format in both "
                "(GPTQ computes weights for one grid)"
            )
        fmt = config.weight if config.weight is not None else cfg.weight
        for name in names:
            index = _layer_index(name, prefix)
            if index is None:
                skipped.append(name)
            else:
                per_layer[index][name] = fmt
    return per_layer, skipped


def _layer_index(name: str, prefix: str) -> int | None:
    head = prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _layer_tensors(model: nn.Module, formats: dict[str, Format]) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": model.get_submodule(name).weight.detach() for name in formats}


def _load_layer(
    store: LayerCheckpoints | None, index: int, formats: dict[str, Format], model: nn.Module
) -> None:
    """Write a finished layer's saved GPTQ weights into the model (checked shapes and dtypes)."""
    assert store is not None
    expected = {
        f"{name}.weight": (
            tuple(model.get_submodule(name).weight.shape),
            model.get_submodule(name).weight.dtype,
        )
        for name in formats
    }
    tensors = store.load_layer(index, expected)
    for name, fmt in formats.items():
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(tensors[f"{name}.weight"])
        setattr(linear, GPTQ_FORMAT_ATTR, fmt)


# -- calibration inputs --------------------------------------------------------------------------


def _capture_first_layer_inputs(
    model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[_LayerInput]:
    """Run the model on each calibration batch up to decoder layer 0 and keep what it receives
    (the GPTQ reference's "Catcher", as a pre-hook: works whatever keyword arguments the model
    passes its layers, e.g. transformers 5's position_embeddings)."""
    captured: list[_LayerInput] = []

    def catch(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(
            _LayerInput(hidden.to(device), _to_device(tuple(args[1:]), device), _to_device(kwargs, device))
        )
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    embed_device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            for ids in windows.split(batch_size):
                try:
                    model(input_ids=ids.to(embed_device), use_cache=False)
                except _StopForward:
                    continue
                raise ModelError("GPTQ: the model's forward did not reach its first decoder layer")
    finally:
        handle.remove()
    return captured


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _calibration_windows(recipe: Any, ctx: Any) -> torch.Tensor:
    from mxptq.data import WikiText, calibration_windows

    cfg = recipe.gptq
    tokenizer = getattr(ctx, "tokenizer", None)
    if tokenizer is None:
        raise DataError("GPTQ calibration needs the model's tokenizer to build calibration windows")
    source = getattr(ctx, "data", None) or WikiText(recipe.data.dir)
    split = cfg.split or recipe.data.calib_split
    return calibration_windows(tokenizer, source, split, cfg.nsamples, cfg.seqlen, cfg.seed)


# -- checkpoint key, device, report helpers -------------------------------------------------------


def _checkpoint_inputs(
    model: nn.Module,
    recipe: Any,
    ctx: Any,
    per_layer: list[dict[str, Format]],
    windows: torch.Tensor,
    settings: _Settings,
) -> dict[str, Any]:
    """Everything the GPTQ weights depend on, by name (a mismatch names the ones that changed)."""
    gptq_section = recipe.gptq.model_dump(mode="json")
    # Where the checkpoint lives and what the model is called do not change the result (the
    # weights fingerprint identifies the model); the resolved split does.
    gptq_section.pop("checkpoint_dir", None)
    gptq_section.pop("model_name", None)
    gptq_section.pop("refit", None)  # a later stage (refit.py); this pass is the same either way
    gptq_section["split"] = recipe.gptq.split or recipe.data.calib_split
    model_info = getattr(ctx, "model_info", None)
    fingerprint = getattr(model_info, "fingerprint", None) or _weights_fingerprint(model)
    dtype = next(model.parameters()).dtype
    return {
        "model weights": fingerprint,
        "[gptq] section": gptq_section,
        # The offline rotation changes the weights GPTQ starts from (the fingerprint is taken
        # at load time, before it), and its seed changes them again.
        "[rotation] section": None if recipe.rotation is None else recipe.rotation.model_dump(mode="json"),
        "gptq linears and their weight formats": {
            name: fmt.to_dict() for formats in per_layer for name, fmt in formats.items()
        },
        "calibration windows": tensor_sha256(windows),
        "model dtype": str(dtype),
        "attention implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "device type": settings.device.type,
        "mxptq version": __version__,
        "torch version": torch.__version__,
    }


def _weights_fingerprint(model: nn.Module) -> str:
    from mxptq.models import weights_sha256  # the same fingerprint load_model puts in ModelInfo

    return weights_sha256(model)


def _device(ctx: Any, recipe: Any) -> torch.device:
    from mxptq.models import resolve_device

    device = getattr(ctx, "device", None)
    if isinstance(device, torch.device):
        return device
    return resolve_device(device if device is not None else recipe.model.device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _relative(error: float, energy: float) -> float | None:
    return math.sqrt(error / energy) if energy > 0 and math.isfinite(error) else None


def _totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate relative errors sqrt(sum error / sum energy) over the linears of `layers`."""
    linears = [stats for layer in layers for stats in layer.get("linears", {}).values()]
    energy = sum(stats["output_energy"] for stats in linears)
    return {
        "rel_error": _relative(sum(stats["output_error"] for stats in linears), energy),
        "rel_error_rtn": _relative(sum(stats["output_error_rtn"] for stats in linears), energy),
        "max_damp_percent": max((stats["damp_percent"] for stats in linears), default=None),
        "fallback_rtn_linears": [
            name
            for layer in layers
            for name, stats in layer.get("linears", {}).items()
            if stats["fallback_rtn"]
        ],
    }


def _track(iterable: Iterable[int], description: str, *, enabled: bool) -> Iterable[int]:
    from mxptq.progress import track

    return track(iterable, description) if enabled else iterable
