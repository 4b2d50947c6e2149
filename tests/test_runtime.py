"""Process-group teardown: wait for the peers after a normal end, never while failing."""

import pytest

import bladdergen.runtime as runtime


@pytest.fixture
def fake_group(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.dist, "is_available", lambda: True)
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(runtime.dist, "destroy_process_group", lambda: calls.append("destroy"))
    return calls


def test_stop_runtime_after_a_normal_end_waits_for_the_peers_then_tears_down(fake_group):
    runtime.stop_runtime()
    assert fake_group == ["barrier", "destroy"]


def test_stop_runtime_while_an_error_propagates_tears_down_without_waiting(fake_group):
    with pytest.raises(ValueError):
        try:
            raise ValueError("a failed rank")
        finally:
            runtime.stop_runtime()
    assert fake_group == ["destroy"]
