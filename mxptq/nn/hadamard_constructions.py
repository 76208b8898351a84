"""Hadamard matrices H_K of the non-power-of-two orders used by the online rotation.

A Hadamard matrix of order K is a K x K matrix of +-1 with H Hᵀ = K·I. The rotation needs
H_K ⊗ H_(2^m) for the orders K in `SUPPORTED_ORDERS` (the sizes of LLM hidden and MLP
dimensions, e.g. 576 = 36·16, 1536 = 12·128, 11008 = 172·64). Every matrix is *built* here
from a classical construction (nothing is pasted from a table), then checked (H Hᵀ == K·I)
before it is returned:

- Paley I (Paley 1933): q ≡ 3 (mod 4) a prime power -> order q + 1.
  Jacobsthal matrix Q[a, b] = χ(a − b) over GF(q) (χ = quadratic character) is skew;
  S = [[0, 1ᵀ], [−1, Q]] is a skew conference matrix and H = I + S.
- Paley II: q ≡ 1 (mod 4) a prime power -> order 2(q + 1). Q is symmetric,
  C = [[0, 1ᵀ], [1, Q]] a symmetric conference matrix and
  H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].
- Sylvester doubling: H_2K = [[H_K, H_K], [H_K, −H_K]].
- Goethals–Seidel array (Goethals & Seidel 1967) with four circulant ±1 matrices A, B, C, D of
  odd order v with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4v·I -> order 4v. The circulants are found by a
  small deterministic search among sequences that are constant on the orbits of a multiplier
  subgroup <t> of Z_v^* (the cyclotomic idea of Baumert & Hall 1965): with few orbits, the
  search is a meet-in-the-middle match of periodic autocorrelations and takes well under a
  second. Used for 156 = 4·39 and 172 = 4·43, which have no Paley construction (155, 171 and
  77, 85 are not prime powers).
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

# order -> how it is built (the description is recorded in rotation reports).
CONSTRUCTIONS: dict[int, str] = {
    12: "Paley I, q=11",
    20: "Paley I, q=19",
    28: "Paley I, q=27 (GF(3^3))",
    36: "Paley II, q=17",
    40: "Sylvester doubling of H_20",
    52: "Paley II, q=25 (GF(5^2))",
    60: "Paley I, q=59",
    108: "Paley I, q=107",
    140: "Paley I, q=139",
    156: "Goethals-Seidel, circulants of order 39",
    172: "Goethals-Seidel, circulants of order 43",
}
SUPPORTED_ORDERS: tuple[int, ...] = tuple(sorted(CONSTRUCTIONS))


# ---------------------------------------------------------------- finite fields GF(p^k)
def _prime_power(q: int) -> tuple[int, int]:
    """(p, k) with q = p^k, p prime; ValueError otherwise."""
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            if r != 1:
                raise ValueError(f"{q} is not a prime power")
            return p, k
    raise ValueError(f"{q} is not a prime power")


def _poly_mulmod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """Product of two polynomials (coefficient lists, lowest degree first) mod a monic modulus."""
    k = len(modulus) - 1
    prod = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            prod[i + j] = (prod[i + j] + ai * bj) % p
    for deg in range(len(prod) - 1, k - 1, -1):  # reduce the top coefficient away
        c = prod[deg]
        if c:
            for j in range(k + 1):
                prod[deg - k + j] = (prod[deg - k + j] - c * modulus[j]) % p
    return (prod + [0] * k)[:k]


def _is_irreducible(modulus: list[int], p: int) -> bool:
    """A monic polynomial of degree k is irreducible iff no monic factor of degree <= k/2 divides it."""
    k = len(modulus) - 1
    for d in range(1, k // 2 + 1):
        for low in itertools.product(range(p), repeat=d):
            divisor = list(low) + [1]
            rem = list(modulus)
            for deg in range(k, d - 1, -1):
                c = rem[deg]
                if c:
                    for j in range(d + 1):
                        rem[deg - d + j] = (rem[deg - d + j] - c * divisor[j]) % p
            if not any(rem[:d]):
                return False
    return True


def _jacobsthal(q: int) -> np.ndarray:
    """q x q Jacobsthal matrix Q[a, b] = χ(a − b) over GF(q), χ the quadratic character
    (χ(0) = 0, χ(nonzero square) = 1, else −1).

    GF(p^k) elements are encoded as integers whose base-p digits are the coefficients of a
    polynomial in X (digit i = coefficient of X^i), reduced modulo the first monic irreducible
    polynomial of degree k in lexicographic order; for k = 1 this is plain arithmetic mod p.
    """
    p, k = _prime_power(q)
    digits = np.array([[(x // p**i) % p for i in range(k)] for x in range(q)])
    powers = p ** np.arange(k)
    if k == 1:
        squares = {(x * x) % p for x in range(1, q)}
    else:
        modulus = next(
            list(low) + [1]
            for low in itertools.product(range(p), repeat=k)
            if _is_irreducible(list(low) + [1], p)
        )
        squares = set()
        for x in range(1, q):
            coeffs = [int(c) for c in digits[x]]
            squares.add(int(np.dot(_poly_mulmod(coeffs, coeffs, modulus, p), powers)))
    chi = np.array([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=np.int64)
    difference = ((digits[:, None, :] - digits[None, :, :]) % p) @ powers  # code of a − b
    return chi[difference]


# ---------------------------------------------------------------- constructions
def paley_i(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 for a prime power q ≡ 3 (mod 4)."""
    if q % 4 != 3:
        raise ValueError(f"Paley I needs q ≡ 3 (mod 4), got {q}")
    jacobsthal = _jacobsthal(q)
    skew = np.zeros((q + 1, q + 1), dtype=np.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return np.eye(q + 1, dtype=np.int64) + skew


def paley_ii(q: int) -> np.ndarray:
    """Hadamard matrix of order 2(q + 1) for a prime power q ≡ 1 (mod 4)."""
    if q % 4 != 1:
        raise ValueError(f"Paley II needs q ≡ 1 (mod 4), got {q}")
    jacobsthal = _jacobsthal(q)
    conference = np.zeros((q + 1, q + 1), dtype=np.int64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = jacobsthal
    on_entries = np.array([[1, 1], [1, -1]])
    on_zeros = np.array([[1, -1], [-1, -1]])
    return np.kron(conference, on_entries) + np.kron(np.eye(q + 1, dtype=np.int64), on_zeros)


def sylvester_double(h: np.ndarray) -> np.ndarray:
    return np.block([[h, h], [h, -h]])


def _multiplier_orbits(v: int, t: int) -> list[list[int]]:
    """Orbits of Z_v under x -> t·x (t a unit mod v)."""
    seen: set[int] = set()
    orbits = []
    for x in range(v):
        if x in seen:
            continue
        orbit, y = [], x
        while y not in orbit:
            orbit.append(y)
            y = (y * t) % v
        seen.update(orbit)
        orbits.append(orbit)
    return orbits


def _gs_circulant_rows(v: int, max_orbits: int = 12) -> np.ndarray:
    """First rows (4, v) of circulants A, B, C, D with Σ AAᵀ = 4v·I.

    Equivalent condition: the periodic autocorrelations sum to zero at every nonzero shift, or
    in Fourier terms Σ_X |DFT(X)_k|² = 4v for every k. Candidates are the ±1 sequences constant
    on the orbits of <t> (so 2^(#orbits) of them); those whose power spectrum already exceeds
    4v somewhere are discarded; then pairs (X, Y) are hashed by PAF_X + PAF_Y and matched with
    a pair whose sum is the negative. Multipliers t are tried in increasing order, so the result
    is deterministic.
    """
    for t in range(2, v):
        if np.gcd(t, v) != 1:
            continue
        orbits = _multiplier_orbits(v, t)
        if len(orbits) > max_orbits:
            continue
        indicator = np.zeros((len(orbits), v))
        for i, orbit in enumerate(orbits):
            indicator[i, orbit] = 1.0
        signs = np.array(list(itertools.product([1.0, -1.0], repeat=len(orbits))))
        seqs = signs @ indicator
        psd = np.abs(np.fft.fft(seqs, axis=1)) ** 2
        keep = (psd <= 4 * v + 1e-6).all(axis=1)
        seqs, psd = seqs[keep], psd[keep]
        paf = np.rint(np.fft.ifft(psd, axis=1).real).astype(np.int64)[:, 1 : v // 2 + 1]
        pair_by_paf: dict[bytes, tuple[int, int]] = {}
        for i in range(len(seqs)):
            fits = ((psd[i] + psd[i:]) <= 4 * v + 1e-6).all(axis=1)
            for j in np.nonzero(fits)[0]:
                pair_by_paf.setdefault((paf[i] + paf[i + j]).tobytes(), (i, i + j))
        for key, (a, b) in pair_by_paf.items():
            match = pair_by_paf.get((-np.frombuffer(key, dtype=np.int64)).tobytes())
            if match is not None:
                return seqs[[a, b, match[0], match[1]]].astype(np.int64)
    raise RuntimeError(f"no multiplier-invariant Goethals-Seidel circulants of order {v} found")


def goethals_seidel(v: int) -> np.ndarray:
    """Hadamard matrix of order 4v from the Goethals-Seidel array
    [[A, BR, CR, DR], [−BR, A, DᵀR, −CᵀR], [−CR, −DᵀR, A, BᵀR], [−DR, CᵀR, −BᵀR, A]]
    (R = back-diagonal permutation)."""
    rows = _gs_circulant_rows(v)
    idx = (np.arange(v)[None, :] - np.arange(v)[:, None]) % v
    A, B, C, D = (r[idx] for r in rows)  # circulant: X[i, j] = x[j − i]
    R = np.eye(v, dtype=np.int64)[::-1]
    return np.block(
        [
            [A, B @ R, C @ R, D @ R],
            [-B @ R, A, D.T @ R, -C.T @ R],
            [-C @ R, -D.T @ R, A, B.T @ R],
            [-D @ R, C.T @ R, -B.T @ R, A],
        ]
    )


_BUILDERS = {
    12: lambda: paley_i(11),
    20: lambda: paley_i(19),
    28: lambda: paley_i(27),
    36: lambda: paley_ii(17),
    40: lambda: sylvester_double(hadamard_k(20)),
    52: lambda: paley_ii(25),
    60: lambda: paley_i(59),
    108: lambda: paley_i(107),
    140: lambda: paley_i(139),
    156: lambda: goethals_seidel(39),
    172: lambda: goethals_seidel(43),
}
assert set(_BUILDERS) == set(CONSTRUCTIONS)


@cache
def hadamard_k(k: int) -> np.ndarray:
    """Unnormalized ±1 Hadamard matrix of order k in SUPPORTED_ORDERS (int64, read-only)."""
    if k not in _BUILDERS:
        raise ValueError(f"no construction for a Hadamard matrix of order {k}; known: {SUPPORTED_ORDERS}")
    h = _BUILDERS[k]()
    # Internal invariant: every construction is verified before use.
    assert h.shape == (k, k) and np.array_equal(np.abs(h), np.ones_like(h)), k
    assert np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64)), k
    h.setflags(write=False)
    return h
