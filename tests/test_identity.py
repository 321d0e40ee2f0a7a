"""Which range a client takes: CLIENT_INDEX, the Compose container name, or the prompts."""

from __future__ import annotations

import pytest

from fedsim.client import identity
from fedsim.config import ConfigError


def no_dns() -> list[str]:
    return []


def never_tty() -> bool:
    return False


def test_client_index_picks_the_range(make_settings):
    settings = make_settings(CLIENT_INDEX="2")
    me = identity.resolve(settings, lookup=lambda: ["fedsim-client-3"], isatty=never_tty)
    assert (me.index, me.first, me.last, me.source) == (2, 5, 8, "CLIENT_INDEX")
    assert me.describe(settings.num_images_train) == "client-2: slices 5-8 (samples 20000-39999)"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedsim-client-3", 3),
        ("proj-client-12.proj_default", 12),
        ("my-app_client_2", 2),  # Compose v1 style
        ("fedsim-aggregator-1", None),
        ("client-3x", None),
        ("fedsim-client-0", None),
        ("laptop", None),
    ],
)
def test_container_names(name, expected):
    assert identity.parse_container_name(name) == expected


def test_the_replica_number_comes_from_the_reverse_lookup(make_settings):
    settings = make_settings()
    me = identity.resolve(
        settings, lookup=lambda: ["172-18-0-5", "fedsim-client-3.fedsim_default"], isatty=never_tty
    )
    assert (me.index, me.first, me.last, me.source) == (3, 9, 12, "container name")
    assert me.describe(settings.num_images_train) == "client-3: slices 9-12 (samples 40000-59999)"


def test_more_replicas_than_ranges_is_an_error(make_settings):
    settings = make_settings()
    with pytest.raises(ConfigError) as caught:
        identity.resolve(settings, lookup=lambda: ["fedsim-client-4"], isatty=never_tty)
    message = str(caught.value)
    assert 'replica 4 has no range in CLIENT_SLICES "1-4 5-8 9-12"' in message
    assert "scale the clients down to 3 or add a range" in message


def test_no_way_to_tell_names_the_settings(make_settings):
    with pytest.raises(ConfigError, match=r"CLIENT_INDEX.*CLIENT_SLICES"):
        identity.resolve(make_settings(), lookup=no_dns, isatty=never_tty)


def test_no_prompt_when_client_slices_is_set(make_settings):
    settings = make_settings(CLIENT_SLICES="1-6 7-12")

    def ask(prompt: str) -> str:
        raise AssertionError("must not prompt")

    with pytest.raises(ConfigError, match="CLIENT_INDEX"):
        identity.resolve(settings, lookup=no_dns, isatty=lambda: True, ask=ask)


def test_interactive_prompts_ask_again_on_invalid_input(make_settings):
    answers = iter(["two", "2", "5", "4 x", "9 3", "0 2", "3 13", "3 5"])
    prompts: list[str] = []
    said: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    me = identity.resolve(
        make_settings(), lookup=no_dns, isatty=lambda: True, ask=ask, say=said.append
    )
    assert (me.index, me.first, me.last, me.source) == (2, 3, 5, "typed in")
    assert prompts == ["Client Id: "] * 2 + ["Dataset Range: "] * 6
    assert len(said) == 6 and "1 <= l <= r <= 12" in said[-1]


def test_closed_input_falls_back_to_the_message(make_settings):
    def ask(prompt: str) -> str:
        raise EOFError

    with pytest.raises(ConfigError, match="CLIENT_INDEX"):
        identity.resolve(make_settings(), lookup=no_dns, isatty=lambda: True, ask=ask)


def test_container_names_from_the_resolver(monkeypatch):
    monkeypatch.setattr(identity.socket, "gethostname", lambda: "0f3c9a1b2c3d")
    monkeypatch.setattr(identity.socket, "gethostbyname", lambda host: "172.18.0.5")
    monkeypatch.setattr(
        identity.socket,
        "gethostbyaddr",
        lambda ip: ("fedsim-client-2.fedsim_default", [], [ip]),
    )
    assert identity.container_names() == ["fedsim-client-2.fedsim_default"]
    assert identity.replica_from_dns() == 2


def test_no_reverse_name_means_no_replica(monkeypatch):
    def fail(ip: str):
        raise identity.socket.herror(1, "Unknown host")

    monkeypatch.setattr(identity.socket, "gethostbyaddr", fail)
    assert identity.container_names() == []
    assert identity.replica_from_dns() is None
