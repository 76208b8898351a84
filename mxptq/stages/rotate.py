"""Stage `rotate`: rotations folded into the weights, before GPTQ (issue 22, config D).

    run_rotation(model, recipe, ctx) -> model

Input: an unquantized causal LM of the pre-norm RMSNorm layout (Llama, Mistral, Qwen2, Qwen3:
`SUPPORTED_NORMS`) and the recipe's `[rotation]` table. Output: the same model, changed in place,
computing the same function (up to rounding: in float32 the logits agree to ~1e-5), with its
weights expressed in rotated bases where MX blocks see no outlier channels. No calibration data,
no files. Run before GPTQ, so GPTQ fits the rotated weights on rotated inputs ("GPTQ after
rotation"). QuaRot (Ashkboos et al. 2024, section 4) names the rotations R1..R4; we follow it:

R1, `residual = true` -- the residual stream h becomes R1 h, R1 = H_n · diag(s) (n = hidden size,
    H_n the normalized Hadamard matrix of `mxptq.nn.hadamard.hadamard_matrix`, e.g. 576 =
    H_36 ⊗ H_16, s random signs). RMSNorm commutes with an orthogonal map only without its scale,
    so first every norm scale is folded into the linears that read the norm's output
    (W <- W diag(w), w <- 1). Then every reader of the stream (q/k/v, gate/up, lm_head) gets
    W <- W R1ᵀ, every writer (o_proj, down_proj) W <- R1 W (bias <- R1 b), the embedding
    E <- E R1ᵀ (its rows are stream vectors). Tied input/output embeddings are untied first (the
    embedding and the head now need different matrices) and `config.tie_word_embeddings` is
    cleared, so a saved checkpoint rebuilds them untied.
R2, `heads = true` -- per attention head, the values v become R2 v (R2 a random-sign Hadamard of
    head_dim, one per layer): v_proj rows of each KV head R2 W_v,h (bias too), o_proj columns of
    each query head W_o,h R2ᵀ. Attention mixes values linearly, so the head outputs carry R2 and
    o_proj undoes it. The KV cache then stores rotated values.
R4-style, `online = ["down_proj"]` -- the input x of each listed linear is rotated at run time by a
    plain Hadamard H (the `get_rotation` construction the activation kernels know) and Hᵀ is
    folded into the weight: W <- W Hᵀ, so W x = (W Hᵀ)(H x). The nn.Linear gets a forward
    pre-hook that rotates its input (GPTQ's Hessian hooks, registered later, see H x) and the
    attribute `mxptq.nn.linear.INPUT_ROTATION_ATTR`, from which MXLinear sets its input
    quantizer's `fused_rotation`: quantize(H x) feeds the quantized W Hᵀ. Only linears a
    (non-bypassed) linear selector quantizes are rotated, since a checkpoint restores the
    rotation through the MX module; others are listed as skipped in the report.
R3 (Q/K before the KV cache) needs no weight change: rotation search's `kv_cache` candidate
    already quantizes K as Hᵀ Q(H k), which gives q·k the same value as rotating both.

Arithmetic: each weight is transformed in float64 on `ctx.device` and rounded once to its dtype.
The signs come from one `torch.Generator` seeded by `[rotation].seed`, drawn in a fixed order
(R1, then R2 layer by layer), so a recipe gives the same rotated model on any machine. The report
section `offline_rotation` lists what was rotated, with which matrix and why anything was left out.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from mxptq.errors import ModelError
from mxptq.nn.hadamard import RotationSizeError, get_rotation, hadamard_matrix
from mxptq.nn.linear import INPUT_ROTATION_ATTR

# RMSNorm classes computing w * x / rms(x) (so a scale folds into the next linear and the rest
# commutes with an orthogonal map). Gemma's (1 + w) norms and post-norm layouts are refused.
SUPPORTED_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Norms inside a layer that act on per-head Q/K (Qwen3), untouched by R1 and R2.
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


class _RotateInput:
    """Forward pre-hook of a linear whose weight holds W Hᵀ: its input becomes H x."""

    def __init__(self, rotation: Any) -> None:
        self.rotation = rotation

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.rotation.forward(args[0]), *args[1:])


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """R = H_n diag(s), float64 [n, n], orthogonal, s in {-1, +1}^n drawn from `generator`."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs[None, :]


