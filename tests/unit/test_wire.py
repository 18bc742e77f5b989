"""The wire: round trips, and every malformed message rejected with a named error."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import RunConfig
from common.wire import (
    METRICS_KEY,
    PLAN_KEY,
    STATUS_KEY,
    UPDATE_KEY,
    RoundPlan,
    SiteReport,
    WireError,
    decode_plan,
    decode_reply,
    encode_plan,
    encode_reply,
)

ARRAYS = {"a": torch.ones(2, 3), "b": torch.zeros(4)}


def report(status: str = "ok", **kw: object) -> SiteReport:
    values: dict[str, object] = {
        "status": status,
        "reason": "",
        "site": "site-1",
        "num_examples": 10,
        "dp": True,
        "epsilon": 1.5,
        "budget": 8.0,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sample_rate": 0.25,
        "steps": 4,
        "total_steps": 8,
    }
    values.update(kw)
    return SiteReport(**values)  # type: ignore[arg-type]


def test_plan_round_trip() -> None:
    plan = RoundPlan(round=3, config=RunConfig(epsilon=2.0))
    got_plan, arrays = decode_plan(encode_plan(plan, ARRAYS))
    assert got_plan == plan
    assert all(torch.equal(arrays[k], ARRAYS[k]) for k in ARRAYS)


def test_reply_round_trip_ok_and_refused() -> None:
    got, update = decode_reply(encode_reply(report(), ARRAYS))
    assert got == report() and update is not None and torch.equal(update["a"], ARRAYS["a"])
    refused = report("refused", reason="budget 8 would reach 8.4", steps=0)
    got, update = decode_reply(encode_reply(refused, None))
    assert got == refused and update is None


def test_no_dp_epsilon_travels_as_nan() -> None:
    got, _ = decode_reply(encode_reply(report(dp=False, epsilon=math.nan), ARRAYS))
    assert math.isnan(got.epsilon) and got.dp is False


def test_plan_with_unknown_key_or_bad_round_is_rejected() -> None:
    content = encode_plan(RoundPlan(1, RunConfig()), ARRAYS)
    content.config_records[PLAN_KEY]["evil-key"] = 1
    with pytest.raises(WireError, match="evil-key"):
        decode_plan(content)
    content = encode_plan(RoundPlan(1, RunConfig()), ARRAYS)
    content.config_records[PLAN_KEY]["round"] = 0
    with pytest.raises(WireError, match="round"):
        decode_plan(content)


def _reply(**changes: object) -> RecordDict:
    content = encode_reply(report(), ARRAYS)
    for key, value in changes.items():
        if value is None:
            del content[key]
        else:
            content[key] = value  # type: ignore[assignment]
    return content


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda: _reply(metrics=None), "lacks"),
        (lambda: _reply(update=None), "lacks an update"),
        (
            lambda: _reply(
                status=ConfigRecord({"status": "great", "reason": "", "site": "s", "dp": True})
            ),
            "status",
        ),
        (
            lambda: _reply(
                status=ConfigRecord({"status": "ok", "reason": "", "site": "a b/../", "dp": True})
            ),
            "site name",
        ),
        (
            lambda: _reply(update=ArrayRecord(torch_state_dict={"a": torch.tensor([math.nan])})),
            "NaN",
        ),
        (
            lambda: _reply(
                update=ArrayRecord(torch_state_dict={"a": torch.ones(2, dtype=torch.float64)})
            ),
            "dtype",
        ),
    ],
)
def test_malformed_replies_are_rejected(content: object, match: str) -> None:
    with pytest.raises(WireError, match=match):
        decode_reply(content())  # type: ignore[operator]


def test_undeclared_or_negative_metrics_are_rejected() -> None:
    content = encode_reply(report(), ARRAYS)
    content.metric_records[METRICS_KEY]["train-loss"] = 0.3
    with pytest.raises(WireError, match="undeclared"):
        decode_reply(content)
    content = encode_reply(report(), ARRAYS)
    content.metric_records[METRICS_KEY]["num-examples"] = -1
    with pytest.raises(WireError, match="num-examples"):
        decode_reply(content)


def test_refusal_carrying_an_update_is_rejected() -> None:
    content = encode_reply(report("refused", steps=0), None)
    content[UPDATE_KEY] = ArrayRecord(torch_state_dict=ARRAYS)
    with pytest.raises(WireError, match="has an update"):
        decode_reply(content)


def test_encode_refuses_inconsistent_reply() -> None:
    with pytest.raises(ValueError):
        encode_reply(report("refused"), ARRAYS)
    with pytest.raises(ValueError):
        encode_reply(report("ok"), None)
    assert STATUS_KEY in encode_reply(report(), ARRAYS).config_records
    assert isinstance(encode_reply(report(), ARRAYS).metric_records[METRICS_KEY], MetricRecord)


def test_a_dp_reply_with_nan_metrics_is_rejected() -> None:
    with pytest.raises(WireError, match="NaN"):
        decode_reply(encode_reply(report(epsilon=math.nan), ARRAYS))
