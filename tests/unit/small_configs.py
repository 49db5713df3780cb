"""Configurations the unit tests share."""

from __future__ import annotations

from wash_fed.config import WashFedConfig


def three_members(**overrides: object) -> WashFedConfig:
    """Three members, half of every tensor shuffled (the constant schedule): exchanges
    large enough to see in a few values, in float32 so that every value a test makes up
    travels exactly."""
    settings = {
        "num-members": 3,
        "shuffle-prob": 0.5,
        "layer-schedule": "constant",
        "wire-dtype": "float32",
        **overrides,
    }
    return WashFedConfig.from_mapping(settings)


def tiny_run(**overrides: object) -> WashFedConfig:
    """Three members on 600 Fashion-MNIST images each for two rounds of three steps, tested
    on 200: a whole run through the in-process Grid in seconds, deterministic."""
    settings = {
        "num-members": 3,
        "num-server-rounds": 2,
        "local-steps": 3,
        "batch-size": 32,
        "train-subset": 600,
        "holdout-size": 0,
        "test-subset": 200,
        "bn-batches": 2,
        "shuffle-prob": 0.2,
        "deterministic": True,
        "round-timeout": 2.0,
        **overrides,
    }
    return WashFedConfig.from_mapping(settings)
