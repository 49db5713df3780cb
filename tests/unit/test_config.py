"""The typed run configuration: parsing and clear errors."""

from __future__ import annotations

import math
import tomllib

import pytest

from deploy.flwr_cli import PROJECT
from wash_fed.config import (
    SECTIONS,
    ConfigError,
    ExchangeConfig,
    GateConfig,
    MemberSettings,
    OptimConfig,
    RuntimeConfig,
    WashFedConfig,
    reference,
)
from wash_fed.protocol import fedavg_format, wire_format


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = WashFedConfig()
    assert WashFedConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.total_steps == cfg.num_server_rounds * cfg.optim.local_steps


def test_kebab_keys_and_command_line_strings_are_parsed() -> None:
    cfg = WashFedConfig.from_mapping(
        {"shuffle-prob": "0.2", "num-members": "3", "shuffle-optimizer-state": "true", "lr": 1}
    )
    assert (
        cfg.exchange.shuffle_prob == 0.2
        and cfg.num_members == 3
        and cfg.exchange.shuffle_optimizer_state
    )
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("strategy", "wire_dtype", "in_use"),
    [
        ("wash", "auto", "int4"),
        ("fedavg", "auto", "float16"),
        ("papa", "auto", "float16"),
        ("wash", "float16", "float16"),
        ("fedavg", "int8", "int8"),
    ],
)
def test_auto_wire_dtype_is_the_strategys_own_and_a_set_one_is_kept(
    strategy: str, wire_dtype: str, in_use: str
) -> None:
    cfg = WashFedConfig().with_values({"strategy": strategy, "wire-dtype": wire_dtype})
    assert wire_format(cfg).name == in_use
    assert wire_format(cfg.member_settings).name == in_use
    assert cfg.to_mapping()["wire-dtype"] == wire_dtype


def test_a_default_run_switched_to_fedavg_sends_fedavgs_own_wire_dtype() -> None:
    wash = WashFedConfig()
    assert wire_format(wash.with_values({"strategy": "fedavg"})).name == "float16"
    assert fedavg_format(wash).name == "float16"  # what a WASH run's FedAvg figure assumes
    assert fedavg_format(wash.with_values({"wire-dtype": "int8"})).name == "int8"


def test_auto_keeps_optimizer_state_that_moves_with_the_weights_in_float16() -> None:
    cfg = WashFedConfig().with_values({"shuffle-optimizer-state": True})
    assert wire_format(cfg).name == "float16"


def test_a_resumed_run_compares_the_format_sent_not_the_setting() -> None:
    papa = WashFedConfig(strategy="papa")
    assert papa.training_changes(papa.with_values({"wire-dtype": "float16"})) == []
    wash = WashFedConfig()
    assert wash.training_changes(wash.with_values({"wire-dtype": "int4"})) == []
    assert wash.training_changes(wash.with_values({"wire-dtype": "float16"})) == ["wire-dtype"]


