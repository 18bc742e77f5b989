"""The values both sides agree on: a reply carries an update or a masked input exactly when it is
ok, a report's unset numbers are zeros, and a no-DP report's NaNs become nulls in the
summary."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import MetricRecord

from common.codec import METRICS_KEY, STATUS_KEY, encode_reply
from common.config import RunConfig
from common.messages import SiteReport, TrainReply
from server.federation import DeclaredSite
from tests.unit.common.test_codec import ARRAYS, MASKED, report


def test_an_inconsistent_reply_cannot_be_made() -> None:
    with pytest.raises(ValueError):
        TrainReply(report("refused"), ARRAYS)
    with pytest.raises(ValueError):
        TrainReply(report("ok"))
    assert STATUS_KEY in encode_reply(TrainReply(report(), ARRAYS)).config_records
    content = encode_reply(TrainReply(report(), ARRAYS))
    assert isinstance(content.metric_records[METRICS_KEY], MetricRecord)
    with pytest.raises(ValueError):
        TrainReply(report(), ARRAYS, MASKED)
    assert TrainReply(report("failed")).update is None


def test_a_report_of_few_numbers_has_zeros_elsewhere() -> None:
    failed = SiteReport.of("failed", "site error", "site-1")
    assert (failed.num_examples, failed.epsilon, failed.steps, failed.dp) == (0, 0.0, 0, True)
    assert SiteReport.of("ok", "", "s", steps=3, dp=False).steps == 3


def test_a_no_dp_report_is_summarised_with_null_epsilons() -> None:
    no_dp = SiteReport.of("ok", "", "s", dp=False, epsilon=math.nan, budget=math.nan)
    out = DeclaredSite("s", no_dp).summary(RunConfig())
    assert out.epsilon is None and out.budget is None and out.steps == 0
    assert torch.equal(TrainReply(report(), ARRAYS).update["a"], ARRAYS["a"])  # type: ignore[index]
