"""Stage `refit` (mxptq/stages/refit.py, issue 22): the asymmetric least-squares target against
an independent least-squares solver, its error formula against a direct computation, and on a
tiny W4A4KV4 model both refit modes lowering their own objective (and "asymmetric" the logits'
error)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

from mxptq.recipe import RecipeError, parse_recipe
from mxptq.stages.gptq import decoder_layers, run_gptq
from mxptq.stages.refit import asymmetric_error, least_squares_target, run_refit
from mxptq.stages.transform import quantize_model

LINEARS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _inputs(n_tokens: int = 400, n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, n, generator=g, dtype=torch.float64)
    X_q = X + 0.3 * torch.randn(n_tokens, n, generator=g, dtype=torch.float64)  # "quantized" inputs
    W = torch.randn(24, n, generator=g, dtype=torch.float64)
    return X, X_q, W


def _stats(X: torch.Tensor, X_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = 2.0 / X.shape[0]
    return scale * X_q.T @ X_q, scale * X.T @ X_q, scale * X.T @ X


def test_least_squares_target_is_the_least_squares_solution():
    X, X_q, W = _inputs()
    H_q, C, _ = _stats(X, X_q)
    target = least_squares_target(W.float(), H_q.float(), C.float(), damp_percent=0.0).double()
    expected = torch.linalg.lstsq(X_q, X @ W.T).solution.T  # argmin_Q ||X Wᵀ - X̃ Qᵀ||
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


def test_damped_target_is_the_ridge_solution_towards_w():
    """argmin_Q ||X Wᵀ - X̃ Qᵀ||² + λ'||Q - W||², solved as one stacked least-squares problem."""
    X, X_q, W = _inputs(seed=4)
    H_q, C, _ = _stats(X, X_q)
    damp_percent = 0.2
    lam = damp_percent * float(torch.diagonal(H_q).mean()) * X.shape[0] / 2  # in the unscaled objective
    n = X.shape[1]
    A = torch.cat([X_q, lam**0.5 * torch.eye(n, dtype=X.dtype)])
    B = torch.cat([X @ W.T, lam**0.5 * W.T])
    expected = torch.linalg.lstsq(A, B).solution.T
    target = least_squares_target(W.float(), H_q.float(), C.float(), damp_percent=damp_percent).double()
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damp_percent", [0.0, 0.01, 0.5])
def test_least_squares_target_is_w_when_the_inputs_agree(damp_percent):
    X, _, W = _inputs(seed=1)
    H, C, _ = _stats(X, X)
    target = least_squares_target(W.float(), H.float(), C.float(), damp_percent=damp_percent)
    torch.testing.assert_close(target, W.float(), rtol=1e-4, atol=1e-4)


def test_asymmetric_error_equals_the_output_error_computed_directly():
    X, X_q, W = _inputs(seed=2)
    H_q, C, H_x = _stats(X, X_q)
    Q = W + 0.1 * torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    direct = 2.0 / X.shape[0] * (X @ W.T - X_q @ Q.T).square().sum()
    assert asymmetric_error(W, Q, H_q, C, H_x) == pytest.approx(float(direct), rel=1e-9)
    # and the decomposition the stage relies on: E(Q) = ||X̃ (W* − Q)ᵀ||² + E(W*)
    target = torch.linalg.lstsq(X_q, X @ W.T).solution.T
    split = 2.0 / X.shape[0] * (X_q @ (target - Q).T).square().sum() + asymmetric_error(W, target, H_q, C, H_x)
    assert float(split) == pytest.approx(float(direct), rel=1e-9)


def _recipe(refit: str, scale_rule: str | None = None) -> object:
    return parse_recipe(
        'by = "regex_name"\n'
        + (f'[formats]\nmxint_scale_rule = "{scale_rule}"\n' if scale_rule else "")
        + "[gptq]\nformat = \"mxint\"\nnsamples = 128\nseqlen = 32\ncali_batch_size = 32\nclip_search_y = true\n"
        f"refit = \"{refit}\"\n"
        "[gptq.weight_config]\nweight_block_size = 32\nweight_width = 4\n"
        "['model\\.layers\\.\\d+\\.self_attn$']\nname = \"mxint\"\n"
        "['model\\.layers\\.\\d+\\.self_attn$'.kv_cache]\ndata_in_block_size = 32\ndata_in_width = 4\n"
        f"['{LINEARS}']\nname = \"mxint\"\nweight_block_size = 32\nweight_width = 4\n"
        "data_in_block_size = 32\ndata_in_width = 4\ngptq = true\n"
    )