def test_independent_is_an_alias_of_ensemble() -> None:
    assert WashFedConfig(strategy="independent").strategy == "ensemble"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"shuffle-prob": 1.5}, r"shuffle-prob must be in \[0.0, 1.0\], got 1.5"),
        ({"shuffle-prob": math.nan}, "shuffle-prob must be finite, got nan"),
        ({"num-members": 0}, "num-members must be >= 1"),
        ({"strategy": "fedprox"}, "strategy must be one of wash, papa, papa-all, ensemble, fedavg"),
        ({"layer-schedule": "cubic"}, "layer-schedule must be one of linear, constant"),
        ({"partition": "pathological"}, "partition must be one of full, iid, dirichlet"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha must be > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0.0, 1.0\)"),
        ({"lr": -1}, "lr must be > 0"),
        ({"weight-decay": math.nan}, "weight-decay must be finite"),
        ({"outlier-factor": 0}, "outlier-factor must be > 0"),
        ({"quarantine-after": 0}, "quarantine-after must be >= 1"),
        (
            {"wire-dtype": "int2"},
            "wire-dtype must be one of auto, float32, bfloat16, float16, int8, int4",
        ),
        ({"num-server-rounds": "ten"}, "num-server-rounds must be int, got 'ten'"),
        ({"shuffle-optimizer-state": 3}, "shuffle-optimizer-state must be bool"),
        ({"num-members": True}, "num-members must be int"),
        ({"shuffel-prob": 0.1}, "unknown config key 'shuffel-prob'; known keys: .*shuffle-prob"),
        ({"soup": "greedy", "holdout-size": 0}, "soup='greedy' needs held-out data"),
        ({"dataset": "imagenet"}, "dataset must be one of cifar10, cifar100, fashion-mnist"),
        ({"shuffle-optimizer-state": True, "momentum": 0.0}, "needs optimizer state"),
        ({"model": "vgg99"}, "unknown model 'vgg99'; choose 'cnn', 'cnn-wide', 'resnet18'"),
        ({"model": "torchvision:vgg99"}, "'vgg99' is not a torchvision classification model"),
        ({"seed": 2**64}, "seed must fit in a signed 64-bit integer"),
        ({"poll-interval": 1e9}, "poll-interval must be <= 60"),
        ({"poll-interval": 20.0, "round-timeout": 10.0}, "poll-interval must be <= 10"),
        ({"round-timeout": 1e6}, "round-timeout must be <= 43200"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        WashFedConfig.from_mapping(values)


def test_pyproject_declares_every_key_with_its_default() -> None:
    """Flower only accepts --run-config overrides for declared keys."""
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert run_config.keys() == WashFedConfig().to_mapping().keys()
    assert WashFedConfig.from_mapping(run_config) == WashFedConfig()


@pytest.mark.parametrize(
    "key", [k for k, v in WashFedConfig().to_mapping().items() if isinstance(v, float)]
)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_number_must_be_finite(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"{key} must be finite"):
        WashFedConfig.from_mapping({key: value})


def test_the_configuration_reference_is_the_generated_one() -> None:
    """docs/configuration.md is what `python -m wash_fed.config --reference` prints: a key
    added, removed or redocumented in WashFedConfig without regenerating it fails here (and
    one added to pyproject.toml alone fails the test above)."""
    committed = (PROJECT / "docs" / "configuration.md").read_text()
    assert committed == reference(), (
        "regenerate it: python -m wash_fed.config --reference > docs/configuration.md"
    )


def test_each_section_checks_its_own_keys_and_the_whole_checks_across_them() -> None:
    with pytest.raises(ConfigError, match="batch-size must be >= 1"):
        OptimConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"round-timeout must be > 0\.0"):
        RuntimeConfig(round_timeout=0.0)
    with pytest.raises(ConfigError, match="outlier-factor must be finite"):
        GateConfig(outlier_factor=math.inf)
    ExchangeConfig(shuffle_optimizer_state=True)  # fine alone; with momentum 0 it is not
    with pytest.raises(ConfigError, match="shuffle-optimizer-state needs optimizer state"):
        WashFedConfig.from_mapping({"shuffle-optimizer-state": True, "momentum": 0.0})


def test_flat_keys_land_in_their_sections() -> None:
    cfg = WashFedConfig.from_mapping({"model": "resnet18", "batch-size": 64, "soup": "greedy"})
    assert cfg.model.name == "resnet18" and cfg.optim.batch_size == 64
    assert cfg.final.soup == "greedy"
    assert cfg.to_mapping()["model"] == "resnet18"
    assert cfg.with_values({"lr": 0.1}) == WashFedConfig.from_mapping(
        {**cfg.to_mapping(), "lr": 0.1}
    )
    headings = [line for line in reference().splitlines() if line.startswith("## ")]
    assert headings == ["## The run", *(f"## {kind.title}" for kind in SECTIONS.values())]


def test_a_members_settings_travel_as_keys_and_are_checked_like_the_configuration() -> None:
    cfg = WashFedConfig.from_mapping({"shuffle-prob": 0.2, "num-members": 3, "lr": 0.3})
    settings = cfg.member_settings
    sent = settings.to_mapping()
    assert "lr" not in sent and "num-server-rounds" not in sent and sent["shuffle-prob"] == 0.2
    assert MemberSettings.from_mapping(sent) == settings
    assert settings.shuffle_mask([40, 12], 3).digest() == cfg.shuffle_mask([40, 12], 3).digest()
    with pytest.raises(ConfigError, match="lr: not a member's settings"):
        MemberSettings.from_mapping({**sent, "lr": 0.1})
    with pytest.raises(ConfigError, match="shuffle-prob must be in"):
        MemberSettings.from_mapping({**sent, "shuffle-prob": 3.0})
