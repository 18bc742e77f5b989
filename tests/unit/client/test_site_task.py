"""Issue 14, a site's side of a task: ``site init --task`` pins the task the site agreed
to (its labels and columns are used, its digest kept), ``site check`` validates the
file against it, and the site refuses a plan whose task differs before anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.deploy import TASK_FILE, check_site
from client.reply import train_round
from client.round import SiteState
from client.settings import TASK_DIGEST_KEY, TASK_FILE_KEY, SiteSettings
from common.config import RunConfig
from common.messages import RoundPlan, TrainRequest
from common.model import build_model, model_spec
from common.pki import DeployError
from common.privacy.ledger import LEDGER_FILE
from common.task import TASKS_DIR, Task, bundled_task, run_task
from server import deploy as coordinator
from tests.support.deploy_folders import make_site_data, site_folder
from tests.support.sites import deployed_node

NEWS = """name = "news-topics"
labels = ["earn", "acq", "crude"]
text-column = "body"
label-column = "topic"
"""


def _news(tmp_path: Path, rows: list[tuple[str, str]]) -> tuple[Path, Path]:
    task = tmp_path / "news-topics.toml"
    task.write_text(NEWS)
    data = tmp_path / "news.csv"
    data.write_text("body,topic\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return task, data


ROWS = [("profits rose", "earn"), ("merger agreed", "acq"), ("oil fell", "crude")] * 3


def test_init_with_a_task_pins_it_and_check_validates_the_file_against_it(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    task, data = _news(tmp_path, ROWS)

    site = site_folder(tmp_path, coord, data=data, task=task)
    report = check_site(site.directory)

    pinned = Task.load(task).digest()
    assert site.node_config[TASK_DIGEST_KEY] == pinned
    assert site.node_config[TASK_FILE_KEY] == str(site.directory / TASK_FILE)
    assert site.node_config["text-column"] == "body"
    assert site.node_config["label-column"] == "topic"
    assert site.node_config["data-size"] == len(ROWS)
    assert f"task news-topics: 3 labels, digest {pinned}" in "\n".join(report.lines)
    assert any("9 rows, 0 rejected (earn: 3, acq: 3, crude: 3)" in line for line in report.lines)


def test_a_file_with_a_label_the_task_does_not_declare_is_refused_by_name(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    task, data = _news(tmp_path, [*ROWS, ("wheat harvest", "grain")])
    with pytest.raises(DeployError, match="label 'grain' in column 'topic' is not one of"):
        site_folder(tmp_path, coord, data=data, task=task)


def test_a_task_file_changed_after_init_fails_the_check(
    tmp_path: Path, coord: coordinator.Coordinator
) -> None:
    task, data = _news(tmp_path, ROWS)
    site = site_folder(tmp_path, coord, data=data, task=task)
    (site.directory / TASK_FILE).write_text(NEWS.replace('"crude"]', '"crude", "grain"]'))

    report = check_site(site.directory)

    assert any("changed since `site init`" in problem for problem in report.problems)


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig(num_server_rounds=1, max_length=16, batch_size=64, epsilon=4.0,
                     sites_dir=str(tmp_path / "sites"))  # fmt: skip


def _pinned(tmp_path: Path, cfg: RunConfig, task: str) -> SiteSettings:
    path = tmp_path / f"{task}.toml"
    path.write_text((TASKS_DIR / f"{task}.toml").read_text())
    node = {
        "partition-id": 3,
        "num-partitions": 20,
        TASK_DIGEST_KEY: run_task(
            cfg.model_copy(update={"dataset": task, "partition": "iid"})
        ).digest(),
        TASK_FILE_KEY: str(path),
    }
    return SiteSettings.from_node_config(node, cfg)


def test_a_site_refuses_a_plan_whose_task_is_not_the_one_it_agreed_to(
    tmp_path: Path, cfg: RunConfig
) -> None:
    # The coordinator switching the task (labels, columns) under a site: before, a
    # deployed site charged the round and then failed to read its file.
    settings = _pinned(tmp_path, cfg, "20newsgroups")
    arrays = build_model(model_spec(run_task(cfg))).trainable_state()
    request = TrainRequest(RoundPlan(1, cfg), arrays)

    reply, _ = train_round(request, settings, SiteState(), run_id="run-a")

    assert reply.report.status == "refused"
    assert "the plan's task rotten-tomatoes" in reply.report.reason
    assert "is not the task this site agreed to" in reply.report.reason
    assert not (Path(cfg.sites_dir) / "site-3" / LEDGER_FILE).exists()  # nothing charged


def test_a_site_trains_a_plan_of_the_task_it_agreed_to(tmp_path: Path, cfg: RunConfig) -> None:
    settings = _pinned(tmp_path, cfg, "rotten-tomatoes")
    arrays = build_model(model_spec(run_task(cfg))).trainable_state()

    reply, _ = train_round(
        TrainRequest(RoundPlan(1, cfg), arrays), settings, SiteState(), run_id="a"
    )

    assert reply.report.status == "ok"


def test_a_site_refuses_to_advertise_in_a_secure_round_of_another_task(tmp_path: Path) -> None:
    # The secure path: refused at the first stage, before any key is made.
    from flwr.app import Message, MessageType

    from client.app import app
    from common.codec import decode_stage, encode_stage
    from common.messages import SecAggSetup, StageMessage
    from common.secagg.params import SecAggParams
    from tests.support.inprocess_grid import NODE_ID_OFFSET, InProcessGrid

    path = tmp_path / "20newsgroups.toml"
    path.write_text((TASKS_DIR / "20newsgroups.toml").read_text())
    node = {
        "partition-id": 0,
        "num-partitions": 3,
        TASK_DIGEST_KEY: bundled_task("20newsgroups").digest(),
        TASK_FILE_KEY: str(path),
    }
    grid = InProcessGrid(app, num_nodes=1, node_configs=[node])
    params = SecAggParams.create(range(1, 4), ring_bits=12, vector_length=8, session="s1")
    plan = RoundPlan(1, RunConfig(sites_dir=str(tmp_path / "sites")))
    stage = StageMessage("advertise", "s1", plan=plan, setup=SecAggSetup(params, 1, 7))
    message = Message(
        content=encode_stage(stage),
        dst_node_id=NODE_ID_OFFSET,
        message_type=MessageType.TRAIN,
        group_id="1/advertise",
    )

    reply = decode_stage(grid.pull_messages(grid.push_messages([message]))[0].content)

    assert "is not the task this site agreed to" in reply.error and not reply.blobs
    assert not (tmp_path / "sites").exists()  # no identity made, no roster enrolled


def test_a_deployed_site_that_agreed_to_no_task_refuses_one_it_does_not_know(
    tmp_path: Path,
) -> None:
    # Before: such a site read its file with whatever labels the plan's task named, so
    # a coordinator could send a label set of its choosing and learn, from the round
    # failing on the file's content after the charge, whether the site held a label.
    data = make_site_data(tmp_path / "site.csv", rows=50)
    node = deployed_node(data, tmp_path / "state", site_id="desk", epsilon=4.0, data_size=50,
                         **{"secagg-required": False})  # fmt: skip
    own = Task(name="probe-labels", labels=("rotten", "secret-label"))
    cfg = RunConfig(num_server_rounds=1, max_length=16, batch_size=32)
    settings = SiteSettings.from_node_config(node, cfg)
    arrays = build_model(model_spec(own)).trainable_state()

    reply, _ = train_round(
        TrainRequest(RoundPlan(1, cfg, own), arrays), settings, SiteState(), run_id="r"
    )

    assert reply.report.status == "refused"
    assert "is not a bundled one, and this site agreed to no task" in reply.report.reason
    assert not (tmp_path / "state" / LEDGER_FILE).exists()  # nothing charged
