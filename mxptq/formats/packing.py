"""Dense bit packing of b-bit element codes into bytes (b = 1..8), and its exact inverse.

Layout (little-endian bit stream): code i occupies stream bits [i*b, (i+1)*b), and stream bit j
is bit (j % 8) of byte j // 8. So for b = 4 byte k holds code 2k in its low nibble and code 2k+1
in its high nibble; for b = 6 four codes fill 3 bytes; b = 2, 3, 5, 7 are packed just as
densely; b = 8 is the codes' bytes as they are. `numel` codes take ceil(numel * b / 8) bytes.
Codes are stored as their low b bits (two's complement for int codes); `unpack_codes(...,
signed=True)` sign-extends them back to int8.
"""

from __future__ import annotations

import torch

_GROUP = 8  # 8 codes of b bits = b whole bytes, held in one int64 word while (un)packing


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack_codes` produces for `numel` codes of `bits` bits."""
    _check_bits(bits)
    return -(-numel * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (int8 or uint8, any shape, flattened in C order) into a 1-D uint8 tensor.

    Raises ValueError if a code does not fit in `bits` bits (as signed int8 or unsigned uint8).
    """
    _check_bits(bits)
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"codes must be int8 or uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    numel = flat.numel()
    if bits < 8 and numel:
        lowest, highest = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if codes.dtype == torch.int8 else (0, 2**bits - 1)
        )
        if int(flat.min()) < lowest or int(flat.max()) > highest:
            raise ValueError(f"codes out of range for {bits}-bit packing: allowed {lowest}..{highest}")
    if bits == 8:
        return flat.view(torch.uint8).clone()
    fields = flat.to(torch.int64) & ((1 << bits) - 1)
    fields = torch.nn.functional.pad(fields, (0, (-numel) % _GROUP)).reshape(-1, _GROUP)
    shifts = torch.arange(_GROUP, device=codes.device, dtype=torch.int64) * bits
    words = (fields << shifts).sum(dim=1, keepdim=True)  # disjoint bit ranges: sum == OR
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_nbytes(numel, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, *, signed: bool = False) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a 1-D tensor.

    uint8 fields by default; `signed=True` sign-extends b-bit two's complement to int8 (use it for
    MXINT codes, i.e. `signed=fmt.element.kind == "int"`).
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    need = packed_nbytes(numel, bits)
    flat = packed.reshape(-1)
    if flat.numel() < need:
        raise ValueError(
            f"{flat.numel()} packed bytes hold fewer than {numel} codes of {bits} bits ({need} bytes)"
        )
    if bits == 8:
        fields = flat[:numel].to(torch.int32)
    else:
        raw = flat[:need].to(torch.int64)
        raw = torch.nn.functional.pad(raw, (0, (-need) % bits)).reshape(-1, bits)
        byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
        words = (raw << byte_shifts).sum(dim=1, keepdim=True)
        shifts = torch.arange(_GROUP, device=packed.device, dtype=torch.int64) * bits
        fields = ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel].to(torch.int32)
    if signed:
        fields = torch.where(fields >= 2 ** (bits - 1), fields - 2**bits, fields)
        return fields.to(torch.int8)
    return fields.to(torch.uint8)
