"""Settings: defaults, the .env file, precedence, and one clear error per bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import config
from fedsim.aggregator.strategies.robust import Krum


def load(tmp_path: Path, env_text: str | None = None, **environ: str) -> config.Settings:
    env_file = tmp_path / ".env"
    if env_text is not None:
        env_file.write_text(env_text)
    return config.load(environ=environ, env_file=env_file)


def test_defaults_match_the_original_run(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.num_images_train == 5000
    assert s.num_slices == 12
    assert s.client_slices == ((1, 4), (5, 8), (9, 12))
    assert (s.max_retry, s.max_wait, s.save_model) == (2, 2.0, 2)
    assert s.partition == "slices" and s.logical_clients == 3 and s.per_round == 3
    assert s.evaluate_every == 3
    assert s.model == "mlp" and s.aggregation == "async-weighted"
    assert s.round_quorum == 3
    assert s.explicit == frozenset()


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    s = load(tmp_path, "MAX_RETRY=5\nMODEL=cnn\n# a comment\n", MODEL="mlp")
    assert s.max_retry == 5
    assert s.model == "mlp"
    assert s.explicit == {"MAX_RETRY", "MODEL"}


def test_env_file_named_by_fedsim_env_file(tmp_path: Path) -> None:
    other = tmp_path / "other.env"
    other.write_text("EPOCHS=3\n")
    s = config.load(environ={"FEDSIM_ENV_FILE": str(other)})
    assert s.epochs == 3


def test_unknown_key_in_env_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="MAX_RETRIES") as info:
        load(tmp_path, "MAX_RETRIES=3\n")
    assert "unknown key" in str(info.value)


def test_compose_keys_are_allowed_in_env_file(tmp_path: Path) -> None:
    assert load(tmp_path, "AGGREGATOR_PORT=9000\n").max_retry == 2


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("MAX_RETRY", "0", "an integer >= 1"),
        ("MAX_RETRY", "two", "an integer >= 1"),
        ("MAX_WAIT", "-1", "a number >= 0"),
        ("MAX_WAIT", "nan", "a number >= 0"),
        ("LEARNING_RATE", "0", "a number > 0"),
        ("MOMENTUM", "1", "a number >= 0 and < 1"),
        ("MOMENTUM", "-0.1", "a number >= 0 and < 1"),
        ("NUM_IMAGES_TRAIN", "60001", "<= 60000"),
        ("MODEL", "resnet", "one of mlp, cnn"),
        ("OPTIMIZER", "lbfgs", "one of sgd, adam"),
        ("AGGREGATION", "fedprx", "did you mean fedprox?"),
        ("FEDASYNC_ALPHA", "0", "a number > 0 and <= 1"),
        ("FEDASYNC_ALPHA", "1.5", "a number > 0 and <= 1"),
        ("FEDASYNC_ALPHA", "nan", "a number > 0 and <= 1"),
        ("FEDASYNC_ALPHA", "half", "a number > 0 and <= 1"),
        ("FEDASYNC_STALENESS", "-0.5", "a number >= 0"),
        ("FEDASYNC_STALENESS", "inf", "a number >= 0"),
        ("DATA_VERIFY", "maybe", "true or false"),
        ("AGGREGATOR_URL", "localhost:8080", "http:// or https:// URL"),
        ("MNIST_MIRRORS", "ftp://x/", "http:// or https:// URL"),
        ("PARTITION", "random", "one of slices, iid, shards, dirichlet"),
        ("NUM_CLIENTS", "0", "an integer >= 1 and <= 60000"),
        ("DIRICHLET_ALPHA", "0", "a number > 0"),
        ("TASK_TIMEOUT", "-1", "a number > 0"),
        ("EVAL_EVERY", "x", "an integer >= 0"),
        ("CLIENT_INDEX", "2", "no longer a setting: workers now take their logical client"),
        ("DATA_DIR", " ", "a directory path"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(
    tmp_path: Path, key: str, value: str, allowed: str
) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, **{key: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {key}={value!r}")
    assert allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("slices", "reason"),
    [
        ("1-4 3-8", "ranges 1-4 and 3-8 overlap"),
        ("1-4 5-13", "outside 1-12"),
        ("0-2", "outside 1-12"),
        ("4-1", "runs backwards"),
        ("1-4,5-8", "is not a range"),
        (" , ", "is not a range"),
    ],
)
def test_bad_client_slices(tmp_path: Path, slices: str, reason: str) -> None:
    with pytest.raises(config.ConfigError, match=reason):
        load(tmp_path, CLIENT_SLICES=slices)


def test_slices_follow_num_images_train(tmp_path: Path) -> None:
    s = load(tmp_path, NUM_IMAGES_TRAIN="2000", CLIENT_SLICES="1-10 11-29 30")
    assert s.num_slices == 30
    assert s.client_slices == ((1, 10), (11, 29), (30, 30))
    with pytest.raises(config.ConfigError, match="outside 1-30"):
        load(tmp_path, NUM_IMAGES_TRAIN="2000", CLIENT_SLICES="1-31")


def test_an_empty_retired_key_is_ignored(tmp_path: Path) -> None:
    assert load(tmp_path, "CLIENT_INDEX=\n").client_slices == ((1, 4), (5, 8), (9, 12))


def test_empty_client_slices_means_the_default(tmp_path: Path) -> None:
    assert load(tmp_path, CLIENT_SLICES="").client_slices == ((1, 4), (5, 8), (9, 12))


@pytest.mark.parametrize(
    ("environ", "key", "reason"),
    [
        (
            {"PARTITION": "iid", "CLIENT_SLICES": "1-4"},
            "CLIENT_SLICES",
            "only for PARTITION=slices",
        ),
        ({"PARTITION": "shards", "NUM_CLIENTS": "7"}, "SHARDS_PER_CLIENT", "must divide"),
        ({"PARTITION": "dirichlet", "NUM_CLIENTS": "6001"}, "NUM_CLIENTS", "at most 6000"),
        (
            {"PARTITION": "iid", "NUM_CLIENTS": "5", "CLIENTS_PER_ROUND": "6"},
            "CLIENTS_PER_ROUND",
            "more than the 5 logical clients (NUM_CLIENTS)",
        ),
        ({"CLIENTS_PER_ROUND": "4"}, "CLIENTS_PER_ROUND", "more than the 3 logical clients"),
    ],
)
def test_impossible_combinations_stop_with_the_reason(
    tmp_path: Path, environ: dict[str, str], key: str, reason: str
) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, **environ)
    assert str(info.value).startswith(f"invalid setting {key}=")
    assert reason in str(info.value)


def test_clients_per_round_defaults(tmp_path: Path) -> None:
    s = load(tmp_path, PARTITION="iid")
    assert (s.logical_clients, s.per_round, s.round_quorum, s.evaluate_every) == (100, 10, 10, 10)
    s = load(tmp_path, PARTITION="shards", NUM_CLIENTS="20", CLIENTS_PER_ROUND="5", EVAL_EVERY="2")
    assert (s.per_round, s.evaluate_every) == (5, 2)


def test_fedasync_settings(tmp_path: Path) -> None:
    s = load(tmp_path, AGGREGATION="FedAsync", FEDASYNC_ALPHA="1", FEDASYNC_STALENESS="0")
    assert (s.aggregation, s.fedasync_alpha, s.fedasync_staleness) == ("fedasync", 1.0, 0.0)


def test_min_clients_is_the_quorum_at_the_round_deadline(tmp_path: Path) -> None:
    assert load(tmp_path, ROUND_DEADLINE="60", MIN_CLIENTS="2").round_quorum == 2
    assert load(tmp_path, ROUND_DEADLINE="auto", MIN_CLIENTS="9").round_quorum == 3  # at most C
    assert load(tmp_path, ROUND_DEADLINE="60").round_quorum == 1  # 0: any update
    assert load(tmp_path).round_quorum == 3  # no deadline: a round closes at C arrivals
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, MIN_CLIENTS="2")
    assert str(info.value).startswith("invalid setting MIN_CLIENTS='2': the quorum a round needs")
    assert "set CLIENTS_PER_ROUND=N and OVERSELECT" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "value"), [("off", None), ("AUTO", "auto"), ("12.5", 12.5), (" 600 ", 600.0)]
)
def test_round_deadline_is_off_auto_or_seconds(tmp_path: Path, raw: str, value: object) -> None:
    assert load(tmp_path, ROUND_DEADLINE=raw).round_deadline == value


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", "soon"])
def test_a_bad_round_deadline_is_one_line(tmp_path: Path, raw: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, ROUND_DEADLINE=raw)
    assert str(info.value) == (
        f"invalid setting ROUND_DEADLINE={raw!r}: off, auto, or a number of seconds > 0"
    )


def test_overselect_is_at_least_one(tmp_path: Path) -> None:
    assert load(tmp_path, OVERSELECT="1.3").overselect == 1.3
    with pytest.raises(config.ConfigError, match=r"OVERSELECT='0\.9': a number >= 1"):
        load(tmp_path, OVERSELECT="0.9")


def test_an_old_round_timeout_stops_with_its_new_name(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, "ROUND_TIMEOUT=600\n")
    assert str(info.value) == (
        "invalid setting ROUND_TIMEOUT='600': no longer a setting: renamed ROUND_DEADLINE"
        " (seconds, auto or off; docs/population.md): rename the line"
    )


def test_resolved_settings_are_json_friendly(tmp_path: Path) -> None:
    import json

    out = load(tmp_path, CLIENT_TOKEN="ab" * 32).to_dict()
    assert set(out) == config.KNOWN_KEYS - config.SECRET_KEYS  # a token is never saved
    assert out["CLIENT_SLICES"] == "1-4 5-8 9-12"
    json.dumps(out)


def test_every_setting_has_a_valid_default() -> None:
    for setting in config.SETTINGS:
        setting.parse(setting.default)
        assert setting.why


def test_load_checks_the_rule_once_without_building_it(tmp_path: Path, monkeypatch) -> None:
    # The aggregator builds the rule (State); load only checks it, so it is built once.
    def built(cls: type, settings: object) -> None:
        raise AssertionError("load built the rule")

    monkeypatch.setattr(Krum, "from_settings", classmethod(built))
    assert load(tmp_path, AGGREGATION="krum", PARTITION="iid").aggregation == "krum"
    with pytest.raises(config.ConfigError, match="KRUM_F"):
        load(tmp_path, AGGREGATION="krum")  # 3 clients per round: Krum needs 5


def test_the_table_imports_no_rule_and_load_imports_only_the_chosen_one(tmp_path: Path) -> None:
    # In a fresh interpreter: what this process has imported already does not count.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fedsim import config\n"
        "rules = lambda: sorted(m.rpartition('.')[2] for m in sys.modules"
        " if m.startswith('fedsim.aggregator.strategies.'))\n"
        "assert 'numpy' not in sys.modules and rules() == [], rules()\n"
        "config.load(environ={'AGGREGATION': 'fedavgm'}, env_file=Path('absent.env'))\n"
        "print(' '.join(rules()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["aggregate", "base", "fedavg", "fedopt"]


def test_without_settings_leaves_out_every_fedsim_and_compose_key_and_keeps_the_rest():
    environ = {"AGGREGATION": "krum", "COMPOSE_PROJECT_NAME": "x", "STACK": "y",
               "FEDSIM_ENV_FILE": "/tmp/e", "PATH": "/bin", "HOME": "/h", "MINE": "1"}  # fmt: skip

    assert config.without_settings(environ) == {"PATH": "/bin", "HOME": "/h", "MINE": "1"}
    assert config.without_settings(environ, extra={"MINE"}) == {"PATH": "/bin", "HOME": "/h"}


def test_the_virtual_clock_takes_asynchronous_rules_but_not_slices(tmp_path: Path) -> None:
    assert load(tmp_path, CLOCK="virtual", AGGREGATION="fedavg").clock == "virtual"
    fedbuff = load(tmp_path, CLOCK="virtual", AGGREGATION="fedbuff", PARTITION="iid")
    assert fedbuff.clock == "virtual"
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, CLOCK="virtual", AGGREGATION="fedbuff")  # PARTITION=slices by default
    assert str(info.value) == (
        "invalid setting CLOCK='virtual': fedbuff under PARTITION=slices trains each range's"
        " slices in order, which has no simulated order: use another PARTITION (iid, ...) or"
        " CLOCK=real"
    )


def test_availability_with_a_round_rule_needs_a_deadline(tmp_path: Path) -> None:
    ok = load(tmp_path, AGGREGATION="fedavg", AVAILABILITY="diurnal", ROUND_DEADLINE="auto")
    assert ok.round_deadline == "auto"
    assert load(tmp_path, AVAILABILITY="diurnal").availability == "diurnal"  # asynchronous
    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, AGGREGATION="fedavg", AVAILABILITY="diurnal:0.3")
    assert str(info.value) == (
        "invalid setting AVAILABILITY='diurnal:0.3': round rules then need a ROUND_DEADLINE"
        " (seconds or auto): a round that finds too few clients online is tried again at its"
        " deadline"
    )
