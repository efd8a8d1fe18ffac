"""Proxy hooks: reading the back end's answers, the headers kept of a
connection, the counters, and the settings' checks."""

from __future__ import annotations

from typing import Any

import pytest
import tornado.httputil

from server.config import ConfigError, load_settings
from server.errors import Disconnect
from server.proxy import (
    KEEP,
    BadAnswer,
    ConnectGrant,
    HookDisconnect,
    HookError,
    Proxy,
    ProxyStats,
    RefreshGrant,
    filter_headers,
    parse_answer,
    parse_connect,
    parse_publish,
    parse_refresh,
)

NOW = 1_700_000_000.0


def test_a_result_is_returned_as_it_is() -> None:
    assert parse_answer(b'{"result": {"user": "42"}}') == {"user": "42"}
    assert parse_answer(b'{"result": {}, "extra": 1}') == {}


def test_an_error_answer_becomes_the_clients_error() -> None:
    with pytest.raises(HookError) as caught:
        parse_answer(b'{"error": {"code": 1000, "message": "login first"}}')
    assert (caught.value.code, caught.value.message) == (1000, "login first")
    assert caught.value.to_json() == {"code": 1000, "message": "login first"}


def test_a_disconnect_answer_carries_the_close_code_and_reason() -> None:
    with pytest.raises(HookDisconnect) as caught:
        parse_answer(b'{"disconnect": {"code": 4501, "reason": "banned"}}')
    assert caught.value.disconnect == Disconnect(4501, "banned")
    assert not caught.value.disconnect.reconnect


def test_a_long_disconnect_reason_is_cut_to_fit_a_close_frame() -> None:
    with pytest.raises(HookDisconnect) as caught:
        parse_answer(('{"disconnect": {"code": 4000, "reason": "%s"}}' % ("é" * 100)).encode())
    assert len(caught.value.disconnect.reason.encode()) <= 123


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", "exactly one of"),
        (b'{"result": {}, "error": {"code": 1000}}', "exactly one of"),
        (b'{"result": "yes"}', "'result' must be an object"),
        (b'{"error": {"code": "1000", "message": "x"}}', "error.code"),
        (b'{"error": {"code": 42, "message": "x"}}', "error.code"),
        (b'{"error": {"code": 1000, "message": 7}}', "error.message"),
        (b'{"disconnect": {"code": 1000, "reason": "x"}}', "disconnect.code"),
        (b'{"disconnect": {"code": true, "reason": "x"}}', "disconnect.code"),
        (b'{"disconnect": {"code": 4000, "reason": null}}', "disconnect.reason"),
    ],
)
def test_other_shapes_are_bad_answers(body: bytes, problem: str) -> None:
    with pytest.raises(BadAnswer, match=problem):
        parse_answer(body)


def test_connect_result() -> None:
    grant = parse_connect(
        {"user": "42", "info": {"name": "Ann"}, "channels": ["news"], "expire_at": int(NOW) + 60},
        now=NOW,
    )
    assert grant == ConnectGrant("42", {"name": "Ann"}, ["news"], int(NOW) + 60)
    # Only the user is required; "" is an anonymous user.
    assert parse_connect({"user": ""}, now=NOW) == ConnectGrant("")
    assert parse_connect({"user": "1", "channels": None, "expire_at": None}, now=NOW).expire_at == 0


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({}, "user"),
        ({"user": 42}, "user"),
        ({"user": None}, "user"),
        ({"user": "1", "channels": "news"}, "channels"),
        ({"user": "1", "channels": ["news", 1]}, "channels"),
        ({"user": "1", "expire_at": "soon"}, "expire_at"),
        ({"user": "1", "expire_at": 1.5}, "expire_at"),
        ({"user": "1", "expire_at": True}, "expire_at"),
        ({"user": "1", "expire_at": int(NOW) - 1}, "in the past"),
    ],
)
def test_bad_connect_results(result: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadAnswer, match=problem):
        parse_connect(result, now=NOW)


def test_refresh_result() -> None:
    assert parse_refresh({"expire_at": int(NOW) + 60}, now=NOW) == RefreshGrant(int(NOW) + 60)
    assert parse_refresh({"expired": True}, now=NOW) == RefreshGrant(expired=True)
    for bad in ({}, {"expire_at": 0}, {"expired": "yes"}, {"expire_at": int(NOW) - 5}):
        with pytest.raises(BadAnswer):
            parse_refresh(bad, now=NOW)


