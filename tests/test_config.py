"""Configuration: defaults, TOML, overrides and one clear message per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlora.config import RunConfig, fingerprint, load_config, parse_override, to_toml
from hlora.errors import ConfigError


def test_defaults_are_the_documented_main_job() -> None:
    config = load_config()
    assert config.model.name == "minilm"
    assert config.data.task == "mrpc"
    assert config.data.partition == "dirichlet" and config.data.alpha == 0.5
    assert config.federation.num_clients == 10
    assert set(config.federation.ranks) == {2, 4, 8, 16}
    assert config.federation.strategy == "hlora"


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[federation]\nranks = [4, 8]\nrounds = 3\n[data]\ntask = "rte"\n')
    config = load_config(path, ("federation.rounds=5", "model.name=roberta-large"))
    assert config.federation.ranks == (4, 8)
    assert config.federation.rounds == 5
    assert config.data.task == "rte"
    assert config.model.name == "roberta-large"


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ("federation.ranks=[1, 3]", "data.alpha=0.1"))
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.strategy=avg", "'federation.strategy': 'avg' (allowed: hlora"),
        ("federation.num_clients=0", "invalid value for 'federation.num_clients': 0"),
        ("federation.clients_per_round=20", "at most federation.num_clients = 10"),
        ("federation.ranks=[]", "invalid value for 'federation.ranks': [] (expected at least one"),
        ("federation.ranks=[4, -1]", "invalid value for 'federation.ranks': -1"),
        ("federation.rank_rule=list", "rank_rule 'list' needs one rank per client (10)"),
        ("federation.rank_rule=memory", "rank_rule 'memory' needs at least one budget"),
        ("federation.strategy=fedavg", "strategy 'fedavg' needs one rank for every client"),
        ("federation.rounds=1.5", "invalid value for 'federation.rounds': 1.5"),
        ("train.learning_rate=0", "invalid value for 'train.learning_rate': 0"),
        ("train.batch_size=true", "invalid value for 'train.batch_size': True"),
        ("train.device=tpu", "invalid value for 'train.device': 'tpu' (allowed: auto, cpu, cuda)"),
        ("data.task=sst2", "invalid value for 'data.task': 'sst2' (allowed: mrpc, rte, qqp"),
        ("data.partition=shards", "invalid value for 'data.partition': 'shards'"),
        ("data.alpha=0", "invalid value for 'data.alpha': 0"),
        ("model.lora_scaling=-2", "invalid value for 'model.lora_scaling': -2"),
        ("server.svd_method=lanczos", "invalid value for 'server.svd_method': 'lanczos'"),
        ("server.factor_split=left", "invalid value for 'server.factor_split': 'left'"),
        ("server.eval_truncations=sometimes", "invalid value for 'server.eval_truncations'"),
        ("train.lr_schedule=step", "invalid value for 'train.lr_schedule': 'step' (allowed: round"),
        ("train.proximal_mu=-0.1", "invalid value for 'train.proximal_mu': -0.1"),
        ("train.logit_adjustment=11", "invalid value for 'train.logit_adjustment': 11"),
        (
            "train.optimizer=adam",
            "invalid value for 'train.optimizer': 'adam' (allowed: adamw, sgd",
        ),
        ("train.learning_rate=2", "invalid value for 'train.learning_rate': 2 (expected a number"),
        ("train.head_learning_rate=-1", "invalid value for 'train.head_learning_rate': -1"),
        ("train.momentum=0.9", "'train.momentum': 0.9 (only with train.optimizer = 'sgd')"),
        ("train.adam_epsilon=0", "invalid value for 'train.adam_epsilon': 0 (expected a number"),
        ("data.validation_fraction=0.6", "invalid value for 'data.validation_fraction': 0.6"),
        ("server.optimizer=lamb", "invalid value for 'server.optimizer': 'lamb' (allowed: none"),
        ("server.learning_rate=0", "invalid value for 'server.learning_rate': 0"),
        ("server.momentum=1", "invalid value for 'server.momentum': 1"),
        ("server.beta2=-0.5", "invalid value for 'server.beta2': -0.5"),
        ("server.epsilon=0", "invalid value for 'server.epsilon': 0"),
        ("server.optimizer_state=sparse", "invalid value for 'server.optimizer_state': 'sparse'"),
        ("server.state_rank=0", "invalid value for 'server.state_rank': 0"),
        ("server.hlora_space=factors", "invalid value for 'server.hlora_space': 'factors'"),
        (
            "server.hlora_space=server-factors",
            "'server.hlora_space': 'server-factors' (it needs a server.optimizer)",
        ),
        (
            "server.hlora_space=factor-steps",
            "'server.hlora_space': 'factor-steps' (it needs a server.optimizer)",
        ),
        ("server.residual=all", "invalid value for 'server.residual': 'all' (allowed: drop"),
        ("server.residual=frozen", "'server.residual': 'frozen' (it needs a server.optimizer"),
        ("server.window=random", "invalid value for 'server.window': 'random' (allowed: leading"),
        ("server.window=rolling", "'server.window': 'rolling' (it needs server.residual = 'froz"),
        ("server.lr_schedule=step", "invalid value for 'server.lr_schedule': 'step' (allowed:"),
        ("server.warmup_ratio=1", "invalid value for 'server.warmup_ratio': 1"),
        (
            "server.lr_schedule=linear",
            "'server.lr_schedule': 'linear' (a schedule of the server's learning rate needs",
        ),
        ("server.warmup_ratio=0.1", "'server.warmup_ratio': 0.1 (a schedule of the server's"),
        ("federation.colour=blue", "unknown config key 'federation.colour' (allowed in"),
        ("network.port=1", "unknown config section 'network' (allowed: model, data"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, (override,))
    assert message in str(info.value)


def test_sgd_settings_are_checked_against_sgd() -> None:
    sgd = ("train.optimizer=sgd",)
    config = load_config(None, (*sgd, "train.learning_rate=30", "train.momentum=0.9"))
    assert config.train.learning_rate == 30  # SGD's LoRA factors need rates above 1
    with pytest.raises(
        ConfigError, match=r"'train.momentum': 1 \(expected a number in \[0.0, 1.0\)"
    ):
        load_config(None, (*sgd, "train.momentum=1"))
    with pytest.raises(ConfigError, match=r"'train.learning_rate': 101"):
        load_config(None, (*sgd, "train.learning_rate=101"))
    with pytest.raises(ConfigError, match=r"'train.adam_epsilon': 1e-05 \(only with train"):
        load_config(None, (*sgd, "train.adam_epsilon=1e-5"))


def test_bad_files_and_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file '.*missing\.toml' does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nrounds = 2\n")
    with pytest.raises(ConfigError, match=r"config file '.*bad\.toml' is not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("federation = 3\n")
    with pytest.raises(ConfigError, match="config section 'federation' must be a table"):
        load_config(wrong)
    with pytest.raises(ConfigError, match=r"invalid --set 'rounds=3': expected section\.key=value"):
        parse_override("rounds=3")


def test_fedavg_with_memory_ranks_is_refused_before_the_run() -> None:
    with pytest.raises(ConfigError, match="strategy 'fedavg' needs one rank for every client"):
        load_config(
            None,
            (
                "federation.strategy=fedavg",
                "federation.rank_rule=memory",
                "federation.memory_budgets_mb=[1.0, 100.0]",
            ),
        )
    one_rank = ("federation.ranks=[8]", "federation.memory_budgets_mb=[100.0]")
    config = load_config(
        None, ("federation.strategy=fedavg", "federation.rank_rule=memory", *one_rank)
    )
    assert config.federation.ranks == (8,)


def test_factored_state_is_refused_for_adaptive_optimizers() -> None:
    with pytest.raises(ConfigError, match=r"'yogi' needs 'dense' or 'auto' state"):
        load_config(None, ("server.optimizer=yogi", "server.optimizer_state=factored"))


@pytest.mark.parametrize("space", ["server-factors", "factor-steps"])
def test_server_factors_keep_their_state_at_the_factors_shapes(space: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{space}' keeps its state at the factors'"):
        load_config(
            None,
            (
                "server.optimizer=avgm",
                "server.optimizer_state=factored",
                f"server.hlora_space={space}",
            ),
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("federation.strategy=flora",), "'flora' merges the whole update into the base weights"),
        (
            ("model.quantization=nf4", "train.device=cuda"),
            "a 4-bit base cannot take the components added to it",
        ),
    ],
)
def test_a_frozen_residual_needs_a_base_that_can_take_it(
    overrides: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ("server.optimizer=sgd", "server.residual=frozen", *overrides))


@pytest.mark.parametrize("strategy", ["fedavg", "zeropad"])  # flora: no frozen residual
def test_a_rolling_window_is_for_hlora_alone(strategy: str) -> None:
    frozen = ("server.optimizer=sgd", "server.residual=frozen", "server.window=rolling")
    assert load_config(None, frozen).server.window == "rolling"
    with pytest.raises(ConfigError, match=r"'server.window': 'rolling' \(only 'hlora' re-sorts"):
        load_config(None, (*frozen, f"federation.strategy={strategy}", "federation.ranks=[4]"))


def test_bare_words_are_strings() -> None:
    assert parse_override("model.name=roberta-large") == ("model", "name", "roberta-large")
    assert parse_override("federation.rounds=3") == ("federation", "rounds", 3)
    assert isinstance(RunConfig().to_dict()["federation"]["ranks"], list)


def test_every_experiment_config_is_valid() -> None:
    folder = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(folder.glob("*.toml"))
    assert len(files) >= 5
    for path in files:
        config = load_config(path)
        assert config.output.name


def test_every_example_config_is_valid() -> None:
    """The ready configurations users are pointed at load and keep what the docs promise."""
    folder = Path(__file__).resolve().parents[1] / "examples"
    demo = load_config(folder / "smollm2_mrpc_instruct.toml")
    assert demo.model.task_type == "causal-lm" and demo.federation.strategy == "hlora"
    assert demo.federation.num_clients == 10 and demo.federation.ranks == (2, 4, 8, 16)
    for path in sorted(folder.glob("*.toml")):
        load_config(path)
    # The mixed-rank FedSGD file is the one-rank file with what RESULTS 0.8.10.3 measured on dev
    # (experiments/recipe_grid.sh mrpc-dirichlet-fedsgd with its GRID_SET).
    mixed = load_config(folder / "mrpc_fedsgd_mixed_ranks.toml")
    measured = load_config(
        folder / "mrpc_fedsgd.toml",
        (
            "federation.strategy=hlora",
            "federation.ranks=[2, 4, 8, 16]",
            "server.hlora_space=factor-steps",
            "server.residual=frozen",
        ),
    )
    assert mixed == measured


def test_settings_added_later_keep_old_run_folders_resumable() -> None:
    """A run folder's config.toml written before ``server.factor_split`` and ``[trust]``
    existed (by the code of 2026-12-01) keeps the fingerprint its checkpoint was stamped
    with; a new setting changed from its "as before" value changes it."""
    old = Path(__file__).parent / "config_before_factor_split.toml"
    assert "factor_split" not in old.read_text() and "[trust]" not in old.read_text()
    config = load_config(old)
    assert fingerprint(config) == "077f94f051e50a30"
    changed = load_config(old, ("server.factor_split=orthonormal-a",))
    assert fingerprint(changed) != "077f94f051e50a30"
    assert fingerprint(load_config(old, ("trust.max_client_examples=5",))) != "077f94f051e50a30"
