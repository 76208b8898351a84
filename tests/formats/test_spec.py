"""mxptq/formats/spec.py: element-format registry vs the OCP tables, Format parsing and errors."""

import math

import pytest
from mx_oracle import FP_SPEC, fp_decode

from mxptq.errors import FormatError, MxptqError
from mxptq.formats import (
    DEFAULT_SCALE_RULE,
    ELEMENT_FORMATS,
    ElementFormat,
    Format,
    ScaleRule,
    element_format,
)


def test_registry_holds_exactly_the_designed_formats():
    assert set(ELEMENT_FORMATS) == {f"int{b}" for b in range(2, 9)} | set(FP_SPEC)
    assert all(isinstance(e, ElementFormat) and e.name == k for k, e in ELEMENT_FORMATS.items())


@pytest.mark.parametrize("name", list(FP_SPEC))
def test_fp_element_facts_match_ocp_table(name):
    spec, elem = FP_SPEC[name], ELEMENT_FORMATS[name]
    assert (elem.kind, elem.exp_bits, elem.man_bits, elem.bias, elem.emax) == (
        "fp",
        spec["exp"],
        spec["man"],
        spec["bias"],
        spec["emax"],
    )
    assert elem.bits == 1 + spec["exp"] + spec["man"]
    assert elem.max_value == spec["max"]
    # the max bit pattern really decodes to max_value, and nothing finite is larger
    assert fp_decode(name, elem.max_field) == spec["max"]
    finite = [fp_decode(name, c) for c in range(2**elem.bits) if math.isfinite(fp_decode(name, c))]
    assert max(finite) == spec["max"]
    assert elem.has_inf == (name == "e5m2")


def test_fp8_special_values():
    assert ELEMENT_FORMATS["e4m3"].max_value == 448.0 and ELEMENT_FORMATS["e4m3"].nan_fields == (0x7F,)
    assert ELEMENT_FORMATS["e5m2"].max_value == 57344.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_elements(bits):
    elem = ELEMENT_FORMATS[f"int{bits}"]
    assert (elem.kind, elem.bits, elem.emax, elem.man_bits) == ("int", bits, 0, bits - 2)
    assert elem.max_value == (2 ** (bits - 1) - 1) / 2 ** (bits - 2)
    assert (elem.code_min, elem.code_max) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_mxint8_is_ocp_int8():
    # OCP MX v1.0: INT8 elements, two's complement with implied scale 2^-6, emax 0
    elem = Format.from_keys("mxint", width=8, scale_rule="ocp").element
    assert elem.man_bits == 6 and elem.emax == 0 and elem.max_value == 127 / 64


def test_from_keys_mxint_defaults():
    fmt = Format.from_keys("mxint", width=4)
    assert fmt.element is ELEMENT_FORMATS["int4"]
    assert fmt.block_size == 32 and fmt.scale_rule is ScaleRule.TUTORIAL
    assert fmt.bits == 4 and fmt.label == "MXINT4(b32,tutorial)"


@pytest.mark.parametrize(
    "pair,name", [((2, 1), "e2m1"), ((2, 3), "e2m3"), ((3, 2), "e3m2"), ((4, 3), "e4m3"), ((5, 2), "e5m2")]
)
def test_from_keys_mxfp_pairs(pair, name):
    fmt = Format.from_keys("mxfp", exponent_width=pair[0], frac_width=pair[1], block_size=16)
    assert fmt.element.name == name and fmt.scale_rule is ScaleRule.OCP and fmt.block_size == 16


