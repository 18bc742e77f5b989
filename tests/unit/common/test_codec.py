"""Flower's record codec: round trips, and every malformed message rejected with a
named error."""

from __future__ import annotations

import math

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from common.codec import (
    METRICS_KEY,
    PLAN_KEY,
    STAGE_KEY,
    UPDATE_KEY,
    content_bytes,
    decode_reply,
    decode_stage,
    decode_train,
    encode_plan,
    encode_reply,
    encode_stage,
    with_setup,
)
from common.config import RunConfig
from common.messages import (
    RoundPlan,
    SecAggSetup,
    SiteReport,
    StageMessage,
    TrainReply,
    WireError,
)
from common.secagg.params import Advert, SecAggParams
from common.secagg.site import SiteSession

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


def unpack(reply: TrainReply) -> tuple[SiteReport, dict[str, torch.Tensor] | None, object]:
    return reply.report, reply.update, reply.masked


def test_plan_round_trip() -> None:
    plan = RoundPlan(round=3, config=RunConfig(epsilon=2.0))
    request = decode_train(encode_plan(plan, ARRAYS))
    got_plan, arrays = request.plan, request.arrays
    assert got_plan == plan and request.setup is None
    assert all(torch.equal(arrays[k], ARRAYS[k]) for k in ARRAYS)


def test_reply_round_trip_ok_and_refused() -> None:
    got, update, keys = unpack(decode_reply(encode_reply(TrainReply(report(), ARRAYS))))
    assert got == report() and update is not None and torch.equal(update["a"], ARRAYS["a"])
    assert keys is None
    refused = report("refused", reason="budget 8 would reach 8.4", steps=0)
    got, update, keys = unpack(decode_reply(encode_reply(TrainReply(refused))))
    assert got == refused and update is None and keys is None


def test_no_dp_epsilon_travels_as_nan() -> None:
    got = decode_reply(encode_reply(TrainReply(report(dp=False, epsilon=math.nan), ARRAYS))).report
    assert math.isnan(got.epsilon) and got.dp is False


def test_plan_with_unknown_key_or_bad_round_is_rejected() -> None:
    content = encode_plan(RoundPlan(1, RunConfig()), ARRAYS)
    content.config_records[PLAN_KEY]["evil-key"] = 1
    with pytest.raises(WireError, match="evil-key"):
        decode_train(content)
    content = encode_plan(RoundPlan(1, RunConfig()), ARRAYS)
    content.config_records[PLAN_KEY]["round"] = 0
    with pytest.raises(WireError, match="round"):
        decode_train(content)


def _reply(**changes: object) -> RecordDict:
    content = encode_reply(TrainReply(report(), ARRAYS))
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
    content = encode_reply(TrainReply(report(), ARRAYS))
    content.metric_records[METRICS_KEY]["train-loss"] = 0.3
    with pytest.raises(WireError, match="undeclared"):
        decode_reply(content)
    content = encode_reply(TrainReply(report(), ARRAYS))
    content.metric_records[METRICS_KEY]["num-examples"] = -1
    with pytest.raises(WireError, match="num-examples"):
        decode_reply(content)


def test_refusal_carrying_an_update_is_rejected() -> None:
    content = encode_reply(TrainReply(report("refused", steps=0)))
    content[UPDATE_KEY] = ArrayRecord(torch_state_dict=ARRAYS)
    with pytest.raises(WireError, match="has an update"):
        decode_reply(content)


def test_a_dp_reply_with_nan_metrics_is_rejected() -> None:
    with pytest.raises(WireError, match="NaN"):
        decode_reply(encode_reply(TrainReply(report(epsilon=math.nan), ARRAYS)))


# ---- secure aggregation messages ---------------------------------------------------

PARAMS = SecAggParams.create(range(1, 4), ring_bits=12, vector_length=10, session="s1")
IDENTITY = Ed25519PrivateKey.generate()
ADVERT = SiteSession.start(PARAMS, 2, IDENTITY.public_key().public_bytes_raw(), IDENTITY.sign)[1]
MASKED = StageMessage("masked-input", "s1", ids=(2,), blobs=(b"y" * 10,), more=(b"c" * 32,))


def test_plan_carries_the_secagg_setup_and_the_rounds_sites() -> None:
    # Prepare
    setup = SecAggSetup(PARAMS, 2, rotation_seed=77, members=(1, 2))

    # Execute
    content = with_setup(encode_plan(RoundPlan(1, RunConfig()), ARRAYS), setup)

    # Assert
    assert decode_train(content).setup == setup
    assert decode_train(encode_plan(RoundPlan(1, RunConfig()), ARRAYS)).setup is None


def test_per_site_setups_share_one_plan_without_changing_it() -> None:
    # Prepare
    base = encode_plan(RoundPlan(1, RunConfig()), ARRAYS)

    # Execute
    one, two = (with_setup(base, SecAggSetup(PARAMS, i, 7)) for i in (1, 2))

    # Assert
    assert decode_train(base).setup is None
    assert [decode_train(c).setup.index for c in (one, two)] == [1, 2]  # type: ignore[union-attr]
    assert decode_train(one).plan == decode_train(base).plan


def test_setup_naming_a_non_participant_is_rejected() -> None:
    content = with_setup(encode_plan(RoundPlan(1, RunConfig()), ARRAYS), SecAggSetup(PARAMS, 2, 7))
    content.config_records["secagg"]["index"] = 9
    with pytest.raises(WireError, match="not a participant"):
        decode_train(content)


