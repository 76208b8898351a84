"""Crash-safe GPTQ checkpoints (mxptq/stages/gptq_checkpoint.py, resume in mxptq/stages/gptq.py).

A "crash" is simulated with a forward pre-hook that raises when decoder layer k is first run:
layers 0..k-1 are finished and on disk. The expectation is an uninterrupted run of the same
recipe on a fresh copy of the same model: weights must be bit-identical (torch.equal).
"""

from __future__ import annotations

import json

import pytest
import torch

# Same directory: pytest puts it on sys.path. one_thread is an autouse fixture (applies here too).
from test_gptq import cpu_ctx, make_recipe, one_thread, windows  # noqa: F401

from mxptq.errors import CheckpointError
from mxptq.stages.gptq import GPTQ_FORMAT_ATTR, gptq_calibrate

N_LAYERS = 3


class Killed(RuntimeError):
    pass


def gptq_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: m.weight.detach().clone() for name, m in model.named_modules() if hasattr(m, GPTQ_FORMAT_ATTR)
    }


def with_checkpoint(recipe, directory):
    return recipe.model_copy(update={"gptq": recipe.gptq.model_copy(update={"checkpoint_dir": directory})})


def crash_at_layer(model: torch.nn.Module, k: int):
    def kill(module, args, kwargs):
        raise Killed(f"simulated crash at layer {k}")

    return model.model.layers[k].register_forward_pre_hook(kill, with_kwargs=True)


@pytest.fixture
def setup(tiny_llama, tmp_path):
    recipe = make_recipe(tmp_path, clip_y="true")
    fresh = lambda: tiny_llama(seed=3, num_hidden_layers=N_LAYERS)
    reference = fresh()
    gptq_calibrate(reference, recipe, cpu_ctx(), windows=windows())  # uninterrupted, no checkpoint
    return recipe, fresh, gptq_weights(reference), tmp_path / "ckpt"


@pytest.mark.parametrize("k", [1, 2])
def test_resume_after_crash_is_bit_identical(setup, k: int) -> None:
    recipe, fresh, expected, directory = setup
    recipe = with_checkpoint(recipe, directory)
    crashed = fresh()
    handle = crash_at_layer(crashed, k)
    with pytest.raises(Killed):
        gptq_calibrate(crashed, recipe, cpu_ctx(), windows=windows())
    handle.remove()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["layers"], key=int) == [str(i) for i in range(k)]

    resumed = fresh()
    summary = gptq_calibrate(resumed, recipe, cpu_ctx(), windows=windows())
    assert [layer["from_checkpoint"] for layer in summary["layers"]] == [i < k for i in range(N_LAYERS)]
    got = gptq_weights(resumed)
    assert got.keys() == expected.keys() and len(got) == 7 * N_LAYERS
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    # A finished checkpoint is reloaded without any calibration forward: a model whose layers
    # cannot run at all still gets the same weights.
    reloaded = fresh()
    for layer in range(N_LAYERS):
        crash_at_layer(reloaded, layer)
    summary = gptq_calibrate(reloaded, recipe, cpu_ctx(), windows=windows())
    assert all(layer["from_checkpoint"] for layer in summary["layers"])
    assert all(torch.equal(gptq_weights(reloaded)[name], expected[name]) for name in expected)


def test_changed_recipe_is_refused_and_force_recomputes(setup, tmp_path) -> None:
    recipe, fresh, _, directory = setup
    gptq_calibrate(fresh(), with_checkpoint(recipe, directory), cpu_ctx(), windows=windows())

    other = make_recipe(tmp_path, quantile="true")  # clip_search_y off: another [gptq] section
    with pytest.raises(CheckpointError, match=r"different \[gptq\] section; rerun with --force"):
        gptq_calibrate(fresh(), with_checkpoint(other, directory), cpu_ctx(), windows=windows())
    with pytest.raises(CheckpointError, match=r"different calibration windows"):
        gptq_calibrate(fresh(), with_checkpoint(recipe, directory), cpu_ctx(), windows=windows(seed=1))
    with pytest.raises(CheckpointError, match=r"different model weights"):
        gptq_calibrate(
            tiny_llama_other(fresh), with_checkpoint(recipe, directory), cpu_ctx(), windows=windows()
        )

    forced = fresh()
    summary = gptq_calibrate(
        forced, with_checkpoint(other, directory), cpu_ctx(force=True), windows=windows()
    )
    assert not any(layer["from_checkpoint"] for layer in summary["layers"])
    plain = fresh()
    gptq_calibrate(plain, other, cpu_ctx(), windows=windows())
    assert all(torch.equal(w, gptq_weights(plain)[name]) for name, w in gptq_weights(forced).items())
    # ...and the directory now belongs to the new recipe.
    summary = gptq_calibrate(fresh(), with_checkpoint(other, directory), cpu_ctx(), windows=windows())
    assert all(layer["from_checkpoint"] for layer in summary["layers"])


def tiny_llama_other(fresh):
    model = fresh()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    return model


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_layer_file_is_refused(setup, damage: str) -> None:
    recipe, fresh, _, directory = setup
    recipe = with_checkpoint(recipe, directory)
    gptq_calibrate(fresh(), recipe, cpu_ctx(), windows=windows())
    path = directory / "layer_0001.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"layer_0001.safetensors: GPTQ layer checkpoint is corrupt"):
        gptq_calibrate(fresh(), recipe, cpu_ctx(), windows=windows())


def test_foreign_manifest_is_refused(setup) -> None:
    recipe, fresh, _, directory = setup
    directory.mkdir()
    (directory / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(CheckpointError, match=r"not a GPTQ checkpoint manifest"):
        gptq_calibrate(fresh(), with_checkpoint(recipe, directory), cpu_ctx(), windows=windows())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_is_bit_identical_on_cuda_with_the_model_on_the_cpu(tiny_llama, tmp_path) -> None:
    # The pipeline's layout: model on the CPU, one layer at a time on the GPU (bf16, as on a GPU).
    from mxptq.formats import quantize

    recipe = make_recipe(tmp_path, clip_y="true", intra_block="column")
    fresh = lambda: tiny_llama(seed=4, num_hidden_layers=N_LAYERS, dtype=torch.bfloat16)
    gpu = _cuda_ctx
    reference = fresh()
    gptq_calibrate(reference, recipe, gpu(), windows=windows())
    expected = gptq_weights(reference)
    assert all(w.device.type == "cpu" for w in expected.values())

    checkpointed = with_checkpoint(recipe, tmp_path / "ckpt")
    crashed = fresh()
    crash_at_layer(crashed, 2)
    with pytest.raises(Killed):
        gptq_calibrate(crashed, checkpointed, gpu(), windows=windows())
    resumed = fresh()
    gptq_calibrate(resumed, checkpointed, gpu(), windows=windows())
    for name, weight in gptq_weights(resumed).items():
        assert torch.equal(weight, expected[name]), name
        fmt = getattr(resumed.get_submodule(name), GPTQ_FORMAT_ATTR)
        assert torch.equal(quantize(weight.cuda(), fmt).cpu(), weight), name


def _cuda_ctx(**kwargs):
    ctx = cpu_ctx(**kwargs)
    ctx.device = torch.device("cuda")
    return ctx
