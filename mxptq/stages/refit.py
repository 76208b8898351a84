"""Stage `refit`: a second GPTQ pass on the quantized model (`[gptq] refit`, issue 22).

    run_refit(model, reference_layers, recipe, ctx) -> model

Why: stage `gptq` fits each linear's quantized weight Q to its inputs with the *weights-only*
model (activation quantizers are not applied then), minimising ||X Wᵀ − X Qᵀ||. The quantized
model feeds the linear something else: X̃, its own activations (earlier layers quantized, the
input MX-quantized, online rotations applied). Once the transform and the rotation search have
fixed those quantizers, this stage fits every GPTQ linear again on X̃:

  refit = "quantized_inputs"  GPTQ of W under H̃ = X̃ᵀX̃: minimise ||X̃ Wᵀ − X̃ Qᵀ||, the weight
                              error on the inputs the linear will really see.
  refit = "asymmetric"        GPTAQ's asymmetric calibration (Li et al., 2025): minimise
                              ||X Wᵀ − X̃ Qᵀ||, the unquantized linear's output from the quantized
                              input, X from a copy of the unquantized layers.

"asymmetric" in closed form, so one GPTQ implementation serves both: with
W* = W (XᵀX̃ + λI)(H̃ + λI)⁻¹, the minimiser of ||X Wᵀ − X̃ Qᵀ||² + λ||Q − W||²,
    ||X Wᵀ − X̃ Qᵀ||² + λ||Q − W||² = ||X̃ (W* − Q)ᵀ||² + λ||W* − Q||² + const
(a least-squares residual is orthogonal to the columns of the design matrix), i.e. GPTQ of the
target W* under H̃ with GPTQ's own damping λ = damp_percent · mean diag H̃. The ridge pulls
towards W rather than 0: with (H̃ + λI)⁻¹ alone, directions the calibration barely visits lost
their weights and the demo model's word perplexity went from 105 to 459.

Measured on the demo model (CPU, 3 test documents, benchmarks/cpu_config_d/README.md): config C
105.0; + "quantized_inputs" 103.8; + "asymmetric" 310.7. Where activation noise is large (W4A4
on a 135M model), the least-squares target is a Wiener filter: it shrinks every output towards
its mean, which is optimal for each linear alone and compounds over 30 layers. Hence
"quantized_inputs" for the demo's D recipes; "asymmetric" stays available for larger models,
where the published gains are (and can be measured by a user with the GPU to spare).

Lifecycle (in the pipeline: rotate -> gptq -> transform -> rotsearch -> refit):
  1. `reference_layers`: a copy of the decoder layers taken before any weight was quantized
     (after `[rotation]` when present, so both share its basis): the W each refit starts from.
  2. The inputs of decoder layer 0 on `[gptq]`'s calibration windows, captured once from the
     quantized model (embeddings are never quantized, so both models start from them).
  3. Per layer, per group of linears that read one input (q/k/v, o, gate/up, down), in forward
     order, with the layer's earlier groups already refit: accumulate over all calibration tokens
     H̃ = 2/N X̃ᵀX̃ (X̃: the quantized layer's input of the linear, after its input quantizer)
     and, for "asymmetric", C = 2/N XᵀX̃ and Hx = 2/N XᵀX (X: the reference layer's input);
     then `mx_gptq` (same scale search, intra-block rule and damping as stage gptq) and Q
     written into the `MXLinear`'s weight buffer.
  4. Each model's layer outputs are its next layer's inputs (GPTQ's sequential calibration).

Refit: exactly the linears stage gptq calibrated (`MXLinear.weight_source == "gptq"`), in their
weight format. Report section `gptq_refit`: the mode, per layer and linear the relative error
sqrt(E(Q) / E0) of the first pass's weights ("before") and the refit ones ("after"), where E is
the mode's objective (quantized_inputs: ||X̃ (W − Q)ᵀ||², E0 = ||X̃ Wᵀ||²; asymmetric:
||X Wᵀ − X̃ Qᵀ||², E0 = ||X Wᵀ||²); seconds and peak memory.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from mxptq.errors import ModelError
from mxptq.nn.linear import MXLinear
from mxptq.stages.gptq import (
    _calibration_windows,
    _capture_first_layer_inputs,
    _forward,
    _hessian,
    _input_groups,
    _LayerInput,
    _linear_inputs,
    _peak,
    _relative,
    _reset_peak,
    _run_on_device,
    _track,
    decoder_layers,
    gptq_settings,
    stacked_gptq,
)
from mxptq.stages.gptq_math import output_energy, output_error

OBJECTIVES = {
    "quantized_inputs": "||X~ W^T - X~ Q^T||: the weight error on the quantized model's inputs",
    "asymmetric": "||X W^T - X~ Q^T||: the unquantized linear's output from the quantized model's input",
}


def run_refit(
    model: nn.Module,
    reference_layers: nn.ModuleList,
    recipe: Any,
    ctx: Any,
    *,
    windows: torch.Tensor | None = None,
) -> nn.Module:
    """The stage (module docstring): refit weights written into the model; ctx.report section.
    reference_layers: a copy of the unquantized decoder layers (the weights W the refit starts
        from; for "asymmetric" also the stream of unquantized inputs X).
    windows: calibration token ids [n, seqlen]; default `[gptq]`'s windows (same seed and split)."""
    cfg = recipe.gptq
    mode = cfg.refit
    settings = gptq_settings(recipe, ctx)
    device = settings.device
    _, layers = decoder_layers(model)
    if len(reference_layers) != len(layers):
        raise ModelError(f"GPTQ refit: {len(reference_layers)} unquantized layers for a model of {len(layers)}")
    asymmetric = mode == "asymmetric"
    if windows is None:
        windows = _calibration_windows(recipe, ctx)
    start = time.perf_counter()
    _reset_peak(device)
    quantized = _capture_first_layer_inputs(model, layers[0], windows, cfg.cali_batch_size, device)
    reference = None
    if asymmetric:
        reference = [_LayerInput(b.hidden.clone(), b.args, b.kwargs) for b in quantized]
    summary: dict[str, Any] = {
        "mode": mode,
        "objective": OBJECTIVES[mode],
        "scale_search": settings.scale_search,
        "intra_block": settings.intra_block,
        "damp_percent": settings.damp_percent,
        "act_order": settings.act_order,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "layers": [],
    }
    for index in _track(range(len(layers)), "GPTQ refit layers", enabled=bool(getattr(ctx, "progress", True))):
        layer_start = time.perf_counter()
        ref_layer = reference_layers[index]
        home = next(ref_layer.parameters()).device
        ref_layer.to(device)
        try:
            with torch.no_grad():
                record = _refit_layer(layers[index], ref_layer, reference, quantized, settings)
                if asymmetric:
                    reference = _forward(ref_layer, reference)
                quantized = _run_on_device(
                    layers[index], device, lambda layer, batches=quantized: _forward(layer, batches)
                )
        finally:
            ref_layer.to(home)
        record.update(index=index, seconds=round(time.perf_counter() - layer_start, 4))
        summary["layers"].append(record)
    del reference, quantized
    summary.update(_totals(summary["layers"]))
    summary["wall_s"] = round(time.perf_counter() - start, 4)
    summary["peak_mem_bytes"] = _peak(device) if device.type == "cuda" else None
    report = getattr(ctx, "report", None)
    if report is not None:
        report["gptq_refit"] = summary
    return model


