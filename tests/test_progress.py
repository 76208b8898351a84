"""mxptq.progress: the bar/plain/off policy and what track() writes."""

from __future__ import annotations

import io

import pytest

from mxptq.progress import current_policy, decide_mode, progress_enabled, progress_policy, track


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("kwargs", "stream", "environ", "mode"),
    [
        ({}, _Tty(), {}, "bar"),
        ({}, io.StringIO(), {}, "plain"),  # not a terminal: a log file or pipe
        ({"no_progress": True}, _Tty(), {}, "plain"),
        ({}, _Tty(), {"MXPTQ_NO_PROGRESS": "1"}, "plain"),
        ({}, _Tty(), {"CI": "true"}, "plain"),
        ({}, _Tty(), {"CI": "false", "MXPTQ_NO_PROGRESS": "0"}, "bar"),
        ({"quiet": True}, _Tty(), {}, "off"),
        ({"quiet": True}, io.StringIO(), {"CI": "true"}, "off"),
    ],
)
def test_decide_mode(kwargs, stream, environ, mode):
    assert decide_mode(stream=stream, environ=environ, **kwargs) == mode


def test_plain_mode_writes_start_and_end_lines_only():
    out = io.StringIO()
    with progress_policy(mode="plain", stream=out, interval_s=3600):
        assert progress_enabled() is False
        assert list(track(range(5), "gptq layers")) == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert lines[0] == "[mxptq] gptq layers: 0/5"
    assert lines[1].startswith("[mxptq] gptq layers: 5/5 done in ") and len(lines) == 2


def test_plain_mode_with_unknown_total_and_interval_zero():
    out = io.StringIO()
    with progress_policy(mode="plain", stream=out, interval_s=0.0):
        assert list(track(iter("ab"), "windows")) == ["a", "b"]
    lines = out.getvalue().splitlines()
    assert lines[0] == "[mxptq] windows: 0"
    assert [line.split(" (")[0] for line in lines[1:3]] == ["[mxptq] windows: 1", "[mxptq] windows: 2"]
    assert lines[-1].startswith("[mxptq] windows: 2 done in ")


def test_off_mode_is_silent_and_policy_is_scoped():
    out = io.StringIO()
    before = current_policy().mode
    with progress_policy(quiet=True, stream=out):
        assert current_policy().mode == "off"
        assert list(track([1, 2], "x")) == [1, 2]
    assert out.getvalue() == ""
    assert current_policy().mode == before  # the ContextVar is restored


def test_bar_mode_nested_loops_yield_everything():
    out = _Tty()
    with progress_policy(mode="bar", stream=out):
        assert progress_enabled() is True
        seen = [(i, j) for i in track(range(2), "layers") for j in track(range(3), "batches")]
        assert current_policy()._live is None  # the shared bar is stopped
    assert seen == [(i, j) for i in range(2) for j in range(3)]
    assert "layers" in out.getvalue()