def run_rotation(model: nn.Module, recipe: Any, ctx: Any) -> nn.Module:
    """The stage (module docstring). Records `offline_rotation` in ctx.report."""
    cfg = recipe.rotation
    if cfg is None:
        return model
    start = time.perf_counter()
    device = getattr(ctx, "device", None) or torch.device("cpu")
    summary = rotate_model(model, cfg, device, online_linears(model, recipe, cfg.online))
    summary["wall_s"] = round(time.perf_counter() - start, 4)
    report = getattr(ctx, "report", None)
    if report is not None:
        report["offline_rotation"] = summary
    return model


def online_linears(model: nn.Module, recipe: Any, types: list[str]) -> dict[str, int | None]:
    """{linear name: MX block size of its input (None: input not quantized)} for the linears of
    the `online` types that a non-bypassed linear selector claims."""
    from mxptq.stages.transform import match_selectors

    wanted = set(types)
    chosen: dict[str, int | None] = {}
    for selector, names in match_selectors(model, recipe):
        if selector.kind != "linear" or selector.config.bypass:
            continue
        data_in = selector.config.data_in
        for name in names:
            if name.rsplit(".", 1)[-1] in wanted:
                chosen[name] = data_in.block_size if data_in is not None else None
    return chosen


def rotate_model(
    model: nn.Module, cfg: Any, device: torch.device, online: dict[str, int | None]
) -> dict[str, Any]:
    """R1 (cfg.residual), R2 (cfg.heads), then the online linears; -> the report section."""
    from mxptq.stages.gptq import decoder_layers

    prefix, layers = decoder_layers(model)
    _check_layout(model, prefix, layers)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    summary: dict[str, Any] = {"seed": cfg.seed, "residual": None, "heads": None, "online": {}, "skipped": {}}
    if cfg.residual:
        summary["residual"] = _rotate_residual(model, layers, generator, device)
    if cfg.heads:
        summary["heads"] = _rotate_heads(model, layers, generator, device)
    for name, linear in layers.named_modules(prefix=prefix):
        matmul_type = name.rsplit(".", 1)[-1]
        if not isinstance(linear, nn.Linear) or matmul_type not in cfg.online:
            continue
        if name not in online:
            summary["skipped"][name] = "not quantized by a linear selector (a checkpoint could not restore it)"
            continue
        rotation = _online_rotation(linear.in_features, online[name] or 32, name)
        _transform(linear, "weight", lambda W, r=rotation: r.forward(W), device)
        linear.register_forward_pre_hook(_RotateInput(rotation))
        setattr(linear, INPUT_ROTATION_ATTR, rotation)
        summary["online"].setdefault(matmul_type, {"rotation": rotation.to_dict(), "count": 0})
        summary["online"][matmul_type]["count"] += 1
    return summary


def _online_rotation(n: int, block_size: int, name: str) -> Any:
    try:
        return get_rotation(n, block_size=block_size)
    except RotationSizeError as exc:
        raise ModelError(f"[rotation] online: {name}: {exc}") from None


# -- R1 ------------------------------------------------------------------------------------------


def _rotate_residual(
    model: nn.Module, layers: nn.ModuleList, generator: torch.Generator, device: torch.device
) -> dict[str, Any]:
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    hidden = embed.weight.shape[1]
    R1 = _hadamard_or_error(hidden, generator, "[rotation] residual: hidden size").to(device)
    untied = head is not None and head.weight is embed.weight
    if untied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    folded = 0
    for layer in layers:
        for norm_name, readers in READERS.items():
            _fold_norm(layer.get_submodule(norm_name), [layer.get_submodule(r) for r in readers], device)
            folded += 1
        for reader in (r for readers in READERS.values() for r in readers):
            _transform(layer.get_submodule(reader), "weight", lambda W: W @ R1.T, device)
        for writer in WRITERS:
            linear = layer.get_submodule(writer)
            _transform(linear, "weight", lambda W: R1 @ W, device)
            if linear.bias is not None:
                _transform(linear, "bias", lambda b: b @ R1.T, device)
    final_norm = _final_norm(model)
    if head is not None:
        _fold_norm(final_norm, [head], device)
        folded += 1
        _transform(head, "weight", lambda W: W @ R1.T, device)
    _transform(embed, "weight", lambda E: E @ R1.T, device)
    return {"n": hidden, "matrix": f"random-sign {_describe(hidden)}", "untied_embeddings": untied,
            "folded_norms": folded}


