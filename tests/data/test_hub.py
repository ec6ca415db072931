"""Tests of hlora.data.hub: the offline rule."""

from __future__ import annotations

import pytest

from hlora.data.hub import OFFLINE_VARIABLES, hub_offline_reason


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "Yes", " 1 "])
@pytest.mark.parametrize("variable", OFFLINE_VARIABLES)
def test_true_values_mean_offline(variable: str, value: str) -> None:
    assert hub_offline_reason({variable: value}) == f"{variable}={value} is set"


@pytest.mark.parametrize("value", ["0", "", "false", "off", "no", "2"])
def test_other_values_do_not(value: str) -> None:
    assert hub_offline_reason(dict.fromkeys(OFFLINE_VARIABLES, value)) is None
    assert hub_offline_reason({}) is None


def test_any_switch_wins_and_the_first_is_named() -> None:
    env = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert hub_offline_reason(env) == "HF_DATASETS_OFFLINE=1 is set"


def test_reads_the_environment_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert hub_offline_reason() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE=1 is set"