def _refit_layer(
    layer: nn.Module,
    ref_layer: nn.Module,
    reference: list[_LayerInput] | None,
    quantized: list[_LayerInput],
    settings: Any,
) -> dict[str, Any]:
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, MXLinear) and m.weight_source == "gptq"}
    record: dict[str, Any] = {"linears": {}}
    if not linears:
        return record
    for group in _input_groups(layer, linears, quantized[0]):
        first = linears[group[0]]
        H_q = _hessian(layer, first, quantized, first.input_quantizer)  # H̃, on X̃
        if reference is not None:  # asymmetric
            C, H_x = _cross_statistics(layer, first, ref_layer, ref_layer.get_submodule(group[0]), reference, quantized)
        weights = {name: ref_layer.get_submodule(name).weight.detach().to(torch.float32) for name in group}
        for fmt in dict.fromkeys(linears[name].weight_fmt for name in group):
            names = [name for name in group if linears[name].weight_fmt == fmt]
            # quantized_inputs: GPTQ of W itself on X̃; asymmetric: of the least-squares target
            targets = [weights[name] if reference is None
                       else least_squares_target(weights[name], H_q, C, settings.damp_percent) for name in names]
            Qs, stats = stacked_gptq(targets, H_q, fmt, settings)
            for name, Q in zip(names, Qs):
                mx, W = linears[name], weights[name]
                before = mx.weight.detach().to(torch.float32, copy=True)  # the buffer is overwritten below
                mx.weight.copy_(Q.to(mx.weight.dtype))
                after = mx.weight.to(torch.float32)
                if reference is None:
                    energy = output_energy(W, H_q)
                    errors = output_error(W, before, H_q), output_error(W, after, H_q)
                else:
                    energy = output_energy(W, H_x)
                    errors = asymmetric_error(W, before, H_q, C, H_x), asymmetric_error(W, after, H_q, C, H_x)
                record["linears"][name] = {
                    "format": fmt.label,
                    "output_energy": energy,
                    "error_before": errors[0],
                    "error_after": errors[1],
                    "rel_error_before": _relative(errors[0], energy),
                    "rel_error_after": _relative(errors[1], energy),
                    "damp_percent": stats.damp_percent,
                    "fallback_rtn": stats.fallback_rtn,
                }
    return record