def test_default_rule_defined_once_per_kind():
    assert DEFAULT_SCALE_RULE == {"int": ScaleRule.TUTORIAL, "fp": ScaleRule.OCP}
    assert Format(ELEMENT_FORMATS["int3"]).scale_rule is DEFAULT_SCALE_RULE["int"]
    assert Format(ELEMENT_FORMATS["e2m1"]).scale_rule is DEFAULT_SCALE_RULE["fp"]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"name": "mxint", "width": 9}, "allowed: 2..8"),
        ({"name": "mxint", "width": 1}, "allowed: 2..8"),
        ({"name": "mxint"}, "needs `width`"),
        ({"name": "mxint", "width": 4.0}, "must be an integer"),
        ({"name": "mxint", "width": True}, "must be an integer"),
        ({"name": "mxint", "width": 4, "exponent_width": 2}, "not exponent_width"),
        ({"name": "mxfp", "exponent_width": 3, "frac_width": 3}, "allowed pairs: (2, 1) e2m1"),
        ({"name": "mxfp", "exponent_width": 4}, "needs exponent_width and frac_width"),
        ({"name": "mxfp", "exponent_width": 4, "frac_width": 3, "width": 6}, "does not match"),
        ({"name": "mxfloat", "width": 4}, "allowed: mxint, mxfp"),
        ({"name": "mxint", "width": 4, "block_size": 0}, "allowed: 1..4096"),
        ({"name": "mxint", "width": 4, "block_size": 4097}, "allowed: 1..4096"),
        ({"name": "mxint", "width": 4, "scale_rule": "floor"}, "allowed for mxint: tutorial, symmetric, ocp"),
        (
            {"name": "mxfp", "exponent_width": 2, "frac_width": 1, "scale_rule": "tutorial"},
            "allowed: ocp, symmetric",
        ),
    ],
)
def test_from_keys_errors_are_one_line_and_list_what_is_allowed(kwargs, needle):
    with pytest.raises(FormatError) as info:
        Format.from_keys(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert isinstance(info.value, MxptqError)


def test_scale_rule_accepts_strings_any_case():
    assert Format.from_keys("mxint", width=4, scale_rule="Symmetric").scale_rule is ScaleRule.SYMMETRIC
    assert Format.from_keys("MXINT", width=8, scale_rule=ScaleRule.OCP).scale_rule is ScaleRule.OCP


def test_every_scale_rule_has_a_docstring_with_its_formula():
    for rule in ScaleRule:
        assert rule.__doc__ != ScaleRule.__doc__ and (
            "Source" in rule.__doc__ or "OCP MX v1.0" in rule.__doc__
        )
    assert "ceil(log2 amax)" in ScaleRule.TUTORIAL.__doc__
    assert "smallest scale_exp with" in ScaleRule.SYMMETRIC.__doc__
    assert "floor(log2 amax) - emax_elem" in ScaleRule.OCP.__doc__


def test_element_format_lookup_suggests():
    assert element_format("e4m3") is ELEMENT_FORMATS["e4m3"]
    with pytest.raises(FormatError, match="did you mean 'e4m3'"):
        element_format("E4M3")


@pytest.mark.parametrize("elem", list(ELEMENT_FORMATS.values()), ids=lambda e: e.name)
def test_dict_round_trip_and_hashable(elem):
    for rule in (ScaleRule.OCP, ScaleRule.SYMMETRIC):
        fmt = Format(elem, block_size=8, scale_rule=rule)
        assert Format.from_dict(fmt.to_dict()) == fmt
        assert hash(Format.from_dict(fmt.to_dict())) == hash(fmt)


def test_from_dict_rejects_unknown_and_inconsistent_keys():
    with pytest.raises(FormatError, match="unknown format key"):
        Format.from_dict({"name": "mxint", "width": 4, "bloc_size": 32})
    with pytest.raises(FormatError, match="disagrees"):
        Format.from_dict({"name": "mxint", "width": 4, "element": "int8"})


def test_labels_are_unique():
    labels = [Format(e, scale_rule=r).label for e in ELEMENT_FORMATS.values() for r in (ScaleRule.OCP,)]
    assert len(set(labels)) == len(labels)
    assert Format.from_keys("mxfp", exponent_width=2, frac_width=1).label == "MXFP4_E2M1(b32,ocp)"


def test_from_keys_none_means_default():
    fmt = Format.from_keys("mxint", width=4, block_size=None, scale_rule=None)
    assert fmt.block_size == 32 and fmt.scale_rule is ScaleRule.TUTORIAL