def _fold_norm(norm: nn.Module, readers: list[nn.Module], device: torch.device) -> None:
    """w * x / rms(x) read by W: W diag(w) reads x / rms(x); the norm's scale becomes 1."""
    w = norm.weight.detach().to(device=device, dtype=torch.float64)
    for linear in readers:
        _transform(linear, "weight", lambda W: W * w[None, :], device)
    with torch.no_grad():
        norm.weight.fill_(1.0)


# -- R2 ------------------------------------------------------------------------------------------


def _rotate_heads(
    model: nn.Module, layers: nn.ModuleList, generator: torch.Generator, device: torch.device
) -> dict[str, Any]:
    head_dim = None
    for layer in layers:
        attn = layer.self_attn
        v_proj, o_proj = attn.v_proj, attn.o_proj
        head_dim = int(getattr(attn, "head_dim", 0) or model.config.head_dim)
        R2 = _hadamard_or_error(head_dim, generator, "[rotation] heads: head_dim").to(device)

        def rotate_rows(W: torch.Tensor, R2=R2, hd=head_dim) -> torch.Tensor:  # per KV head: R2 W_h
            return torch.einsum("ij,hjk->hik", R2, W.reshape(-1, hd, W.shape[-1])).reshape(W.shape)

        _transform(v_proj, "weight", rotate_rows, device)
        if v_proj.bias is not None:
            _transform(v_proj, "bias", lambda b, R2=R2, hd=head_dim: (b.reshape(-1, hd) @ R2.T).reshape(-1),
                       device)
        _transform(o_proj, "weight",  # per query head: W_o,h R2ᵀ
                   lambda W, R2=R2, hd=head_dim: (W.reshape(W.shape[0], -1, hd) @ R2.T).reshape(W.shape),
                   device)
    return {"n": head_dim, "matrix": f"random-sign {_describe(head_dim)} per layer", "layers": len(layers)}


# -- helpers -------------------------------------------------------------------------------------


def _hadamard_or_error(n: int, generator: torch.Generator, what: str) -> torch.Tensor:
    try:
        return random_hadamard(n, generator)
    except RotationSizeError as exc:
        raise ModelError(f"{what} {n} has no Hadamard matrix ({exc}); set it to false") from None


def _describe(n: int) -> str:
    return get_rotation(n).description if n else "-"


def _transform(module: nn.Module, attr: str, fn: Any, device: torch.device) -> None:
    """module.<attr> <- fn(module.<attr>) computed in float64 on `device`, rounded once."""
    tensor = getattr(module, attr)
    with torch.no_grad():
        result = fn(tensor.detach().to(device=device, dtype=torch.float64))
        tensor.copy_(result.to(dtype=tensor.dtype, device=tensor.device))


def _final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    if norm is None or type(norm).__name__ not in SUPPORTED_NORMS:
        raise _layout_error(model, "no final RMSNorm at model.norm")
    return norm


def _check_layout(model: nn.Module, prefix: str, layers: nn.ModuleList) -> None:
    """Refuse, in one line, models whose layers are not the pre-norm RMSNorm layout above."""
    _final_norm(model)
    expected = set(READERS) | {r for readers in READERS.values() for r in readers} | set(WRITERS)
    for index, layer in enumerate(layers):
        names = dict(layer.named_modules())
        missing = sorted(n for n in expected if n not in names)
        if missing:
            raise _layout_error(model, f"{prefix}.{index} has no {', '.join(missing)}")
        for name, module in names.items():
            is_norm = "norm" in type(module).__name__.lower()
            if not is_norm or name in HEAD_NORMS:
                continue
            if name not in READERS:
                raise _layout_error(model, f"{prefix}.{index}.{name} is a norm the rotation cannot fold")
            if type(module).__name__ not in SUPPORTED_NORMS:
                raise _layout_error(model, f"{prefix}.{index}.{name} is a {type(module).__name__}")


def _layout_error(model: nn.Module, problem: str) -> ModelError:
    return ModelError(
        f"[rotation] {type(model).__name__}: {problem}; offline rotation supports the pre-norm "
        f"RMSNorm layout ({', '.join(SUPPORTED_NORMS)}: input_layernorm -> q/k/v_proj, "
        "post_attention_layernorm -> gate/up_proj, model.norm -> lm_head); remove [rotation] for this model"
    )
