"""mxptq/formats/packing.py: dense packing layout (golden bytes) and exact inverse for 1..8 bits."""

import pytest
import torch

from mxptq.formats import pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 100, 1001])
def test_unsigned_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == -(
        -numel * bits // 8
    )
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_round_trip_every_code(bits):
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int8).repeat(3).reshape(3, -1)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel(), signed=True).reshape(codes.shape), codes)


def test_four_bit_layout_low_nibble_first():
    codes = torch.tensor([0x1, 0x2, 0xF, 0x0, 0x7], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x0F, 0x07]
    signed = torch.tensor([-1, 7, -8, 0], dtype=torch.int8)  # two's complement nibbles F, 7, 8, 0
    assert pack_codes(signed, 4).tolist() == [0x7F, 0x08]


def test_six_bit_layout_four_codes_in_three_bytes():
    codes = torch.tensor([0b000001, 0b111111, 0b101010, 0b010101], dtype=torch.uint8)
    # stream bits (LSB first): c0 -> bits 0-5, c1 -> 6-11, c2 -> 12-17, c3 -> 18-23
    word = 0b000001 | 0b111111 << 6 | 0b101010 << 12 | 0b010101 << 18
    assert pack_codes(codes, 6).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


def test_eight_bit_is_the_bytes_as_is():
    codes = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)
    assert pack_codes(codes, 8).tolist() == [0x80, 0xFF, 0x00, 0x7F]
    assert unpack_codes(pack_codes(codes, 8), 8, 4, signed=True).tolist() == [-128, -1, 0, 127]


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([-9], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="1..8"):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="fewer than"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)
