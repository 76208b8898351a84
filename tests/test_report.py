"""mxptq.report: a report is always valid JSON, NaN and inf included (issue 30)."""

from __future__ import annotations

import json
import math

from mxptq.report import Report


def test_non_finite_values_are_written_as_null_and_listed(tmp_path):
    report = Report("quantize")
    report["metrics"] = {"quantized": {"word_perplexity": math.nan}, "fp": {"word_perplexity": 12.5}}
    report["gptq"] = {"layers": [{"error": math.inf}, {"error": -math.inf}, {"error": 0.25}]}
    path = report.write(tmp_path / "report.json")

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    written = json.loads(path.read_text(), parse_constant=refuse)
    json.dumps(written, allow_nan=False)
    assert written["metrics"] == {"quantized": {"word_perplexity": None}, "fp": {"word_perplexity": 12.5}}
    assert [layer["error"] for layer in written["gptq"]["layers"]] == [None, None, 0.25]
    assert written["non_finite"] == {
        "metrics.quantized.word_perplexity": "nan",
        "gptq.layers[0].error": "inf",
        "gptq.layers[1].error": "-inf",
    }
    assert math.isnan(report["metrics"]["quantized"]["word_perplexity"])  # the report itself is untouched


def test_a_finite_report_has_no_non_finite_key(tmp_path):
    report = Report("quantize")
    report["metrics"] = {"word_perplexity": 12.5}
    assert "non_finite" not in json.loads(report.write(tmp_path / "report.json").read_text())