def test_publish_result_keeps_or_replaces_the_data() -> None:
    assert parse_publish({}) is KEEP
    assert parse_publish({"data": {"text": "hi"}}) == {"text": "hi"}
    assert parse_publish({"data": None}) is None  # null is data too


def test_only_allowed_headers_are_kept_in_any_case() -> None:
    headers = tornado.httputil.HTTPHeaders()
    headers.add("cookie", "sid=1")
    headers.add("X-Other", "secret")
    headers.add("AUTHORIZATION", "Bearer t")
    assert filter_headers(headers, ["Cookie", "authorization", "X-Missing"]) == {
        "Cookie": "sid=1",
        "authorization": "Bearer t",
    }
    plain = {"COOKIE": "a=b", "Host": "h"}
    assert filter_headers(plain, ["Cookie"]) == {"Cookie": "a=b"}
    assert filter_headers(plain, []) == {}


def test_stats_count_outcomes_and_a_cumulative_histogram() -> None:
    stats = ProxyStats()
    stats.count("connect", "ok")
    stats.count("connect", "ok")
    stats.fail("connect", "timeout")
    stats.observe("connect", 0.003)
    stats.observe("connect", 0.2)
    stats.observe("connect", 30.0)
    assert stats.requests == {("connect", "ok"): 2}
    assert stats.failures == {("connect", "timeout"): 1}
    buckets = dict(stats.histogram("connect"))
    assert buckets["0.005"] == 1.0
    assert buckets["0.25"] == 2.0
    assert buckets["10.0"] == 2.0
    assert buckets["+Inf"] == 3.0
    assert stats.counts["connect"] == 3


def test_hooks_per_namespace_fall_back_to_the_proxy_table() -> None:
    settings = load_settings(
        raw={
            "proxy": {"subscribe_url": "http://app/sub", "publish_url": "https://app/pub"},
            "namespaces": {
                "chat": {"proxy_subscribe_url": "http://chat/sub"},
                "news": {},
            },
        },
        env={},
    )
    proxy = Proxy(settings)
    assert proxy.subscribe_urls == {
        "chat": "http://chat/sub",
        "news": "http://app/sub",
        "default": "http://app/sub",
    }
    assert set(proxy.publish_urls) == {"chat", "news", "default"}
    assert not Proxy.configured(load_settings(env={}))
    only_ns = load_settings(
        raw={"namespaces": {"chat": {"proxy_publish_url": "http://chat/pub"}}}, env={}
    )
    assert Proxy.configured(only_ns)
    assert Proxy(only_ns).publish_urls == {"chat": "http://chat/pub"}


@pytest.mark.parametrize(
    ("raw", "key", "problem"),
    [
        ({"proxy": {"connect_url": "ftp://app/c"}}, "proxy.connect_url", "http://"),
        ({"proxy": {"refresh_url": "app/refresh"}}, "proxy.refresh_url", "http://"),
        (
            {"namespaces": {"chat": {"proxy_publish_url": "http://"}}},
            "namespaces.chat.proxy_publish_url",
            "http://",
        ),
        ({"proxy": {"timeout": 0}}, "proxy.timeout", "greater than 0"),
        (
            {"proxy": {"timeout": 10, "connect_url": "http://app/c"}},
            "proxy.timeout",
            "connect_timeout",
        ),
        ({"proxy": {"forward_headers": ["Cookie", "cookie"]}}, "proxy.forward_headers", "twice"),
        ({"proxy": {"forward_headers": ["Bad Header"]}}, "proxy.forward_headers", "header name"),
        ({"proxy": {"forward_headers": "Cookie"}}, "proxy.forward_headers", "list of strings"),
        ({"proxy": {"connect_with_token": True}}, "proxy.connect_with_token", "connect_url"),
        ({"proxy": {"connect": "http://a"}}, "proxy.connect", "unknown setting"),
    ],
)
def test_bad_proxy_settings_name_the_key(raw: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(raw=raw, env={})
    assert caught.value.key == key


def test_proxy_settings_from_the_environment() -> None:
    settings = load_settings(
        env={
            "SQUALL_PROXY_CONNECT_URL": "https://app.example.com/squall/connect",
            "SQUALL_PROXY_FORWARD_HEADERS": "Cookie, X-Real-Ip",
            "SQUALL_PROXY_TIMEOUT": "1.5",
            "SQUALL_PROXY_CONNECT_WITH_TOKEN": "true",
        }
    )
    p = settings.proxy
    assert p.connect_url == "https://app.example.com/squall/connect"
    assert p.forward_headers == ["Cookie", "X-Real-Ip"]
    assert (p.timeout, p.connect_with_token) == (1.5, True)
