"""MX-aware GPTQ, the pure algorithm (no I/O, no model, no prints).

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) with the MX quantizer plugged in (DESIGN.md "GPTQ for
MX"). Paper notation: W [rows = out_features, columns = in_features], H = 2/N sum x x^T over the
calibration inputs x of the linear (fp32), U = Cholesky(H^-1) upper ("Hinv" in the paper),
suffix 1 = the current block of columns, Err1 = the block's scaled quantization error.

The MX block (`fmt.block_size` consecutive input columns of one row, sharing one power-of-two
scale 2^scale_exp) is the GPTQ block: for each block we first choose the shared exponent of every
row from the *current*, already error-compensated weights of that block, then quantize its
elements with `mxptq.formats.quantize_elements` (format math lives only in mxptq.formats), then
push the block's error onto the columns to its right with one matmul (the paper's lazy batch
update).

Propagation is exact for any Q1: quantizing the columns F = [i1, i2) to Q1 with the later
columns R still free, the OBS-optimal update of R is W_R -= (W1 - Q1) (U_FF)^-1 U_FR, because
the inverse of the trailing Hessian H[i1:, i1:] has the Cholesky factor U[i1:, i1:] (the identity
GPTQ's Cholesky reformulation rests on). So Err1 = (W1 - Q1) U1^-1 (a triangular solve), whether
the block was quantized jointly or column by column (in the column case it equals the paper's
accumulated Err1, since W1 - Q1 = Err1 U1 holds column by column).

intra_block:
  "joint"  -- round the whole block with its scales at once, then propagate (like the tutorial's
              reference); no per-column Python loop.
  "column" -- fix the block's scales, then the classical GPTQ inner loop: quantize one column,
              compensate the block's remaining columns, next column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mxptq.formats import Format, quantize, quantize_elements, scale_exp_from_amax

ScaleSearch = Literal["absmax", "quantile", "output"]
IntraBlock = Literal["joint", "column"]
SCALE_SEARCHES: tuple[str, ...] = ("absmax", "quantile", "output")
INTRA_BLOCK_MODES: tuple[str, ...] = ("joint", "column")

# Clip ratios r tried by the quantile/output searches (scale from r * amax). MX scales are powers
# of two and every scale rule satisfies e(amax / 2) = e(amax) - 1, so a ratio in [2^-(k+1), 2^-k]
# can only yield the exponents e0 - k or e0 - k - 1 (e0 = absmax exponent): 1, 1/2, 1/4 reach
# every exponent any ratio in [1/4, 1] reaches; a finer grid only repeats candidates. 2 (one
# exponent coarser) is there because two rules already clip at absmax: OCP saturates amax/scale
# in (6, 8) to 6 for E2M1, the tutorial's MXINT rule maps a positive maximum near 2^e to 7/8 of
# it (measured on Gaussian weights, MXFP4: ratio 2 cuts ||W - Q||^2 by 9%; MXINT4 tutorial:
# ratios 1/2 and 1/4 cut it by 30%). 1.0 comes first so that ties keep the absmax scale
# (argmin returns the first minimum).
DEFAULT_CLIP_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 2.0)

# Cholesky failure: damping is multiplied by 10 up to this many times (0.01 -> 1e4 * mean diag H,
# at which point H + damping is numerically a multiple of the identity), then we give up on
# compensation and return plain round-to-nearest with the chosen scales.
MAX_DAMPING_RETRIES = 6


@dataclass(frozen=True)
class GptqStats:
    """What `mx_gptq` did besides producing Q.

    damp_percent: the damping actually used, as a fraction of mean(diag H) (the paper's 1%
        unless Cholesky failed and it was raised);
    cholesky_retries: how many times the damping was multiplied by 10;
    fallback_rtn: True if H could not be factorised at any damping: then no error was
        propagated and Q is round-to-nearest with the chosen scales (never NaN);
    dead_columns: inputs that were always zero in calibration (H[i, i] == 0); their weights
        are set to 0, as in the paper's reference implementation.
    """

    damp_percent: float
    cholesky_retries: int
    fallback_rtn: bool
    dead_columns: int


def mx_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    fmt: Format,
    *,
    damp_percent: float = 0.01,
    scale_search: ScaleSearch = "absmax",
    X: torch.Tensor | None = None,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    intra_block: IntraBlock = "joint",
    x_chunk_rows: int = 4096,
    act_order: bool = False,
) -> tuple[torch.Tensor, GptqStats]:
    """Quantize W [rows, columns] to MX format `fmt` with GPTQ error compensation.

    H: [columns, columns] Hessian 2/N X^T X of the linear's calibration inputs (fp32, on W's
    device). X: optional calibration inputs [N, columns]; only the "output" scale search reads
    it, to evaluate its objective directly in `x_chunk_rows` chunks instead of via H (the same
    objective, see `block_objective`). Returns (Q fp32 on W's device, stats); every MX block of
    Q is a fixed point of `formats.quantize` (RTN re-quantization is a no-op on Q).

    act_order: visit the columns in order of decreasing H[i, i] (the reference's `--act-order`),
    which quantizes the inputs with the most energy first, while every other column can still
    absorb their error. An MX block's columns are then visited out of order, so its shared
    exponents are fixed first, from the uncompensated W (the reference's "static groups"), and
    the columns are quantized one by one (`intra_block` does not apply).
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32)
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H = H.clone()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order:
        return _mx_gptq_act_order(W, H, dead, fmt, damp_percent, scale_search, X, clip_ratios, x_chunk_rows)
    U, damp_used, retries = upper_cholesky_of_inverse(H, damp_percent)
    H_objective = H  # the output objective uses the undamped Hessian (the calibration inputs)
    fallback_rtn = U is None
    if fallback_rtn:
        U = torch.eye(columns, dtype=W.dtype, device=W.device)
        H_objective = U
    Q = torch.empty_like(W)
    B = fmt.block_size
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        W1 = W[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        X1 = None if X is None else X[:, i1:i2].to(W.device, torch.float32)
        scale_exp = choose_scale_exp(
            W1,
            fmt,
            scale_search,
            clip_ratios=clip_ratios,
            H11=H_objective[i1:i2, i1:i2],
            X1=X1,
            x_chunk_rows=x_chunk_rows,
        )
        if intra_block == "joint":
            Q1 = quantize_elements(W1, fmt, scale_exp)
        else:
            Q1 = _quantize_columns(W1.clone(), U1, fmt, scale_exp)
        # Canonical grid point: with the tutorial's asymmetric MXINT rule a block whose largest
        # code is a positive power of two (+4 at b = 4) is not a fixed point of RTN (RTN picks a
        # finer exponent and clamps that value to 7/8). One `quantize` maps any grid point to a
        # fixed point, so transform's RTN re-quantization of Q is a no-op (issue 6); it is exact
        # for every other block.
        Q1 = quantize(Q1, fmt)
        Err1 = torch.linalg.solve_triangular(U1, W1 - Q1, upper=True, left=False)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update (paper, Algorithm 1)
        Q[:, i1:i2] = Q1
    stats = GptqStats(float(damp_used), retries, fallback_rtn, int(dead.sum()))
    return Q, stats


def _mx_gptq_act_order(
    W: torch.Tensor,
    H: torch.Tensor,
    dead: torch.Tensor,
    fmt: Format,
    damp_percent: float,
    scale_search: ScaleSearch,
    X: torch.Tensor | None,
    clip_ratios: tuple[float, ...],
    x_chunk_rows: int,
) -> tuple[torch.Tensor, GptqStats]:
    """`mx_gptq` with act_order (its docstring): static block exponents, then GPTQ's column loop
    over the columns sorted by decreasing H[i, i], lazily batched in groups of block_size."""
    rows, columns = W.shape
    B = fmt.block_size
    scale_exp = torch.empty(rows, columns, dtype=torch.int32, device=W.device)
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        X1 = None if X is None else X[:, i1:i2].to(W.device, torch.float32)
        block = choose_scale_exp(W[:, i1:i2], fmt, scale_search, clip_ratios=clip_ratios,
                                 H11=H[i1:i2, i1:i2], X1=X1, x_chunk_rows=x_chunk_rows)
        scale_exp[:, i1:i2] = block.expand(-1, i2 - i1)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H, scale_exp = W[:, perm], H[perm][:, perm], scale_exp[:, perm]
    U, damp_used, retries = upper_cholesky_of_inverse(H, damp_percent)
    fallback_rtn = U is None
    if fallback_rtn:
        U = torch.eye(columns, dtype=W.dtype, device=W.device)
    Q = torch.empty_like(W)
    for i1 in range(0, columns, B):
        i2 = min(i1 + B, columns)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            q = quantize_elements(W1[:, j : j + 1], fmt, scale_exp[:, i1 + j : i1 + j + 1])
            Err1[:, j : j + 1] = (W1[:, j : j + 1] - q) / U1[j, j]
            W1[:, j + 1 :] -= Err1[:, j : j + 1] @ U1[j : j + 1, j + 1 :]
            Q[:, i1 + j : i1 + j + 1] = q
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = torch.empty_like(Q).index_copy_(1, perm, Q)  # back to the input order
    # Canonical grid point, as in mx_gptq (the tutorial rule's +4 blocks); here after the fact, so
    # such a block's move is not compensated (it is rare: a block whose largest code is exactly +4).
    Q = quantize(Q, fmt)
    return Q, GptqStats(float(damp_used), retries, fallback_rtn, int(dead.sum()))


def _quantize_columns(
    W1: torch.Tensor, U1: torch.Tensor, fmt: Format, scale_exp: torch.Tensor
) -> torch.Tensor:
    """The classical GPTQ inner loop inside one MX block (scales already fixed): quantize column
    j, then compensate the block's columns j+1.. with its error (updates W1 in place)."""
    Q1 = torch.empty_like(W1)
    for j in range(W1.shape[1]):
        Q1[:, j : j + 1] = quantize_elements(W1[:, j : j + 1], fmt, scale_exp)
        err = (W1[:, j : j + 1] - Q1[:, j : j + 1]) / U1[j, j]
        W1[:, j + 1 :] -= err @ U1[j : j + 1, j + 1 :]
    return Q1


def upper_cholesky_of_inverse(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor | None, float, int]:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, U upper triangular (paper, Step 2).

    On failure (not positive definite, or non-finite result) the damping is multiplied by 10
    (at least 1e-3) up to MAX_DAMPING_RETRIES times. Returns (U or None, damping used, retries).
    """
    mean_diag = torch.diag(H).mean()
    diagonal = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent
    for retries in range(MAX_DAMPING_RETRIES + 1):
        if retries:
            damp = max(damp * 10.0, 1e-3)
        H_damped = H.clone()
        H_damped[diagonal, diagonal] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(H_damped)
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and bool(torch.isfinite(U).all()):
            return U, damp, retries
    return None, damp, MAX_DAMPING_RETRIES


def choose_scale_exp(
    W1: torch.Tensor,
    fmt: Format,
    scale_search: ScaleSearch,
    *,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    H11: torch.Tensor | None = None,
    X1: torch.Tensor | None = None,
    x_chunk_rows: int = 4096,
) -> torch.Tensor:
    """Shared exponent [rows, 1] (int32) for one MX block W1 [rows, <= block_size].

    absmax: `scale_exp_from_amax` of each row's amax. quantile / output: for every clip ratio r,
    the scale of r * amax; per row the candidate with the smallest `block_objective` wins (all
    candidates are evaluated at once, [R, rows, B]).
    """
    amax = W1.abs().amax(dim=1, keepdim=True)
    if scale_search == "absmax":
        return scale_exp_from_amax(amax, fmt)
    ratios = torch.tensor(clip_ratios, dtype=torch.float32, device=W1.device).view(-1, 1, 1)
    candidates = scale_exp_from_amax(ratios * amax, fmt)  # [R, rows, 1]
    D = W1 - quantize_elements(W1, fmt, candidates)  # [R, rows, B]
    best = block_objective(D, scale_search, H11=H11, X1=X1, x_chunk_rows=x_chunk_rows).argmin(dim=0)
    return candidates.gather(0, best.view(1, -1, 1)).squeeze(0)


def block_objective(
    D: torch.Tensor,
    scale_search: ScaleSearch,
    *,
    H11: torch.Tensor | None = None,
    X1: torch.Tensor | None = None,
    x_chunk_rows: int = 4096,
) -> torch.Tensor:
    """Per-row error of candidate quantizations of one block, D = W1 - Q1 [R, rows, B] -> [R, rows].

    quantile: ||W1 - Q1||^2 per row (the tutorial's `quantile_search`).
    output:   ||X1 (W1 - Q1)^T||^2 per row (the tutorial's `clip_search_y`), X1 [N, B] = the
              block's calibration inputs. Since ||X1 d^T||^2 = d X1^T X1 d^T = (N / 2) d H11 d^T
              with H = 2/N X^T X, the Gram form is the same objective up to a constant factor
              (same argmin) and costs B^2 per row instead of N * B; it is used unless X1 is given.
    """
    if scale_search == "quantile":
        return D.square().sum(-1)
    if X1 is None:
        return ((D @ H11) * D).sum(-1)
    total = torch.zeros(D.shape[:2], dtype=torch.float32, device=D.device)
    for X1_chunk in X1.split(x_chunk_rows):
        total += (X1_chunk @ D.transpose(1, 2)).square().sum(1)
    return total


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) = (2/N) ||X (W - Q)^T||_F^2: the layer-output error of Q."""
    delta = W.to(torch.float32) - Q.to(torch.float32)
    return float(((delta @ H) * delta).sum())


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T) = (2/N) ||X W^T||_F^2 (the denominator of the relative error)."""
    W = W.to(torch.float32)
    return float(((W @ H) * W).sum())
