"""Greedy rotation search: the greedy rule on a scripted score, candidate/skip collection, and the
stage on a tiny random Llama (determinism, cache hit with zero forwards, stale or edited cache,
a fingerprint that is the same in every process)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mxptq.nn.hadamard import Rotation
from mxptq.recipe import parse_recipe
from mxptq.stages.rotsearch import Candidate, collect_candidates, greedy_search, run_rotation_search
from mxptq.stages.transform import quantize_model
from tests.conftest import make_tiny_llama

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- greedy rule (no model)


class _Switch:
    """A stand-in quantizer: only `.rotation` matters to Candidate.enable/disable."""

    rotation = None


def _scripted(table: dict[frozenset, float]):
    """Candidates a, b, c and a score() that looks up the set of enabled types in `table`."""
    switches = {t: _Switch() for t in "abc"}
    candidates = [Candidate(t, [(t, switches[t], object())]) for t in "abc"]
    calls = []

    def score() -> float:
        enabled = frozenset(t for t, s in switches.items() if s.rotation is not None)
        calls.append(enabled)
        return table[enabled]

    return candidates, switches, score, calls


def test_greedy_commits_best_until_no_improvement():
    f = frozenset
    table = {
        f(): 10.0,
        f("a"): 9.0,
        f("b"): 8.0,
        f("c"): 9.5,  # round 1: b wins
        f("ab"): 7.9,
        f("bc"): 7.0,  # round 2: c wins
        f("abc"): 7.5,  # round 3: a is worse -> stop
    }
    candidates, switches, score, calls = _scripted(table)
    result = greedy_search(candidates, score, improvement_eps=0.0)
    assert result["winners"] == ["b", "c"]
    assert (result["baseline"], result["final"]) == (10.0, 7.0)
    assert [r["trials"] for r in result["rounds"]] == [
        {"a": 9.0, "b": 8.0, "c": 9.5},
        {"a": 7.9, "c": 7.0},
        {"a": 7.5},
    ]
    assert [r["committed"] for r in result["rounds"]] == [True, True, False]
    assert len(calls) == 1 + 3 + 2 + 1  # baseline + one forward per trial
    assert {t for t, s in switches.items() if s.rotation is not None} == {"b", "c"}  # winners left on


def test_improvement_eps_is_relative():
    f = frozenset
    table = {f(): 10.0, f("a"): 9.5, f("b"): 9.95, f("c"): 11.0, f("ab"): 9.4, f("ac"): 9.0, f("abc"): 9.1}
    # eps = 0.04: 9.5 < 10·0.96 = 9.6 commits a; then 9.0 < 9.5·0.96 = 9.12 commits c.
    candidates, _, score, _ = _scripted(table)
    assert greedy_search(candidates, score, 0.04)["winners"] == ["a", "c"]
    # eps = 0.06: 9.5 is not below 10·0.94 = 9.4 -> nothing is committed.
    candidates, switches, score, _ = _scripted(table)
    result = greedy_search(candidates, score, 0.06)
    assert result["winners"] == [] and result["final"] == 10.0
    assert all(s.rotation is None for s in switches.values())


def test_ties_go_to_the_earlier_type_and_nan_never_wins():
    f = frozenset
    table = {f(): 10.0, f("a"): float("nan"), f("b"): 9.0, f("c"): 9.0, f("bc"): 9.5, f("ab"): float("nan")}
    candidates, _, score, _ = _scripted(table)
    result = greedy_search(candidates, score, 0.0)
    assert result["winners"] == ["b"]
    assert result["rounds"][0]["trials"]["a"] is None  # stored as JSON null


# ---------------------------------------------------------------- tiny model + stage

RECIPE = """
by = "regex_name"
[rotation_search]
calib_nsamples = {nsamples}
calib_seqlen = 24
improvement_eps = {eps}
cache_path = "{cache}"
matmul_types = {types}
seed = 3
split = "test"
['model\\.layers\\.\\d+\\.self_attn$']
name = "mxint"
['model\\.layers\\.\\d+\\.self_attn$'.qk_matmul]
bypass = true
['model\\.layers\\.\\d+\\.self_attn$'.av_matmul]
bypass = true
['model\\.layers\\.\\d+\\.self_attn$'.kv_cache]
data_in_block_size = 32
data_in_width = 4
['model\\.layers\\.\\d+\\.self_attn$'.softmax]
bypass = true
['model\\.layers\\.\\d+\\.self_attn$'.rope]
bypass = true
['model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = 32
data_in_width = 4
['model\\.layers\\.\\d+\\.mlp\\.(gate|up)_proj']
name = "mxint"
weight_block_size = 32
weight_width = 4
data_in_block_size = 32
data_in_width = 4
['model\\.layers\\.\\d+\\.mlp\\.down_proj']
bypass = true
"""
ALL_TYPES = (
    '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "kv_cache", "qk_matmul"]'
)


def _recipe(cache, nsamples=4, eps=0.0, types=ALL_TYPES):
    return parse_recipe(RECIPE.format(cache=cache, nsamples=nsamples, eps=eps, types=types))


class _ByteTokenizer:
    """Bytes as token ids (vocab 256 = the tiny Llama's)."""

    def __call__(self, text, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}


class _Text:
    """A data source with `joined(split)`, recording which splits were read."""

    def __init__(self):
        rng = random.Random(0)
        words = ["alpha", "beta", "gamma", "delta", "mx", "block", "scale", "the", "of", "and"]
        self.text = " ".join(rng.choice(words) for _ in range(600))
        self.splits = []

    def joined(self, split):
        self.splits.append(split)
        return self.text


def _quantized_model():
    # hidden 96 = 12·8 and MLP 192 = 12·16: the kron rotations are exercised; head_dim 32 = walsh.
    model = make_tiny_llama(seed=0, hidden_size=96, intermediate_size=192, attn_implementation="eager")
    return quantize_model(model, _recipe("unused"))


@pytest.fixture(scope="module")
def base_model():
    return _quantized_model()


def _run(model, recipe, source=None):
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    ctx = SimpleNamespace(
        tokenizer=_ByteTokenizer(), data=source or _Text(), device=torch.device("cpu"), report={}, force=False
    )
    try:
        run_rotation_search(model, recipe, ctx)
    finally:
        handle.remove()
    return ctx.report["rotation"], len(forwards)


def _rotations(model):
    return {
        name: (m.input_quantizer.rotation if hasattr(m, "input_quantizer") else m.k_quantizer.rotation)
        for name, m in model.named_modules()
        if hasattr(m, "input_quantizer") or hasattr(m, "k_quantizer")
    }


def test_candidates_and_skip_reasons(base_model):
    candidates, skipped = collect_candidates(
        base_model, ["q_proj", "up_proj", "down_proj", "kv_cache", "qk_matmul"]
    )
    assert [c.matmul_type for c in candidates] == ["q_proj", "up_proj", "kv_cache"]
    assert "bypassed" in skipped["down_proj"] and "bypassed" in skipped["qk_matmul"]
    by_type = {c.matmul_type: c for c in candidates}
    assert len(by_type["q_proj"].sites) == 2  # one per layer
    assert len(by_type["kv_cache"].sites) == 4  # K and V per layer
    assert by_type["q_proj"].rotation_summary() == [
        {"n": 96, "kind": "kron", "description": by_type["q_proj"].sites[0][2].description}
    ]
    assert by_type["kv_cache"].rotation_summary()[0]["kind"] == "walsh"
    # Untouched until a search enables something.
    assert all(r is None for r in _rotations(base_model).values())


def test_search_is_deterministic_and_cache_short_circuits(base_model, tmp_path):
    model_a, model_b, model_c = (copy.deepcopy(base_model) for _ in range(3))
    source = _Text()
    rot_a, forwards_a = _run(model_a, _recipe(tmp_path / "a.json"), source)
    rot_b, forwards_b = _run(model_b, _recipe(tmp_path / "b.json"))
    assert source.splits == ["test"]  # [rotation_search].split honoured
    assert rot_a["winners"] == rot_b["winners"] and rot_a["rounds"] == rot_b["rounds"]
    assert rot_a["cache_status"] == "missing"
    n_trials = sum(len(r["trials"]) for r in rot_a["rounds"])
    assert forwards_a == forwards_b == 1 + n_trials  # 4 windows = one batch per score
    assert set(rot_a["rounds"][0]["trials"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "kv_cache",
    }
    assert set(rot_a["skipped"]) == {"down_proj", "qk_matmul"}

    cache = json.loads((tmp_path / "a.json").read_text())
    assert cache["winners"] == rot_a["winners"] and cache["baseline"] == rot_a["baseline"]
    assert (
        cache["inputs"]["rotation_search"]["calib_nsamples"] == 4
        and "cache_path" not in cache["inputs"]["rotation_search"]
    )

    rot_c, forwards_c = _run(model_c, _recipe(tmp_path / "a.json"))
    assert forwards_c == 0 and rot_c["cache_status"] == "hit"
    assert rot_c["winners"] == rot_a["winners"]
    assert _rotations(model_c) == _rotations(model_a)  # same rotations on the same quantizers
    # And the model with cached winners computes what the searched one does.
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model_c(ids).logits, model_a(ids).logits, rtol=0, atol=0)


def test_winners_are_applied_and_change_the_model(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    rot, _ = _run(model, _recipe(tmp_path / "c.json"))
    applied = {name for name, r in _rotations(model).items() if r is not None}
    expected = {
        name
        for name, m in model.named_modules()
        if getattr(m, "matmul_type", None) in rot["winners"]
        or ("kv_cache" in rot["winners"] and hasattr(m, "k_quantizer"))
    }
    assert applied == expected
    assert all(isinstance(r, Rotation) for r in _rotations(model).values() if r is not None)
    if rot["winners"]:
        assert rot["final"] < rot["baseline"]


def test_stale_cache_is_recomputed(base_model, tmp_path):
    cache = tmp_path / "d.json"
    _run(copy.deepcopy(base_model), _recipe(cache))
    first = json.loads(cache.read_text())
    rot, forwards = _run(copy.deepcopy(base_model), _recipe(cache, nsamples=5))
    assert forwards > 0
    assert rot["cache_status"].startswith("stale") and "calibration_windows_sha256" in rot["cache_status"]
    assert "rotation_search" in rot["cache_status"]
    second = json.loads(cache.read_text())
    assert second["input_hash"] != first["input_hash"]
    assert second["inputs"]["rotation_search"]["calib_nsamples"] == 5
    # A changed model (different weights) is stale too.
    other = copy.deepcopy(base_model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    rot, forwards = _run(other, _recipe(cache, nsamples=5))
    assert forwards > 0 and "model_fingerprint" in rot["cache_status"]


def test_edited_winners_are_not_applied(base_model, tmp_path):
    # Issue 30: winners edited by hand, input_hash intact, used to be applied as if searched.
    cache = tmp_path / "f.json"
    searched, _ = _run(copy.deepcopy(base_model), _recipe(cache))
    record = json.loads(cache.read_text())
    record["winners"] = ["up_proj"] if record["winners"] != ["up_proj"] else []
    cache.write_text(json.dumps(record))
    model = copy.deepcopy(base_model)
    rot, forwards = _run(model, _recipe(cache))
    assert forwards > 0 and rot["cache_status"].startswith("corrupt") and "content_hash" in rot["cache_status"]
    assert rot["winners"] == searched["winners"]
    assert json.loads(cache.read_text())["winners"] == searched["winners"]  # rewritten
    assert _run(model, _recipe(cache))[0]["cache_status"] == "hit"


def test_model_fingerprint_does_not_depend_on_the_hash_seed():
    # Issue 30: the fingerprint iterated a set of quantizer names, so the cache key changed per process.
    script = (
        "from mxptq.stages.rotsearch import model_fingerprint\n"
        "from tests.stages.test_rotsearch import _quantized_model\n"
        "print(model_fingerprint(_quantized_model()))\n"
    )
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # as pytest's
    fingerprints = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": path}
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                              text=True, check=False, timeout=300)
        assert done.returncode == 0, done.stderr
        fingerprints.add(done.stdout.strip())
    assert len(fingerprints) == 1


def test_matmul_types_restricts_the_search(base_model, tmp_path):
    rot, forwards = _run(
        copy.deepcopy(base_model), _recipe(tmp_path / "e.json", types='["up_proj", "down_proj"]')
    )
    assert set(rot["rounds"][0]["trials"]) == {"up_proj"}
    assert set(rot["skipped"]) == {"down_proj"}
    assert forwards == 1 + sum(len(r["trials"]) for r in rot["rounds"])


def test_av_matmul_rotation_is_causal_or_skipped_with_reason():
    """P is rotated along the key axis by `KeyAxisRotation.conjugate`. The attention output at
    position i must not depend on tokens after i, rotation or not."""
    model = make_tiny_llama(seed=0, num_hidden_layers=1, attn_implementation="eager")
    recipe = parse_recipe(
        RECIPE.replace(
            "'.av_matmul]\nbypass = true", "'.av_matmul]\ndata_in_block_size = 8\ndata_in_width = 4"
        ).format(cache="x", nsamples=4, eps=0.0, types=ALL_TYPES)
    )
    model = quantize_model(model, recipe)
    candidates, skipped = collect_candidates(model, ["av_matmul"])
    if not candidates:  # the activation quantizer composes forward/inverse itself
        assert "conjugate" in skipped["av_matmul"]
        pytest.skip(
            "ActQuantizer does not call Rotation.conjugate yet: av_matmul is skipped, with that reason"
        )
    (candidate,) = candidates
    candidate.enable()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 21), generator=gen)
    changed = ids.clone()
    changed[0, 13:] = torch.randint(0, 256, (8,), generator=gen)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, :13], b[0, :13], rtol=0, atol=0)
    candidate.disable()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, a)  # the rotation did change the computation


@pytest.mark.demo
def test_demo_model_rotations_are_exact(demo_model):
    """SmolLM2-135M under tutorial config C: hidden 576, MLP 1536, head_dim 64 rotate with
    H_36 ⊗ H_16, H_12 ⊗ H_128 and H_64 -- no block-diagonal fallback (issue 7)."""
    from mxptq.recipe import load_recipe

    model = copy.deepcopy(demo_model[0])
    recipe = load_recipe(REPO / "recipes" / "tutorial_c_rotsearch.toml")
    model = quantize_model(model, recipe)
    candidates, skipped = collect_candidates(model, list(recipe.rotation_search.matmul_types))
    sizes = {}
    for c in candidates:
        for entry in c.rotation_summary():
            sizes[entry["n"]] = (entry["kind"], entry["description"].split(" (")[0])
    assert sizes == {576: ("kron", "H_36 ⊗ H_16"), 1536: ("kron", "H_12 ⊗ H_128"), 64: ("walsh", "H_64")}
    assert [c.matmul_type for c in candidates] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "kv_cache",
    ]
    assert set(skipped) == {"qk_matmul", "av_matmul"}  # bypassed in config C
