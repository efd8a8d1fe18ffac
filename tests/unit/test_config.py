"""Settings: file < environment < flags; one clear error naming the key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server.cli import main
from server.config import ConfigError, ensure_secrets, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "squall.toml"
    path.write_text(text)
    return path


def test_defaults_without_any_config() -> None:
    s = load_settings(env={})
    assert s.server.port == 8000
    ns = s.namespaces["default"]
    assert (ns.history_size, ns.history_ttl, ns.recover, ns.allow_publish) == (
        100,
        600,
        True,
        False,
    )
    assert s.server.allowed_origins == []
    assert s.limits.max_batch_commands == 1000


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
port = 9000
host = "0.0.0.0"
[limits]
max_connections = 50
[namespaces.chat]
allow_publish = true
history_size = 10
""",
    )
    s = load_settings(path, env={})
    assert (s.server.port, s.server.host, s.limits.max_connections) == (9000, "0.0.0.0", 50)
    assert s.namespaces["chat"].allow_publish and s.namespaces["chat"].history_size == 10
    assert "default" in s.namespaces
    env = {"SQUALL_SERVER_PORT": "9100", "SQUALL_LIMITS_MAX_CONNECTIONS": "60"}
    s = load_settings(path, env=env)
    assert (s.server.port, s.limits.max_connections) == (9100, 60)
    s = load_settings(path, env=env, overrides={"server.port": 9200})
    assert s.server.port == 9200


def test_env_aliases(tmp_path: Path) -> None:
    env = {
        "SQUALL_API_KEY": "an-api-key-of-enough-length",
        "SQUALL_TOKEN_SECRET": "s" * 40,
        "SQUALL_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "SQUALL_REQUIRE_SERVICES": "1",  # a tooling variable, not a setting
    }
    s = load_settings(env=env)
    assert s.auth.api_key == "an-api-key-of-enough-length"
    assert s.auth.token_secret == "s" * 40
    assert s.server.allowed_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nport = 'x'", "server.port"),
        ("[server]\nport = 70000", "server.port"),
        ("[server]\nprot = 1", "server.prot"),
        ("[limits]\nmax_connections = -1", "limits.max_connections"),
        ("[limits]\nmax_connections = 1.5", "limits.max_connections"),
        ("[limits]\nmax_batch_commands = 0", "limits.max_batch_commands"),
        ("[limits]\nmax_batch_commands = 'many'", "limits.max_batch_commands"),
        ("[nope]\nx = 1", "nope"),
        ("[namespaces.chat]\npresence = 'yes'", "namespaces.chat.presence"),
        ("[namespaces.chat]\njoin_leave = true", "namespaces.chat.join_leave"),
        ("[namespaces.'bad name']\npresence = true", "namespaces.bad name"),
        ("[auth]\ntoken_secret = 'short'", "auth.token_secret"),
        ("[auth]\ntoken_algorithms = ['RS256']", "auth.token_public_key"),
        ("[server]\nlog_level = 'loud'", "server.log_level"),
        ("this is = not toml =", "--config"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert info.value.key == key


def test_bad_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"SQUALL_SERVER_PORT": "eighty"})
    assert "SQUALL_SERVER_PORT" in info.value.key


def test_check_config_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("SQUALL_")]:
        monkeypatch.delenv(var)
    good = write(tmp_path, "[server]\nport = 8100\n")
    assert main(["check-config", "--config", str(good)]) == 0
    assert "config OK" in capsys.readouterr().out
    bad = write(tmp_path, "[limits]\nsend_queue_bytes = 0\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "limits.send_queue_bytes" in err
    assert err.count("\n") == 1
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "conf" / "squall.example.toml"
    s = load_settings(example, env={})
    assert "chat" in s.namespaces


def test_secrets_generated_once_private_and_reused(tmp_path: Path) -> None:
    s = load_settings(env={}, overrides={"server.data_dir": str(tmp_path)})
    path = ensure_secrets(s)
    assert path == tmp_path / "secrets.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = (s.auth.token_secret, s.auth.api_key)
    assert len(first[0]) >= 32 and len(first[1]) >= 16
    again = load_settings(env={}, overrides={"server.data_dir": str(tmp_path)})
    ensure_secrets(again)
    assert (again.auth.token_secret, again.auth.api_key) == first
    # Environment wins over the generated file.
    env = {"SQUALL_API_KEY": "from-the-environment-1234"}
    third = load_settings(env=env, overrides={"server.data_dir": str(tmp_path)})
    ensure_secrets(third)
    assert third.auth.api_key == "from-the-environment-1234"
    assert third.auth.token_secret == first[0]


def test_token_command_uses_the_generated_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.auth import Authenticator

    for var in [v for v in os.environ if v.startswith("SQUALL_")]:
        monkeypatch.delenv(var)
    assert main(["token", "--data-dir", str(tmp_path), "--sub", "ann", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    s = load_settings(env={}, overrides={"server.data_dir": str(tmp_path)})
    ensure_secrets(s)
    assert Authenticator(s.auth).verify_connection_token(token).user == "ann"
    assert main(["token", "--data-dir", str(tmp_path), "--sub", "ann", "--channel", "dm:1"]) == 0
    sub_token = capsys.readouterr().out.strip()
    exp = Authenticator(s.auth).verify_subscription_token(
        sub_token, user="ann", client="any", channel="dm:1"
    )
    assert exp > 0


PUSHER_APP = '[[pusher.apps]]\nid = "1234"\nkey = "app-key"\nsecret = "app-secret-0123456789"\n'


def test_pusher_apps_get_a_namespace_of_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("SQUALL_")]:
        monkeypatch.delenv(var)
    text = (
        PUSHER_APP
        + 'enable_client_messages = true\n[[pusher.apps.webhooks]]\nurl = "http://127.0.0.1:9/h"\n'
    )
    s = load_settings(write(tmp_path, text), env={})
    (app,) = s.pusher.apps
    assert app.namespace == "pusher-1234" and app.enable_client_messages
    assert app.webhooks[0].url == "http://127.0.0.1:9/h"
    ns = s.namespaces["pusher-1234"]
    assert ns.presence and ns.join_leave and ns.private
    assert "app-secret" not in repr(app)
    assert main(["check-config", "--config", str(tmp_path / "squall.toml")]) == 0
    out = capsys.readouterr().out
    assert "pusher app 1234: key app-key" in out and "app-secret" not in out


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[[pusher.apps]]\nid = "1"\nkey = "k"\nsecret = "short"\n', "pusher.apps[0].secret"),
        ('[[pusher.apps]]\nkey = "k"\nsecret = "0123456789abcdef"\n', "pusher.apps[0].id"),
        (PUSHER_APP + PUSHER_APP, "pusher.apps[1].id"),
        (PUSHER_APP + "bogus = 1\n", "pusher.apps[0].bogus"),
        (
            PUSHER_APP + '[[pusher.apps.webhooks]]\nurl = "http://h/x"\nevents = ["nope"]\n',
            "pusher.apps[0].webhooks[0].events",
        ),
        (PUSHER_APP + '[[pusher.apps.webhooks]]\nurl = "ftp://h/x"\n', "url"),
        (PUSHER_APP + "[namespaces.pusher-1234]\npresence = false\n", "presence"),
    ],
)
def test_bad_pusher_apps_are_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert key in str(info.value)