def _cross_statistics(
    layer: nn.Module,
    linear: MXLinear,
    ref_layer: nn.Module,
    ref_linear: nn.Linear,
    reference: list[_LayerInput],
    quantized: list[_LayerInput],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, Hx) = 2/N (XᵀX̃, XᵀX) over every calibration token (fp32), batch for batch."""
    n = linear.in_features
    device = linear.weight.device
    C, H_x = (torch.zeros(n, n, dtype=torch.float32, device=device) for _ in range(2))
    tokens = 0
    pairs = zip(_linear_inputs(ref_layer, ref_linear, reference), _linear_inputs(layer, linear, quantized,
                                                                            linear.input_quantizer))
    for x, x_q in pairs:
        if x.shape != x_q.shape:
            raise ModelError(f"GPTQ refit: reference and quantized inputs differ in shape ({x.shape} vs {x_q.shape})")
        C.addmm_(x.t(), x_q)
        H_x.addmm_(x.t(), x)
        tokens += x.shape[0]
    scale = 2.0 / max(tokens, 1)
    return C.mul_(scale), H_x.mul_(scale)


def least_squares_target(W: torch.Tensor, H_q: torch.Tensor, C: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """W* = W (C + λI)(H̃ + λI)⁻¹, C = XᵀX̃ (2/N-scaled like H̃), λ = damp_percent · mean diag H̃:
    argmin_Q ||X Wᵀ − X̃ Qᵀ||² + λ||Q − W||² (module docstring). The ridge pulls towards W, not
    towards 0: directions the calibration tokens barely visit keep the model's weights instead of
    being zeroed (which is what (H̃ + λI)⁻¹ alone does, and what held-out text then pays for).
    With X̃ = X it gives W for every λ. fp64 solve, fp32 result."""
    A = H_q.double()
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    damp = damp_percent * float(torch.diagonal(A).mean())
    # W* = W B A⁻¹ with B = C + λI, A = H̃ + λI symmetric  <=>  W*ᵀ = A⁻¹ Bᵀ Wᵀ
    return torch.linalg.solve(A + damp * eye, (C.double() + damp * eye).t() @ W.double().t()).t().to(torch.float32)


def asymmetric_error(W: torch.Tensor, Q: torch.Tensor, H_q: torch.Tensor, C: torch.Tensor, H_x: torch.Tensor) -> float:
    """E(Q) = 2/N ||X Wᵀ − X̃ Qᵀ||² = tr(W Hx Wᵀ) − 2 tr(W C Qᵀ) + tr(Q H̃ Qᵀ), in fp64."""
    W, Q = W.double(), Q.double()
    value = (
        torch.einsum("ij,jk,ik->", W, H_x.double(), W)
        - 2 * torch.einsum("ij,jk,ik->", W, C.double(), Q)
        + torch.einsum("ij,jk,ik->", Q, H_q.double(), Q)
    )
    return max(float(value), 0.0)


def _totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    linears = [s for layer in layers for s in layer["linears"].values()]
    energy = sum(s["output_energy"] for s in linears)
    return {
        "rel_error_before": _relative(sum(s["error_before"] for s in linears), energy),
        "rel_error_after": _relative(sum(s["error_after"] for s in linears), energy),
        "refit_linears": len(linears),
    }