@pytest.mark.parametrize("refit", ["quantized_inputs", "asymmetric"])
def test_refit_lowers_its_objective_and_the_logits_error(refit):
    base = make_tiny_llama(seed=7)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(8)
    # 4096 calibration tokens: the asymmetric target overfits with far fewer tokens than inputs x
    # outputs allow (with 512 its held-out error got worse while the calibration one fell 5x)
    windows = torch.randint(0, vocab, (128, 32), generator=g)
    held_out = torch.randint(0, vocab, (8, 32), generator=g)
    with torch.no_grad():
        reference_logits = base(held_out).logits
    report: dict = {}
    ctx = SimpleNamespace(device=torch.device("cpu"), report=report, force=True, progress=False, model_info=None)

    def quantized(mode: str) -> torch.nn.Module:
        recipe = _recipe(mode)
        model = copy.deepcopy(base)
        reference_layers = copy.deepcopy(decoder_layers(model)[1])
        model = quantize_model(run_gptq(model, recipe, ctx, windows=windows), recipe, None)
        if mode != "none":
            model = run_refit(model, reference_layers, recipe, ctx, windows=windows)
        return model

    def logits_error(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return (model(held_out).logits - reference_logits).square().mean().item()

    plain = logits_error(quantized("none"))
    refitted = quantized(refit)
    summary = report["gptq_refit"]
    assert summary["mode"] == refit and summary["refit_linears"] == 2 * 7
    # GPTQ on the objective itself does not lose to weights fitted for another one (slack: GPTQ is
    # greedy, and the first pass's inputs carried no activation quantization)
    assert summary["rel_error_after"] <= summary["rel_error_before"], summary
    for layer in summary["layers"]:
        for name, stats in layer["linears"].items():
            assert stats["error_after"] <= stats["error_before"] * 1.05, (layer["index"], name, stats)
    if refit == "asymmetric":
        # on this tiny random model the asymmetric target helps end to end (0.00124 -> 0.00084);
        # quantized_inputs barely moves it (0.00121) and is not asserted on the logits
        assert summary["rel_error_after"] < 0.99 * summary["rel_error_before"], summary
        assert logits_error(refitted) < 0.8 * plain, (logits_error(refitted), plain)
    # the refit weights are still on the MX grid, so a packed checkpoint stores them exactly
    from mxptq.formats import quantize

    for module in refitted.modules():
        if getattr(module, "weight_source", None) == "gptq":
            assert torch.equal(quantize(module.weight, module.weight_fmt, axis=-1), module.weight)


def test_refit_checkpoint_reloads_bit_identical(tmp_path):
    """The refit writes into MXLinear weight buffers after the transform; the packed checkpoint
    must carry those weights, not the first pass's. With config D's searched (mse) exponents."""
    from mxptq.checkpoint import load_quantized, save_quantized

    base = make_tiny_llama(seed=9)
    g = torch.Generator().manual_seed(10)
    windows = torch.randint(0, base.config.vocab_size, (8, 32), generator=g)
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=g)
    recipe = _recipe("quantized_inputs", scale_rule="mse")
    ctx = SimpleNamespace(device=torch.device("cpu"), report={}, force=True, progress=False, model_info=None)
    reference_layers = copy.deepcopy(decoder_layers(base)[1])
    model = quantize_model(run_gptq(base, recipe, ctx, windows=windows), recipe, None)
    first_pass = model.model.layers[0].self_attn.o_proj.weight.clone()
    model = run_refit(model, reference_layers, recipe, ctx, windows=windows)
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight, first_pass)
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, recipe, tmp_path / "ckpt")
    reloaded, _, _ = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_refit_names_its_key_and_the_allowed_modes():
    with pytest.raises(RecipeError, match=r"gptq.*refit.*quantized_inputs"):
        parse_recipe('[gptq]\nrefit = "yes"\n[gptq.weight_config]\nweight_block_size = 32\nweight_width = 4\n')