# ---- the Redis broker behind Sentinel ------------------------------------------


def test_sentinel_broker_url_and_replica_acks() -> None:
    from server.broker import SentinelURL, split_broker_urls

    url = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel3/main/2?sentinel_password=x"
    s = load_settings(raw={"broker": {"url": url, "min_replicas_ack": 1}}, env={})
    assert (s.broker.min_replicas_ack, s.broker.replicas_ack_timeout_ms) == (1, 100)
    target = SentinelURL.parse(split_broker_urls(s.broker.url)[0])
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel3", 26379))
    assert (target.master, target.db, target.password) == ("main", 2, "s3cret")
    assert target.sentinel_password == "x"
    # As one shard of a list, next to a plain server.
    both = "redis://127.0.0.1:6379/0,redis+sentinel://h1:26379,h2:26379/other"
    assert split_broker_urls(both) == [
        "redis://127.0.0.1:6379/0",
        "redis+sentinel://h1:26379,h2:26379/other",
    ]
    assert load_settings(raw={"broker": {"url": both}}, env={}).broker.url == both
    env = {
        "SQUALL_BROKER_URL": "redis+sentinel://h1/m",
        "SQUALL_BROKER_MIN_REPLICAS_ACK": "2",
        "SQUALL_BROKER_REPLICAS_ACK_TIMEOUT_MS": "250",
    }
    s = load_settings(env=env)
    assert (s.broker.min_replicas_ack, s.broker.replicas_ack_timeout_ms) == (2, 250)


@pytest.mark.parametrize(
    ("broker", "key", "words"),
    [
        ({"url": "redis+sentinel://h1:26379"}, "broker.url", "master's name"),
        ({"url": "redis+sentinel://h1:26379/m?colour=red"}, "broker.url", "unknown option"),
        ({"url": "redis+sentinel://h1:port/m"}, "broker.url", "port"),
        ({"url": "mongodb://:pw@h1/m"}, "broker.url", "redis+sentinel://"),
        ({"min_replicas_ack": 1}, "broker.min_replicas_ack", "needs a Redis broker"),
        (
            {"url": "redis+cluster://h1:7000", "min_replicas_ack": 1},
            "broker.min_replicas_ack",
            "redis+cluster",
        ),
        ({"url": "redis://h1", "min_replicas_ack": -1}, "broker.min_replicas_ack", ""),
        ({"url": "redis://h1", "replicas_ack_timeout_ms": 0}, "broker.replicas_ack_timeout_ms", ""),
        (
            {"url": "redis://h1", "min_replicas_ack": 1, "replicas_ack_timeout_ms": 5000},
            "broker.replicas_ack_timeout_ms",
            "shorter than broker.timeout",
        ),
    ],
)
def test_bad_sentinel_and_replica_ack_settings(
    broker: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(raw={"broker": broker}, env={})
    assert info.value.key == key
    assert words in info.value.problem
    assert "pw" not in str(info.value)


def test_check_config_shows_the_broker_without_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("SQUALL_")]:
        monkeypatch.delenv(var)
    url = "redis+sentinel://user:hunter22@s1:26379,s2:26379/main?sentinel_password=other-secret"
    path = write(tmp_path, f'[broker]\nurl = "{url}"\nmin_replicas_ack = 1\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "broker: redis+sentinel://s1:26379,s2:26379/main, min_replicas_ack 1 (100 ms)" in out
    assert "hunter22" not in out and "other-secret" not in out and "user" not in out
    path = write(tmp_path, '[broker]\nurl = "redis://:hunter22@r1:6379/0,redis://r2:6379/1"\n')
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "broker: redis://r1:6379/0,redis://r2:6379/1" in out
    assert "hunter22" not in out