@pytest.mark.parametrize("members", [[2, 1], [1, 9], [1, 1]])
def test_setup_with_a_bad_list_of_the_rounds_sites_is_rejected(members: list[int]) -> None:
    content = with_setup(encode_plan(RoundPlan(1, RunConfig()), ARRAYS), SecAggSetup(PARAMS, 2, 7))
    content.config_records["secagg"]["members"] = members
    with pytest.raises(WireError, match="out of order or unknown"):
        decode_train(content)


def test_advertise_message_carries_plan_and_setup_and_an_advert_travels_intact() -> None:
    # Prepare
    plan = RoundPlan(2, RunConfig(epsilon=3.0))
    message = StageMessage("advertise", "s1", plan=plan, setup=SecAggSetup(PARAMS, 3, 9))
    reply = StageMessage("advertise", "s1", ids=(2,), blobs=(ADVERT.to_bytes(),))

    # Execute
    got = decode_stage(encode_stage(message), expect="advertise")
    back = decode_stage(encode_stage(reply), expect="advertise")

    # Assert
    assert got == message
    assert Advert.from_bytes(2, back.blobs[0]) == ADVERT and ADVERT.verifies(PARAMS)
    other = StageMessage("advertise", "s2", plan=plan, setup=SecAggSetup(PARAMS, 3, 9))
    with pytest.raises(WireError, match="lacks its secagg setup for this session"):
        decode_stage(encode_stage(other))


def test_reply_with_a_masked_input_round_trips_and_excludes_an_update() -> None:
    # Execute
    got, update, masked = unpack(
        decode_reply(encode_reply(TrainReply(report(num_examples=0), masked=MASKED)))
    )

    # Assert
    assert update is None and masked == MASKED and got.num_examples == 0
    both = encode_reply(TrainReply(report(), ARRAYS))
    both[STAGE_KEY] = encode_stage(MASKED)[STAGE_KEY]
    with pytest.raises(WireError, match="both"):
        decode_reply(both)
    with pytest.raises(ValueError):
        TrainReply(report(), ARRAYS, MASKED)


def test_a_masked_input_travels_only_inside_a_train_reply() -> None:
    with pytest.raises(WireError, match="unknown secagg stage 'masked-input'"):
        decode_stage(encode_stage(MASKED))


def test_reply_with_a_bad_signature_field_is_rejected() -> None:
    content = encode_stage(StageMessage("consistency", "s1", signature=b"x" * 63))
    with pytest.raises(WireError, match="bad signature field"):
        decode_stage(content)


def test_stage_message_round_trip_and_size() -> None:
    # Prepare
    message = StageMessage("unmask", "s1", ids=(1, 3), blobs=(b"a" * 66, b"b" * 66))

    # Execute
    content = encode_stage(message)

    # Assert
    assert decode_stage(content, expect="unmask") == message
    assert 132 < content_bytes(content) < 132 + 200


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("stage", "steal", "unknown secagg stage"),
        ("ids", [1, 1], "twice"),
        ("ids", [1, True], "ids"),
        ("blobs", [b"x"], "number of ids and blobs"),
        ("blobs", ["text", "text"], "byte strings"),
        ("session", "", "session"),
    ],
)
def test_malformed_stage_messages_are_rejected(field: str, value: object, match: str) -> None:
    content = encode_stage(StageMessage("unmask", "s1", ids=(1, 3), blobs=(b"a", b"b")))
    content.config_records[STAGE_KEY][field] = value  # type: ignore[assignment]
    with pytest.raises(WireError, match=match):
        decode_stage(content)


def test_a_stage_message_of_another_stage_is_rejected() -> None:
    content = encode_stage(StageMessage("unmask", "s1"))
    with pytest.raises(WireError, match="expected secagg stage 'masked-input'"):
        decode_stage(content, expect="masked-input")


def test_a_preflight_plan_and_its_answer_round_trip_and_the_answer_carries_nothing() -> None:
    plan = RoundPlan(round=1, config=RunConfig(), preflight=True)
    assert decode_train(encode_plan(plan, ARRAYS)).plan == plan
    answer = TrainReply(report(reserve=1.0, lifetime_after=6.5), preflight=True)
    got = decode_reply(encode_reply(answer))
    assert got == answer and got.update is None and got.report.lifetime_after == 6.5
    # An answer to a pre-flight that smuggles an update is refused, as is a plan that is
    # both a pre-flight and an evaluation, or one without the flag.
    content = encode_reply(answer)
    content[UPDATE_KEY] = ArrayRecord(torch_state_dict=ARRAYS)
    with pytest.raises(WireError, match="pre-flight answer carries an update"):
        decode_reply(content)
    both = encode_plan(plan, ARRAYS)
    both.config_records[PLAN_KEY]["plan-evaluate"] = True
    with pytest.raises(WireError, match="pre-flight"):
        decode_train(both)
    bare = encode_plan(plan, ARRAYS)
    del bare.config_records[PLAN_KEY]["plan-preflight"]
    with pytest.raises(WireError, match="lacks its pre-flight flag"):
        decode_train(bare)
    with pytest.raises(ValueError, match="never in a pre-flight answer"):
        TrainReply(report(), ARRAYS, preflight=True)
