"""Normalized Hadamard rotations along the last axis, for online activation rotation.

A `Rotation` of size n is an orthogonal n x n matrix H (H Hᵀ = I) applied to every vector
along the last axis: ``forward(x) = H x`` and ``inverse(y) = Hᵀ y`` (for row-major tensors:
``x @ H.T`` and ``y @ H``). A rotated activation quantizer computes Hᵀ·Q(H·x): the rotation
spreads an outlier over many elements, so the MX shared exponent of each block is set by a
smaller amax (QuaRot, Ashkboos et al. 2024; DESIGN.md "Online rotation").

Which H, by size n (`get_rotation` picks the first that applies):

- ``walsh``: n = 2^m. H = H_2^{⊗m} / sqrt(n) (Sylvester order) through the fast Walsh–Hadamard
  transform: m butterfly stages, O(n log n).
- ``kron``: n = K·2^m with K in `SUPPORTED_ORDERS` (12, 20, 28, 36, 40, 52, 60, 108, 140, 156,
  172). H = (H_K ⊗ H_(2^m)) / sqrt(n): x is viewed as a K x 2^m matrix X and
  H x = H_K · X · H_(2^m) (FWHT on the last axis, one dense K x K matmul on the other).
  The H_K come from `hadamard_constructions` (Paley I/II, Sylvester, Goethals–Seidel).
- ``block_diagonal``: any other n that is a multiple of the MX block size: the
  block-diagonal matrix with blocks H_(2^j), 2^j the largest power of two dividing n (so each
  Hadamard block covers whole MX blocks). Weaker mixing; reported as such, never silent.
- Otherwise `RotationSizeError`.

`KeyAxisRotation` handles the attention probabilities P along the key axis, whose length
changes with the sequence: block-diagonal Hadamard over the MX blocks (see its docstring).

Numerics: fp16/bf16 inputs are transformed in fp32 and cast back to the input dtype (a
butterfly in half precision would round at every one of the log2 n stages). Backends: the
``fast_hadamard_transform`` CUDA kernel (Dao-AILab) for the power-of-two part when it is
importable and the tensor is on CUDA; otherwise our torch implementation, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mxptq.errors import ModelError
from mxptq.nn.hadamard_constructions import CONSTRUCTIONS, SUPPORTED_ORDERS, hadamard_k

__all__ = [
    "SUPPORTED_ORDERS",
    "KeyAxisRotation",
    "Rotation",
    "RotationSizeError",
    "fast_kernel_available",
    "fwht",
    "get_rotation",
    "hadamard_matrix",
]

try:  # optional CUDA kernel: `pip install fast-hadamard-transform` (extra "cuda")
    from fast_hadamard_transform import hadamard_transform as _fht_cuda
except Exception:  # noqa: BLE001 - ImportError, or a build whose CUDA extension fails to load
    _fht_cuda = None

# The CUDA kernel handles sizes up to 2^15 (its documented limit) and pads rows to a multiple
# of 8 itself; tiny sizes stay on the torch path, where a kernel launch buys nothing.
_FHT_CUDA_MIN = 8
_FHT_CUDA_MAX = 1 << 15


class RotationSizeError(ModelError):
    """No Hadamard rotation (exact or block-diagonal) exists for a requested size."""


def fast_kernel_available() -> bool:
    """True when the fast_hadamard_transform CUDA kernel is importable."""
    return _fht_cuda is not None


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- transforms
def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Walsh–Hadamard transform along the last axis (length 2^m), Sylvester ordering.

    Butterfly stage h (h = 1, 2, 4, ...): view the row as [..., n / 2h, 2, h] and replace the pair
    (a, b) by (a + b, a − b) — the product of the m stages is H_2^{⊗m}. Computed in x's dtype;
    callers upcast. `normalize` divides by sqrt(n) (makes the transform orthogonal).
    """
    n = x.shape[-1]
    if not _is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(y.shape[0], n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(*lead, n)
    return y * (1.0 / math.sqrt(n)) if normalize else y


def _fwht_normalized(x: torch.Tensor) -> torch.Tensor:
    """Normalized FWHT on the last axis in x's (fp32/fp64) dtype, CUDA kernel when possible."""
    n = x.shape[-1]
    if (
        _fht_cuda is not None
        and x.is_cuda
        and x.dtype == torch.float32
        and _FHT_CUDA_MIN <= n <= _FHT_CUDA_MAX
    ):
        # hadamard_transform(x, scale) = scale · (x @ H_n) with the unnormalized Sylvester H_n
        # (symmetric, so x @ H_n = H_n x per row); scale 1/sqrt(n) normalizes it.
        return _fht_cuda(x.contiguous(), 1.0 / math.sqrt(n))
    return fwht(x)


_MATRIX_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _dense_factor(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalized H_K / sqrt(K) as a tensor, cached per (K, device, dtype)."""
    key = (k, str(device), dtype)
    mat = _MATRIX_CACHE.get(key)
    if mat is None:
        mat = torch.from_numpy(hadamard_k(k).astype(np.float64) / math.sqrt(k)).to(device=device, dtype=dtype)
        _MATRIX_CACHE[key] = mat
    return mat


# ---------------------------------------------------------------- Rotation
@dataclass(frozen=True)
class Rotation:
    """Normalized Hadamard rotation of size n along the last axis.

    kind: "walsh" (n = 2^m), "kron" (n = K·2^m: H_K ⊗ H_2^m) or "block_diagonal"
    (n/pow2 diagonal blocks of H_pow2). `k` is the dense factor order (1 unless kron) and
    `pow2` the Walsh size (the whole n, the 2^m factor, or the diagonal block).
    """

    n: int
    kind: str
    k: int
    pow2: int
    description: str = field(compare=False)

    # -- application
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """H x along the last axis; same shape and dtype as x."""
        return self._apply(x, transpose=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Hᵀ y along the last axis; inverse(forward(x)) == x up to rounding."""
        return self._apply(y, transpose=True)

    def conjugate(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hᵀ · fn(H · x): the rotated quantizer when fn is the MX fake-quantizer."""
        return self.inverse(fn(self.forward(x)))

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a last axis of size {x.shape[-1]}")
        in_dtype = x.dtype
        work = x.to(_compute_dtype(in_dtype))
        lead = work.shape[:-1]
        if self.kind == "walsh":
            # Sylvester H is symmetric: forward and inverse are the same map.
            out = _fwht_normalized(work)
        elif self.kind == "block_diagonal":
            out = _fwht_normalized(work.reshape(*lead, self.n // self.pow2, self.pow2)).reshape(*lead, self.n)
        else:  # kron: X (K x 2^m) -> H_K X H_2^m, or H_Kᵀ X H_2^m for the inverse
            grid = _fwht_normalized(work.reshape(*lead, self.k, self.pow2))
            h_k = _dense_factor(self.k, work.device, work.dtype)
            out = torch.matmul(h_k.T if transpose else h_k, grid).reshape(*lead, self.n)
        return out.to(in_dtype)

    # -- inspection
    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The dense n x n matrix H (forward(x) == x @ H.T); for tests and small n."""
        return self.forward(torch.eye(self.n, dtype=dtype, device=device)).T.contiguous()

    def to_dict(self) -> dict:
        return {"n": self.n, "kind": self.kind, "description": self.description}


@dataclass(frozen=True)
class KeyAxisRotation:
    """Rotation of the attention probabilities P along the key axis (av_matmul).

    The key-axis length L changes with the sequence (and, at decode time, with every token),
    so no fixed-size H fits. We rotate within each MX block of the P quantizer (block size B,
    a power of two): the row is zero-padded to a multiple of B — exactly the padding the MX
    quantizer itself applies — each block is multiplied by H_B / sqrt(B), quantized, rotated
    back, and the padding is cut off. Blocks are aligned from key 0, like the MX blocks, so
    the same rotation applies to a growing KV cache.

    IMPORTANT: positions where P is exactly 0 (causally masked keys; softmax is never exactly
    0 elsewhere except by underflow) are set back to 0 after the inverse rotation. Without
    that, Hᵀ·Q(H·p) spreads quantization error onto future keys and the prefill emulation
    would let a query read future values. With it, row i equals what a decoder holding only
    keys 0..i would compute (its last block zero-padded), i.e. the emulation is causal.

    Use `conjugate(p, quantize_fn)`; `forward`/`inverse` alone change the last-axis length
    (to the padded length) and exist for inspection.
    """

    block: int
    kind: str = field(default="block_diagonal", init=False)

    def __post_init__(self):
        if not _is_pow2(self.block) or self.block < 2:
            raise RotationSizeError(
                f"key-axis rotation needs an MX block size that is a power of two >= 2, got {self.block}"
            )

    @property
    def description(self) -> str:
        return f"block-diagonal H_{self.block} over the key axis (MX blocks, zero-padded tail)"

    @property
    def n(self) -> None:  # no fixed size
        return None

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        pad = (-x.shape[-1]) % self.block
        return torch.nn.functional.pad(x, (0, pad)) if pad else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = self._padded(x.to(_compute_dtype(x.dtype)))
        lead, n = work.shape[:-1], work.shape[-1]
        out = _fwht_normalized(work.reshape(*lead, n // self.block, self.block)).reshape(*lead, n)
        return out.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y)  # H_B is symmetric and orthogonal; y is already block-aligned

    def conjugate(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = self.inverse(fn(self.forward(x)))[..., : x.shape[-1]]
        return out.masked_fill(x == 0, 0)

    def to_dict(self) -> dict:
        return {"n": None, "kind": self.kind, "block": self.block, "description": self.description}


# ---------------------------------------------------------------- factory
def _decompose(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K·2^m and K in SUPPORTED_ORDERS (smallest K), or None."""
    for k in SUPPORTED_ORDERS:
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    return None


_ROTATION_CACHE: dict[tuple[int, int], Rotation] = {}


def get_rotation(n: int, block_size: int = 32, device=None, dtype=None) -> Rotation:
    """The Hadamard rotation for vectors of length n (see the module docstring for the choice).

    block_size: the MX block size of the quantizer that follows; used only by the
    block-diagonal fallback. device/dtype: if given, the dense factor is prepared there now
    (matrices are cached per (K, device, dtype) either way).
    Raises RotationSizeError when n has no decomposition and is not a multiple of block_size.
    """
    if n < 1:
        raise RotationSizeError(f"rotation size must be positive, got {n}")
    key = (n, block_size)
    rot = _ROTATION_CACHE.get(key)
    if rot is None:
        rot = _build_rotation(n, block_size)
        _ROTATION_CACHE[key] = rot
    if rot.kind == "kron" and (device is not None or dtype is not None):
        _dense_factor(rot.k, torch.device(device or "cpu"), _compute_dtype(dtype or torch.float32))
    return rot


def _build_rotation(n: int, block_size: int) -> Rotation:
    if _is_pow2(n):
        return Rotation(n=n, kind="walsh", k=1, pow2=n, description=f"H_{n} (Walsh)")
    decomposition = _decompose(n)
    if decomposition is not None:
        k, p2 = decomposition
        return Rotation(
            n=n, kind="kron", k=k, pow2=p2, description=f"H_{k} ⊗ H_{p2} (H_{k}: {CONSTRUCTIONS[k]})"
        )
    if _is_pow2(block_size) and block_size >= 2 and n % block_size == 0:
        p2 = n & -n  # largest power of two dividing n (>= block_size here)
        return Rotation(
            n=n,
            kind="block_diagonal",
            k=1,
            pow2=p2,
            description=f"block-diagonal {n // p2} x H_{p2} (no H_K ⊗ H_2^m for {n})",
        )
    raise RotationSizeError(
        f"no Hadamard rotation of size {n}: it is not 2^m or K·2^m with K in {list(SUPPORTED_ORDERS)}, "
        f"and not a multiple of the MX block size {block_size} (a power of two) for a block-diagonal one"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Dense normalized Hadamard matrix of order n (orthogonal: H Hᵀ = I), built independently
    of the fast transforms by Kronecker products: H_2^{⊗m} for n = 2^m, H_K ⊗ H_2^m for
    n = K·2^m. Raises RotationSizeError for other n (no full Hadamard matrix available)."""
    if _is_pow2(n):
        k, p2 = 1, n
    else:
        decomposition = _decompose(n)
        if decomposition is None:
            raise RotationSizeError(
                f"no Hadamard matrix of order {n}: need 2^m or K·2^m with K in {list(SUPPORTED_ORDERS)}"
            )
        k, p2 = decomposition
    mat = np.ones((1, 1), dtype=np.int64) if k == 1 else hadamard_k(k)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int64)
    for _ in range(p2.bit_length() - 1):
        mat = np.kron(mat, h2)
    return torch.from_numpy(mat.astype(np.float64) / math.sqrt(n)).to(dtype=dtype, device=device)
