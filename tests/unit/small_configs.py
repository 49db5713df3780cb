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
