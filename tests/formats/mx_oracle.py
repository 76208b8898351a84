"""Independent pure-Python oracle for MX formats, used as the expectation in tests/formats.

Written from the OCP MX v1.0 tables and the tutorial's formula, in exact rational arithmetic
(fractions.Fraction), sharing no code with mxptq.formats: element values come from decoding bit
patterns by the spec's formula, rounding picks the nearest grid value (ties to the even code)
by enumeration, and log2 is found by comparing against powers of two.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from fractions import Fraction

# OCP MX v1.0, Table 1 (FP8) and Table 2 (FP6, FP4).
_FP_TABLE_COLUMNS = ("exp", "man", "bias", "emax", "max", "min_normal", "min_subnormal")
_FP_TABLE = {
    "e2m1": (2, 1, 1, 2, 6.0, 1.0, 0.5),
    "e2m3": (2, 3, 1, 2, 7.5, 1.0, 0.125),
    "e3m2": (3, 2, 3, 4, 28.0, 0.25, 0.0625),
    "e4m3": (4, 3, 7, 8, 448.0, 2.0**-6, 2.0**-9),
    "e5m2": (5, 2, 15, 15, 57344.0, 2.0**-14, 2.0**-16),
}
FP_SPEC = {name: dict(zip(_FP_TABLE_COLUMNS, row, strict=True)) for name, row in _FP_TABLE.items()}
INT_BITS = range(2, 9)
ALL_ELEMENTS = [f"int{b}" for b in INT_BITS] + list(FP_SPEC)


def fp_decode(name: str, code: int) -> float:
    """Value of an OCP bit pattern (sign | exponent | mantissa), NaN/inf per the spec tables."""
    spec = FP_SPEC[name]
    bits = 1 + spec["exp"] + spec["man"]
    sign = -1.0 if (code >> (bits - 1)) & 1 else 1.0
    exp_field = (code >> spec["man"]) & ((1 << spec["exp"]) - 1)
    man_field = code & ((1 << spec["man"]) - 1)
    all_ones = (1 << spec["exp"]) - 1
    if name == "e4m3" and exp_field == all_ones and man_field == (1 << spec["man"]) - 1:
        return math.nan  # S.1111.111
    if name == "e5m2" and exp_field == all_ones:
        return sign * math.inf if man_field == 0 else math.nan
    if exp_field == 0:  # subnormal: 2^(1-bias) * 0.M
        return sign * 2.0 ** (1 - spec["bias"]) * (man_field / 2 ** spec["man"])
    return sign * 2.0 ** (exp_field - spec["bias"]) * (1 + man_field / 2 ** spec["man"])


def fp_grid(name: str) -> list[tuple[Fraction, int]]:
    """Finite non-negative values with their codes (sign bit clear), ascending."""
    bits = 1 + FP_SPEC[name]["exp"] + FP_SPEC[name]["man"]
    out = []
    for code in range(2 ** (bits - 1)):
        value = fp_decode(name, code)
        if math.isfinite(value):
            out.append((Fraction(value), code))
    return sorted(out)


def int_bits(name: str) -> int:
    return int(name[3:])


def max_value(name: str) -> float:
    if name in FP_SPEC:
        return FP_SPEC[name]["max"]
    b = int_bits(name)
    return (2 ** (b - 1) - 1) / 2 ** (b - 2)


def emax(name: str) -> int:
    return FP_SPEC[name]["emax"] if name in FP_SPEC else 0


def floor_log2(v: float) -> int:
    """Largest e with 2^e <= v (v > 0), by exact comparison with powers of two."""
    v = Fraction(v)
    e = 0
    while Fraction(2) ** (e + 1) <= v:
        e += 1
    while Fraction(2) ** e > v:
        e -= 1
    return e


def ceil_log2(v: float) -> int:
    e = floor_log2(v)
    return e if Fraction(2) ** e == Fraction(v) else e + 1


def scale_exp(amax: float, name: str, rule: str) -> int:
    """Shared exponent by the rule's formula (zero block -127, NaN block 128, clamp to E8M0)."""
    if not math.isfinite(amax):
        return 128
    if amax == 0:
        return -127
    if rule == "mse":  # the search's starting point: the family's default rule
        return scale_exp(amax, name, "ocp" if name in FP_SPEC else "tutorial")
    if rule == "ocp":
        s = floor_log2(amax) - emax(name)
    elif rule == "tutorial":
        s = ceil_log2(amax) - 1  # e = ceil(log2 amax); int value = code * 2^-(b-2)
    elif rule == "symmetric":
        s = floor_log2(amax) - emax(name) - 2
        while Fraction(amax) > Fraction(max_value(name)) * Fraction(2) ** s:
            s += 1
    else:
        raise ValueError(rule)
    return max(-127, min(127, s))


def round_element(v: Fraction, name: str, rule: str) -> Fraction:
    """Nearest element value to v (ties to the even code), saturating / clamping by the rule."""
    if name in FP_SPEC:
        grid = fp_grid(name)
        values = [g for g, _ in grid]
        mag = abs(v)
        if mag >= values[-1]:
            q = values[-1]
        else:
            i = bisect_left(values, mag)
            if values[i] == mag:
                q = mag
            else:
                (lo, lo_code), (hi, _) = grid[i - 1], grid[i]
                d_lo, d_hi = mag - lo, hi - mag
                q = lo if d_lo < d_hi or (d_lo == d_hi and lo_code % 2 == 0) else hi
        return -q if v < 0 else q
    b = int_bits(name)
    scaled = v * 2 ** (b - 2)
    code = round(scaled)  # Python rounds Fractions half to even
    lowest = -(2 ** (b - 1)) if rule in ("tutorial", "mse") else -(2 ** (b - 1) - 1)
    code = max(lowest, min(2 ** (b - 1) - 1, code))
    return Fraction(code, 2 ** (b - 2))


def quantize_block(block: list[float], name: str, rule: str) -> list[float]:
    amax = max((abs(x) for x in block), default=0.0)
    if any(math.isnan(x) for x in block):
        amax = math.nan
    s = scale_exp(amax, name, rule)
    if s == 128:
        return [math.nan] * len(block)

    def at(s: int) -> list[Fraction]:
        scale = Fraction(2) ** s
        return [round_element(Fraction(x) / scale, name, rule) * scale for x in block]

    best = at(s)
    if rule == "mse" and s != -127:  # exact squared errors; ties stay with s, then s - 1
        best_error = sum((q - Fraction(x)) ** 2 for q, x in zip(best, block))
        for candidate in (s - 1, s + 1):
            if -127 <= candidate <= 127:
                values = at(candidate)
                error = sum((q - Fraction(x)) ** 2 for q, x in zip(values, block))
                if error < best_error:
                    best, best_error = values, error
    return [float(v) for v in best]


def quantize_rows(rows: list[list[float]], name: str, rule: str, block_size: int) -> list[list[float]]:
    """Blocks of `block_size` along each row; a short last block is the row's tail (= zero padded)."""
    out = []
    for row in rows:
        q: list[float] = []
        for start in range(0, len(row), block_size):
            q.extend(quantize_block(row[start : start + block_size], name, rule))
        out.append(q)
    return out
