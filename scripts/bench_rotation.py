"""Benchmark the online Hadamard rotation (issue 7): FWHT throughput and rotation overhead.

Not a test: records timings with the device, library versions and the command line, as JSON.

  python scripts/bench_rotation.py --out "$OUT/bench_rotation.json"            # GPU if present
  python scripts/bench_rotation.py --device cpu --tokens 512 --out bench.json  # quick CPU run

Sections:
- `transform`: forward() time and effective bandwidth per size (64 ... 14336) and dtype, for
  our torch path and for the fast_hadamard_transform kernel when it is importable (CUDA).
- `quantizer_overhead`: per activation quantizer of the demo model (SmolLM2-135M shapes:
  hidden 576, MLP 1536, head_dim 64), time of Q(x) vs Hᵀ·Q(H·x) on `--tokens` tokens, and the
  sum over one forward (30 layers, every matmul type rotated) vs the unrotated sum.
- `model_forward` (with --model-forward): the quantized demo model (tutorial config C
  selectors, RTN weights) forward on `--tokens` tokens with no rotation vs all rotatable types.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxptq import __version__
from mxptq.nn import hadamard
from mxptq.nn.hadamard import get_rotation

SIZES = [64, 576, 1536, 2048, 4096, 8192, 11008, 14336]
# SmolLM2-135M per layer: (matmul type, last-axis size, rows per token)
DEMO_LAYERS = 30
DEMO_SITES = [
    ("q_proj", 576, 1),
    ("k_proj", 576, 1),
    ("v_proj", 576, 1),
    ("o_proj", 576, 1),
    ("gate_proj", 576, 1),
    ("up_proj", 576, 1),
    ("down_proj", 1536, 1),
    ("kv_cache.k", 64, 3),
    ("kv_cache.v", 64, 3),  # 3 KV heads of head_dim 64
    ("qk_matmul", 64, 9),  # 9 query heads
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]


def bench_transform(device: torch.device, tokens: int, repeats: int) -> list[dict]:
    rows = []
    for n in SIZES:
        rot = get_rotation(n)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(tokens, n, device=device).to(dtype)
            seconds = _time(lambda rot=rot, x=x: rot.forward(x), device, repeats)
            moved = 2 * x.numel() * x.element_size()
            rows.append(
                {
                    "n": n,
                    "kind": rot.kind,
                    "description": rot.description,
                    "dtype": str(dtype),
                    "rows": tokens,
                    "backend": _backend(rot, x),
                    "ms": seconds * 1e3,
                    "effective_GBps": moved / seconds / 1e9,
                }
            )
            if rot.kind == "walsh" and hadamard.fast_kernel_available() and device.type == "cuda":
                from fast_hadamard_transform import hadamard_transform

                seconds = _time(lambda x=x, n=n: hadamard_transform(x, n**-0.5), device, repeats)
                rows.append(
                    {
                        "n": n,
                        "kind": "walsh",
                        "dtype": str(dtype),
                        "rows": tokens,
                        "backend": "fast_hadamard_transform (direct, native dtype)",
                        "ms": seconds * 1e3,
                        "effective_GBps": moved / seconds / 1e9,
                    }
                )
    return rows


def _backend(rot, x: torch.Tensor) -> str:
    if hadamard.fast_kernel_available() and x.is_cuda:
        return (
            "fast_hadamard_transform (fp32) + torch"
            if rot.kind == "kron"
            else "fast_hadamard_transform (fp32)"
        )
    return "torch butterfly" + (" + dense H_K" if rot.kind == "kron" else "")


def bench_quantizer_overhead(device: torch.device, tokens: int, repeats: int) -> dict:
    from mxptq.formats import Format, quantize

    fmt = Format.from_keys("mxint", width=4, block_size=32)
    sites, plain_total, rotated_total = [], 0.0, 0.0
    for name, n, per_token in DEMO_SITES:
        rot = get_rotation(n)
        x = torch.randn(tokens * per_token, n, device=device, dtype=torch.float16)
        plain = _time(lambda x=x: quantize(x, fmt, axis=-1), device, repeats)
        rotated = _time(
            lambda rot=rot, x=x: rot.conjugate(x, lambda t: quantize(t, fmt, axis=-1)), device, repeats
        )
        sites.append(
            {
                "site": name,
                "n": n,
                "rotation": rot.description,
                "rows": x.shape[0],
                "quantize_ms": plain * 1e3,
                "rotated_quantize_ms": rotated * 1e3,
            }
        )
        plain_total += plain * DEMO_LAYERS
        rotated_total += rotated * DEMO_LAYERS
    return {
        "format": fmt.label,
        "tokens": tokens,
        "layers": DEMO_LAYERS,
        "dtype": "float16",
        "sites": sites,
        "per_forward_quantize_ms": plain_total * 1e3,
        "per_forward_rotated_quantize_ms": rotated_total * 1e3,
        "per_forward_rotation_overhead_ms": (rotated_total - plain_total) * 1e3,
    }


def bench_model_forward(device: torch.device, tokens: int, repeats: int) -> dict:
    from types import SimpleNamespace

    from mxptq.models import DEMO_MODEL, load_model
    from mxptq.recipe import load_recipe
    from mxptq.stages.rotsearch import collect_candidates
    from mxptq.stages.transform import quantize_model

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tutorial_c_rotsearch.toml")
    cfg = SimpleNamespace(
        name=DEMO_MODEL,
        dtype="float16",
        device=str(device),
        attn_implementation="eager",
        trust_remote_code=False,
    )
    model, _, _ = load_model(cfg)
    model = quantize_model(model.to(device), recipe)
    candidates, skipped = collect_candidates(model, list(recipe.rotation_search.matmul_types))
    ids = torch.randint(0, 1000, (1, tokens), device=device, generator=None)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids)

    off = _time(forward, device, repeats)
    for c in candidates:
        c.enable()
    on = _time(forward, device, repeats)
    return {
        "tokens": tokens,
        "rotated_types": [c.matmul_type for c in candidates],
        "skipped": skipped,
        "rotations": {c.matmul_type: c.rotation_summary() for c in candidates},
        "forward_ms_no_rotation": off * 1e3,
        "forward_ms_all_rotated": on * 1e3,
        "overhead_ms": (on - off) * 1e3,
        "overhead_fraction": (on - off) / off,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8 * 512, help="rows per transform (tokens)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model-forward", action="store_true", help="also time the demo model forward")
    parser.add_argument("--out", default="bench_rotation.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "command": " ".join(sys.argv),
        "mxptq_version": __version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "fast_hadamard_transform": hadamard.fast_kernel_available(),
        "transform": bench_transform(device, args.tokens, args.repeats),
        "quantizer_overhead": bench_quantizer_overhead(device, args.tokens, args.repeats),
    }
    if args.model_forward:
        try:
            result["model_forward"] = bench_model_forward(device, min(args.tokens, 2048), args.repeats)
        except Exception as exc:  # noqa: BLE001 - a benchmark records what failed and carries on
            result["model_forward"] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("transform",)}, indent=2)[:4000])


if __name__ == "__main__":
    main()
