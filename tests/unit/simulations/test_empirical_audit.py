"""The one-run audit through the real engine (simulations/empirical_audit.py): it
audits the noise a simulated site calibrates, its canaries ride the site's sampler and
the engine's clip (a broken clip, noise or sampler shows up as a bound above the
claim, an intact one does not), the coordinator's view goes through the real secure
sum, and bad switches are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.dp_engine import BookkeepingDPSGD
from common.privacy.budget import SiteBudget, calibrate_run
from simulations.empirical_audit import (
    Breaks,
    guess_grid,
    mechanism,
    run_audit,
    secure_sum,
)
from simulations.runner import check_options
from tests.support.reference import add_mod

# Three rounds of the tiny model on Rotten Tomatoes site 0 (1,024 rows): seconds.
SHORT = {"num-server-rounds": 3, "epsilon": 2.0, "max-length": 32}


def _cfg(**extra: object) -> tuple[RunConfig, int]:
    return check_options({**SHORT, **extra})


def _audit(breaks: Breaks | None = None, mode: str = "whitebox", **extra: object):  # type: ignore[no-untyped-def]
    cfg, sites = _cfg(**extra)
    return run_audit(
        cfg,
        mode=mode,
        canaries=1000,
        breaks=breaks,
        seed=5,
        num_sites=sites,
        say=lambda _: None,  # type: ignore[arg-type]
    )


def test_the_audit_runs_the_noise_a_fresh_simulated_site_calibrates() -> None:
    cfg, _ = _cfg()
    mech = mechanism(cfg, 1024, Breaks())
    budget = SiteBudget((), budget=100.0, delta=cfg.delta, scope="s")  # nothing spent yet
    site_sigma = calibrate_run(
        budget,
        target=cfg.epsilon,
        sample_rate=mech.sample_rate,
        steps=mech.steps_per_round,
        rounds=mech.rounds,
    )
    assert mech.noise_multiplier == pytest.approx(site_sigma, rel=1e-6)
    assert mech.sample_rate == 0.25 and mech.steps == 12
    assert mech.epsilon_claim == pytest.approx(2.0, rel=2e-3)


def test_broken_switches_are_refused_by_name() -> None:
    assert Breaks.parse(["noise=0.1", "sample-rate=4"]) == Breaks(0.1, 4.0)
    for bad, match in [
        (["clip=2"], "noise=FACTOR or sample-rate=FACTOR"),
        (["noise=zero"], "not a number"),
        (["noise=-1"], "positive"),
        (["noise=0.5", "noise=0.2"], "twice"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Breaks.parse(bad)


def test_the_guesses_are_declared_per_canary_count() -> None:
    assert guess_grid(1000) == [(10, 10), (25, 25), (50, 50), (100, 100), (250, 250)]
    assert all(2 * k <= 20 for k, _ in guess_grid(20))


def test_an_intact_mechanism_stays_within_its_claim_and_a_broken_clip_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intact = _audit()
    assert intact.fdp.epsilon <= intact.epsilon_claim and not intact.above_claim
    # The engine's clip broken (every factor 1): the canaries' 10 C gradients pass whole.
    monkeypatch.setattr(BookkeepingDPSGD, "_factors", lambda self, norms: torch.ones_like(norms))
    broken = _audit()
    assert broken.above_claim, (broken.steinke, broken.fdp)
    assert broken.fdp.epsilon > intact.fdp.epsilon + 1.0


def test_a_layer_rule_that_understates_norms_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The book-keeping engine records each canary as an example of its Linear layer, so
    # the same per-example norm rule sizes it: one that understates norms 100-fold
    # (the clip then hardly bites) is certified above the claim.
    import common.dp_engine as engine

    rule = engine._linear

    def understated(m, a, g):  # type: ignore[no-untyped-def]
        n2, summed = rule(m, a, g)
        return n2 / 1e4, summed

    monkeypatch.setattr(engine, "_linear", understated)
    broken = _audit()
    assert broken.above_claim, (broken.steinke, broken.fdp)


@pytest.mark.parametrize(
    ("breaks", "mode"),
    [
        (Breaks(noise=0.1), "whitebox"),
        (Breaks(sample_rate=4.0), "whitebox"),
        (Breaks(noise=0.1), "pipeline"),  # the coordinator's decoded secure sum
    ],
    ids=["noise", "sample-rate", "pipeline-noise"],
)
def test_a_broken_mechanism_is_certified_above_its_claim(breaks: Breaks, mode: str) -> None:
    result = _audit(breaks, mode)
    assert result.above_claim, (result.steinke, result.fdp, result.epsilon_claim)
    assert result.mechanism.epsilon_claim == pytest.approx(2.0, rel=2e-3)  # the unbroken claim


def test_the_opacus_engine_clips_the_canaries_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus.optimizers import DPOptimizer

    # (intact, Opacus gives the book-keeping engine's weights: test_dp_engine.py)
    # Opacus's own clip broken (a huge clip norm inside its clipping only): caught.
    original = DPOptimizer.clip_and_accumulate

    def unclipped(self: DPOptimizer) -> None:
        saved, self.max_grad_norm = self.max_grad_norm, 1e9
        try:
            original(self)
        finally:
            self.max_grad_norm = saved

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)
    assert _audit(**{"dp-engine": "opacus"}).above_claim


def test_the_audits_secure_sum_is_the_ring_sum_of_the_inputs() -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 1 << 16, 50, dtype=np.uint64) for _ in range(3)]
    expected = add_mod(add_mod(inputs[0], inputs[1], 16), inputs[2], 16)
    assert np.array_equal(secure_sum(inputs, 16, min_sites=3), expected)


def test_bad_audits_are_refused_with_the_reason() -> None:
    cfg, sites = _cfg()
    with pytest.raises(ConfigError, match="at least 10"):
        run_audit(cfg, canaries=5, num_sites=sites)
    with pytest.raises(ConfigError, match="dp = false"):
        run_audit(cfg.with_overrides({"dp": False}), num_sites=sites)
    with pytest.raises(ConfigError, match="--site 12"):
        run_audit(cfg, site=12, num_sites=sites, canaries=20, say=lambda _: None)
    with pytest.raises(ConfigError, match="--mode"):
        run_audit(cfg, mode="greybox", num_sites=sites)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):  # the site's own check: delta < 1/n
        run_audit(cfg.with_overrides({"delta": 0.5}), num_sites=sites, canaries=20)
    with pytest.raises(ConfigError, match="use fewer canaries"):  # tiny hosts 131,328
        run_audit(cfg, canaries=200_000, num_sites=sites, say=lambda _: None)
