"""MX-aware GPTQ: the pure algorithm (mxptq/stages/gptq_math.py) and the layer-by-layer driver
(mxptq/stages/gptq.py) on tiny random Llama models, CPU only.

Independent expectations: MX grid membership via formats.quantize (RTN must be a no-op on Q);
brute-force minima over explicit candidate exponents for the clip searches; Hessians rebuilt in
the test from hooks on the finished (quantized) model; RTN error of the same linear.
"""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest
import torch

from mxptq.errors import RecipeError
from mxptq.formats import Format, quantize, quantize_elements, scale_exp_from_amax
from mxptq.recipe import load_recipe
from mxptq.stages.gptq import GPTQ_FORMAT_ATTR, gptq_calibrate, run_gptq
from mxptq.stages.gptq_math import (
    block_objective,
    choose_scale_exp,
    mx_gptq,
    output_error,
)

FORMATS = {
    "mxint4-tutorial": Format.from_keys("mxint", width=4),
    "mxint4-symmetric": Format.from_keys("mxint", width=4, scale_rule="symmetric"),
    "mxint8-ocp": Format.from_keys("mxint", width=8, scale_rule="ocp"),
    "mxfp4": Format.from_keys("mxfp", exponent_width=2, frac_width=1),
    "mxfp6-e3m2": Format.from_keys("mxfp", exponent_width=3, frac_width=2),
    "mxfp8-e4m3-b16": Format.from_keys("mxfp", exponent_width=4, frac_width=3, block_size=16),
}
MXINT4 = FORMATS["mxint4-tutorial"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend (on the shared 2-core CI box a tiny-model GPTQ
    run took 10 s with 2 threads under load and 0.5 s with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _calibration(n: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs with a few outlier channels (like LLM activations) and H = 2/N X^T X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, columns, generator=g) @ (torch.randn(columns, columns, generator=g) / columns**0.5)
    X[:, :3] *= 8.0
    return X, 2.0 / n * X.T @ X


def _weights(rows: int, columns: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=g) * 0.05


# -- the algorithm ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("scale_search", ["absmax", "quantile", "output"])
@pytest.mark.parametrize("intra_block", ["joint", "column"])
def test_mx_gptq_output_lies_on_the_mx_grid(fmt: Format, scale_search: str, intra_block: str) -> None:
    # 80 columns: the last MX block is partial (zero-padded per row, as everywhere).
    _, H = _calibration(256, 80, seed=1)
    W = _weights(24, 80, seed=2)
    Q, stats = mx_gptq(W, H, fmt, scale_search=scale_search, intra_block=intra_block)
    assert Q.shape == W.shape and Q.dtype == torch.float32
    assert torch.isfinite(Q).all()
    assert torch.equal(quantize(Q, fmt), Q)  # transform's RTN re-quantization is a no-op
    assert not stats.fallback_rtn and stats.cholesky_retries == 0 and stats.damp_percent == 0.01


def test_tutorial_rule_block_with_positive_power_of_two_maximum_is_made_canonical() -> None:
    # MXINT4, tutorial rule: amax 2.1 -> scale_exp 1, step 0.5, 2.1 -> code 4 -> 2.0. But RTN of
    # 2.0 picks scale_exp 0 and clamps 8 -> 7 (1.75): the raw rounding is not a fixed point.
    W = torch.zeros(1, 32)
    W[0, 0], W[0, 1] = 2.1, -0.3
    raw = quantize_elements(W, MXINT4, scale_exp_from_amax(W.abs().amax(1, keepdim=True), MXINT4))
    assert not torch.equal(quantize(raw, MXINT4), raw)  # the trap exists
    Q, _ = mx_gptq(W, torch.eye(32), MXINT4)
    assert torch.equal(quantize(Q, MXINT4), Q)


def _brute_force_best(W1: torch.Tensor, fmt: Format, row_error) -> torch.Tensor:
    """Per row, the smallest error over the exponents e0+1, e0, e0-1, e0-2 (what the default clip
    ratios 2, 1, 1/2, 1/4 give; e0 = the absmax exponent)."""
    e0 = scale_exp_from_amax(W1.abs().amax(1, keepdim=True), fmt)
    errors = torch.stack([row_error(W1 - quantize_elements(W1, fmt, e0 - k)) for k in (-1, 0, 1, 2)])
    return errors.min(0).values


@pytest.mark.parametrize("fmt", [MXINT4, FORMATS["mxfp4"]], ids=["mxint4", "mxfp4"])
def test_quantile_search_minimises_block_weight_error(fmt: Format) -> None:
    W1 = _weights(64, 32, seed=3)
    W1[::5, 7] = 0.4  # outliers: clipping them can pay off
    weight_error = lambda D: D.square().sum(-1)
    absmax = weight_error(W1 - quantize_elements(W1, fmt, choose_scale_exp(W1, fmt, "absmax")))
    chosen = weight_error(W1 - quantize_elements(W1, fmt, choose_scale_exp(W1, fmt, "quantile")))
    assert (chosen <= absmax).all() and chosen.sum() < absmax.sum()
    torch.testing.assert_close(chosen, _brute_force_best(W1, fmt, weight_error))


@pytest.mark.parametrize("fmt", [MXINT4, FORMATS["mxfp4"]], ids=["mxint4", "mxfp4"])
def test_output_search_minimises_block_output_error(fmt: Format) -> None:
    X1, H11 = _calibration(512, 32, seed=4)
    W1 = _weights(64, 32, seed=5)
    W1[::3, 0] = 0.5
    output_err = lambda D: (X1 @ D.T).square().sum(0)
    absmax = output_err(W1 - quantize_elements(W1, fmt, choose_scale_exp(W1, fmt, "absmax")))
    via_gram = output_err(W1 - quantize_elements(W1, fmt, choose_scale_exp(W1, fmt, "output", H11=H11)))
    via_x = output_err(
        W1 - quantize_elements(W1, fmt, choose_scale_exp(W1, fmt, "output", X1=X1, x_chunk_rows=100))
    )
    assert (via_gram <= absmax * (1 + 1e-5)).all() and via_gram.sum() < absmax.sum()
    torch.testing.assert_close(via_gram, _brute_force_best(W1, fmt, output_err), rtol=1e-5, atol=0)
    torch.testing.assert_close(via_x, via_gram, rtol=1e-5, atol=0)


def test_gram_and_chunked_x_give_the_same_output_objective() -> None:
    X1, H11 = _calibration(300, 32, seed=6)
    D = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(7))
    from_x = block_objective(D, "output", X1=X1, x_chunk_rows=64)  # 300 = 4 * 64 + 44: a ragged chunk
    from_gram = block_objective(D, "output", H11=H11)
    torch.testing.assert_close(from_gram * (300 / 2), from_x, rtol=1e-4, atol=0)


def test_clip_searches_reduce_their_objective_in_mx_gptq() -> None:
    W = _weights(48, 96, seed=8)
    W[:, 5] = 0.6
    # H = I: no error propagation, so each block's search is the whole story for ||W - Q||^2.
    Q_abs, _ = mx_gptq(W, torch.eye(96), MXINT4, scale_search="absmax")
    Q_quantile, _ = mx_gptq(W, torch.eye(96), MXINT4, scale_search="quantile")
    assert (W - Q_quantile).square().sum() < (W - Q_abs).square().sum()
    # One block: nothing to propagate to, so the output objective is exactly what is minimised.
    X, H = _calibration(512, 32, seed=9)
    Q_abs, _ = mx_gptq(W[:, :32], H, MXINT4, scale_search="absmax")
    Q_out, _ = mx_gptq(W[:, :32], H, MXINT4, scale_search="output", X=X)
    assert output_error(W[:, :32], Q_out, H) < output_error(W[:, :32], Q_abs, H)


@pytest.mark.parametrize("intra_block", ["joint", "column"])
def test_gptq_beats_rtn_on_the_calibration_objective(intra_block: str) -> None:
    _, H = _calibration(1024, 128, seed=10)
    W = _weights(64, 128, seed=11)
    Q, _ = mx_gptq(W, H, MXINT4, intra_block=intra_block)
    assert output_error(W, Q, H) < 0.9 * output_error(W, quantize(W, MXINT4), H)


def test_singular_hessian_raises_damping_instead_of_failing() -> None:
    H = torch.ones(64, 64)  # rank 1: Cholesky without damping hits a zero pivot
    W = _weights(8, 64, seed=12)
    Q, stats = mx_gptq(W, H, MXINT4, damp_percent=0.0)
    assert stats.cholesky_retries >= 1 and stats.damp_percent == pytest.approx(1e-3)
    assert not stats.fallback_rtn
    assert torch.isfinite(Q).all() and torch.equal(quantize(Q, MXINT4), Q)


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_unfactorisable_hessian_falls_back_to_rtn(bad: str) -> None:
    H = torch.full((64, 64), float("nan")) if bad == "nan" else -torch.eye(64)
    W = _weights(8, 64, seed=13)
    Q, stats = mx_gptq(W, H, MXINT4, scale_search="output")
    assert stats.fallback_rtn
    assert torch.isfinite(Q).all()
    # No compensation, and the objective falls back to the weight error: RTN per block. With
    # absmax scales that is formats.quantize, made canonical (a second quantize only moves the
    # tutorial rule's positive power-of-two maxima, see the test above).
    Q_absmax, _ = mx_gptq(W, H, MXINT4)
    assert torch.equal(Q_absmax, quantize(quantize(W, MXINT4), MXINT4))


def test_dead_inputs_get_zero_weights() -> None:
    _, H = _calibration(256, 64, seed=14)
    H[7, :] = 0.0
    H[:, 7] = 0.0
    Q, stats = mx_gptq(_weights(8, 64, seed=15), H, MXINT4)
    assert stats.dead_columns == 1 and (Q[:, 7] == 0).all() and torch.isfinite(Q).all()


def _naive_act_order_gptq(W: torch.Tensor, H: torch.Tensor, fmt: Format, damp: float = 0.01) -> torch.Tensor:
    """An independent act-order GPTQ (no Cholesky, no lazy batches): the OBS step of the GPTQ
    paper, eq. (2)/(3), in float64 -- quantize column q, spread its error over the free columns
    with the inverse Hessian of the free columns, drop q from it (Schur complement). Block
    exponents fixed from the uncompensated W by absmax, as `mx_gptq`'s static groups."""
    W = W.double().clone()
    H = H.double() + damp * torch.diag(H).double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    columns = W.shape[1]
    exps = torch.cat([scale_exp_from_amax(W[:, i:i + fmt.block_size].abs().amax(1, keepdim=True).float(), fmt)
                      .expand(-1, min(fmt.block_size, columns - i)) for i in range(0, columns, fmt.block_size)], 1)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    free = list(range(columns))  # Hinv is the inverse Hessian over `free`, in that order
    for q in torch.argsort(torch.diag(H), descending=True, stable=True).tolist():
        Q[:, q] = quantize_elements(W[:, q : q + 1].float(), fmt, exps[:, q : q + 1]).double()[:, 0]
        j = free.index(q)
        err = (W[:, q] - Q[:, q]) / Hinv[j, j]
        W[:, torch.tensor(free)] -= err[:, None] * Hinv[j][None, :]
        keep = [k for k in range(len(free)) if k != j]
        Hinv = Hinv[keep][:, keep] - torch.outer(Hinv[keep, j], Hinv[j, keep]) / Hinv[j, j]
        free.pop(j)
    return quantize(Q.float(), fmt)


def test_act_order_matches_a_naive_obs_implementation() -> None:
    _, H = _calibration(512, 64, seed=20)
    W = _weights(16, 64, seed=21)
    Q, stats = mx_gptq(W, H, MXINT4, act_order=True)
    expected = _naive_act_order_gptq(W, H, MXINT4)
    # float32 Cholesky vs float64 inverse: a code may flip at a rounding tie, nothing more
    assert (Q != expected).float().mean() < 0.01, (Q != expected).sum()
    assert torch.equal(quantize(Q, MXINT4), Q) and not stats.fallback_rtn


@pytest.mark.parametrize("fmt", [MXINT4, FORMATS["mxfp4"]], ids=["mxint4", "mxfp4"])
def test_act_order_on_the_grid_and_better_than_rtn_with_outlier_inputs(fmt: Format) -> None:
    # 80 columns: a partial last block; _calibration's outlier channels 0-2 come first in act order
    _, H = _calibration(1024, 80, seed=22)
    W = _weights(32, 80, seed=23)
    Q, _ = mx_gptq(W, H, fmt, act_order=True, scale_search="output")
    assert torch.equal(quantize(Q, fmt), Q)
    assert output_error(W, Q, H) < 0.9 * output_error(W, quantize(W, fmt), H)


# -- the driver -------------------------------------------------------------------------------

RECIPE = """
by = "regex_name"
[gptq]
nsamples = 8
seqlen = 32
cali_batch_size = 3
quantile_search = {quantile}
clip_search_y = {clip_y}
intra_block = "{intra_block}"
[gptq.weight_config]
weight_block_size = 32
weight_width = 4
['model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj']
name = "mxint"
weight_block_size = 32
weight_width = {attn_width}
gptq = true
['model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = 32
data_in_width = 4
gptq = true
"""


def make_recipe(tmp_path, *, quantile="false", clip_y="false", intra_block="joint", attn_width=4, extra=""):
    path = tmp_path / f"recipe_{quantile}_{clip_y}_{intra_block}_{attn_width}.toml"
    text = RECIPE.format(quantile=quantile, clip_y=clip_y, intra_block=intra_block, attn_width=attn_width)
    path.write_text(textwrap.dedent(text) + extra)
    return load_recipe(path)


def windows(n: int = 8, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def cpu_ctx(**kwargs):
    return SimpleNamespace(device=torch.device("cpu"), progress=False, report=None, **kwargs)


def _linear_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input on `ids` (flattened to [tokens, in_features]), from hooks."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            hook = lambda m, args, name=name: inputs.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            )
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in ids.split(3):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in inputs.items()}


@pytest.mark.parametrize("scale_search", ["absmax", "output"])
def test_run_gptq_beats_rtn_on_every_linear_of_a_tiny_llama(tiny_llama, tmp_path, scale_search) -> None:
    model = tiny_llama(seed=0, num_hidden_layers=2)
    original = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    recipe = make_recipe(tmp_path, clip_y="true" if scale_search == "output" else "false")
    ids = windows(n=16, seqlen=32)
    summary = gptq_calibrate(model, recipe, cpu_ctx(), windows=ids)
    assert summary["scale_search"] == scale_search

    # The inputs each linear sees in the finished model are the inputs GPTQ calibrated it on
    # (earlier layers and earlier linears of the layer are quantized): rebuild H independently.
    inputs = _linear_inputs(model, ids)
    report = {name: stats for layer in summary["layers"] for name, stats in layer["linears"].items()}
    assert set(report) == set(original) == set(inputs)
    for name, W in original.items():
        linear = model.get_submodule(name)
        Q = linear.weight.detach()
        assert getattr(linear, GPTQ_FORMAT_ATTR) == MXINT4
        assert torch.equal(quantize(Q, MXINT4), Q)
        X = inputs[name]
        H = 2.0 / X.shape[0] * X.T @ X
        gptq_err, rtn_err = output_error(W, Q, H), output_error(W, quantize(W, MXINT4), H)
        assert gptq_err <= rtn_err, name
        energy = float((W @ H * W).sum())
        assert report[name]["rel_error"] == pytest.approx((gptq_err / energy) ** 0.5, rel=1e-3)
        assert report[name]["rel_error_rtn"] == pytest.approx((rtn_err / energy) ** 0.5, rel=1e-3)
    # Linears that read the same tensor shared one Hessian.
    q = "model.layers.1.self_attn.q_proj"
    assert sorted(report[q]["shared_hessian_with"]) == [
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert report["model.layers.0.mlp.gate_proj"]["shared_hessian_with"] == ["model.layers.0.mlp.up_proj"]
    assert report["model.layers.0.mlp.down_proj"]["shared_hessian_with"] == []
    assert summary["rel_error"] < summary["rel_error_rtn"]


def test_transform_keeps_gptq_weights(tiny_llama, tmp_path) -> None:
    from mxptq.stages.transform import quantize_model

    model = tiny_llama(seed=1, num_hidden_layers=1)
    recipe = make_recipe(tmp_path, quantile="true")
    ctx = cpu_ctx()
    ctx.report = {}
    run_gptq(model, recipe, ctx, windows=windows())
    assert ctx.report["gptq"]["layers"][0]["index"] == 0
    gptq_weights = {
        name: m.weight.detach().clone() for name, m in model.named_modules() if hasattr(m, GPTQ_FORMAT_ATTR)
    }
    quantize_model(model, recipe)
    for name, weight in gptq_weights.items():
        module = model.get_submodule(name)
        assert module.weight_source == "gptq" and torch.equal(module.weight, weight)


def test_selector_weight_format_must_match_gptq_weight_config(tiny_llama, tmp_path) -> None:
    # The recipe loader refuses it before any model is loaded...
    with pytest.raises(RecipeError, match=r"MXINT8.*differs from \[gptq.weight_config\] MXINT4"):
        make_recipe(tmp_path, attn_width=8)
    # ...and the stage refuses a recipe object that was changed after validation.
    recipe = make_recipe(tmp_path)
    mxint8 = Format.from_keys("mxint", width=8)
    first = recipe.selectors[0]
    changed = first.model_copy(update={"config": first.config.model_copy(update={"weight": mxint8})})
    recipe = recipe.model_copy(update={"selectors": [changed, *recipe.selectors[1:]]})
    with pytest.raises(
        RecipeError, match=r"weight format MXINT8.*differs from \[gptq.weight_config\] MXINT4"
    ):
        gptq_calibrate(tiny_llama(seed=0, num_hidden_layers=1), recipe, cpu_ctx(), windows=windows())


def test_bfloat16_model_gets_grid_weights_in_its_dtype(tiny_llama, tmp_path) -> None:
    model = tiny_llama(seed=2, num_hidden_layers=1, dtype=torch.bfloat16)
    gptq_calibrate(model, make_recipe(tmp_path, clip_y="true"), cpu_ctx(), windows=windows())
    for name, module in model.named_modules():
        if hasattr(module, GPTQ_FORMAT_ATTR):
            assert module.weight.dtype == torch.bfloat16
            assert torch.equal(quantize(module.weight, MXINT4), module.weight), name
