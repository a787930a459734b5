"""OneBot v11 over forward WebSocket (the gateway connects to the implementation's server
and reconnects) and over HTTP (events POSTed with ``X-Signature``, replies through the
implementation's HTTP API). The event handling is the reverse socket's (test_onebot.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import TextPart
from gateway.testing import wait_for_status, wait_until

from .conftest import (
    SELF_ID,
    FakeOneBotHTTP,
    FakeOneBotServer,
    group_message,
    inbound,
    metric,
    onebot_config,
    private_message,
    published,
)
from .test_onebot import _reply

# --- forward WebSocket -----------------------------------------------------------------


async def test_forward_socket_identifies_the_account_and_publishes_its_events(
        gateway_factory: Any, nats_server: Any, onebot_server: FakeOneBotServer) -> None:
    gw = await gateway_factory({"qq": onebot_config(transport="forward_ws", url=onebot_server.url)})
    await wait_until(onebot_server.connected.is_set)
    await onebot_server.send(group_message("你好", message_id=11))
    [msg] = await published(nats_server.url, 1)
    assert msg.provider_id == f"{SELF_ID}:11" and msg.recipient is not None and msg.recipient.id == SELF_ID
    assert onebot_server.calls[0]["action"] == "get_login_info"
    await wait_until(lambda: gw.health()["channels"]["qq"]["state"] == "running")


async def test_forward_socket_reconnects_and_replays_are_published_once(
        gateway_factory: Any, nats_server: Any, onebot_server: FakeOneBotServer) -> None:
    gw = await gateway_factory({"qq": onebot_config(transport="forward_ws", url=onebot_server.url)})
    await wait_until(onebot_server.connected.is_set)
    await onebot_server.send(private_message("一", message_id=1))
    await published(nats_server.url, 1)
    await onebot_server.drop()
    await wait_until(lambda: onebot_server.accepted == 2, timeout=10)
    await wait_until(onebot_server.connected.is_set)
    await onebot_server.send(private_message("一", message_id=1))  # replayed
    await onebot_server.send(private_message("二", message_id=2))
    msgs = await published(nats_server.url, 2)
    assert [m.provider_id for m in msgs] == [f"{SELF_ID}:1", f"{SELF_ID}:2"]
    await _reply(nats_server.url, "fwd-reply", msgs[-1].conversation)
    await wait_for_status(nats_server.url, "fwd-reply", "sent")
    assert onebot_server.sends()[0]["params"]["user_id"] == 10002


async def test_forward_socket_refused_token_leaves_the_channel_degraded(gateway_factory: Any,
                                                                       onebot_server: FakeOneBotServer) -> None:
    gw = await gateway_factory({"qq": onebot_config(transport="forward_ws", url=onebot_server.url,
                                                    access_token="wrong")})
    await wait_until(lambda: "401" in (gw.health()["channels"]["qq"].get("detail") or ""))
    assert gw.health()["channels"]["qq"]["state"] == "degraded" and onebot_server.accepted == 0
    assert "wrong" not in str(gw.health())


# --- HTTP POST + HTTP API --------------------------------------------------------------


def _http_config(fake: FakeOneBotHTTP, **extra: Any) -> dict[str, Any]:
    return onebot_config(transport="http", url=fake.url, secret=fake.secret, **extra)


async def test_signed_post_is_published_and_answered_204(gateway_factory: Any, nats_server: Any,
                                                         onebot_http: FakeOneBotHTTP) -> None:
    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    r = await onebot_http.post_event(gw.http.port, group_message("[CQ:face,id=1]在吗", message_id=21))
    assert r.status_code == 204
    [msg] = await inbound(nats_server.url)
    assert msg.provider_id == f"{SELF_ID}:21"
    r = await onebot_http.post_event(gw.http.port, group_message("[CQ:face,id=1]在吗", message_id=21))
    assert r.status_code == 204 and len(await inbound(nats_server.url)) == 1


async def test_post_without_a_valid_signature_is_refused(gateway_factory: Any, nats_server: Any,
                                                         onebot_http: FakeOneBotHTTP) -> None:
    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    for signed in (False, True):  # unsigned, and signed with another secret
        r = await onebot_http.post_event(gw.http.port, private_message("伪造"), signed=signed, secret="not-the-secret")
        assert r.status_code == 403
    assert await inbound(nats_server.url) == []


async def test_signed_post_nested_deeper_than_a_parser_recurses_is_a_400(gateway_factory: Any,
                                                                         onebot_http: FakeOneBotHTTP) -> None:
    import hashlib
    import hmac

    import httpx

    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    body = b"[" * 100_000 + b"]" * 100_000
    mac = hmac.new(onebot_http.secret.encode(), body, hashlib.sha1).hexdigest()
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"http://127.0.0.1:{gw.http.port}/channels/qq/onebot", content=body,
                         headers={"X-Self-ID": SELF_ID, "X-Signature": f"sha1={mac}"})
    assert r.status_code == 400


async def test_post_while_the_bus_is_down_is_503_then_published_once(gateway_factory: Any, nats_server: Any,
                                                                     onebot_http: FakeOneBotHTTP) -> None:
    gw = await gateway_factory({"qq": _http_config(onebot_http)}, bus={"publish_timeout": "1s"})
    await nats_server.stop()
    r = await onebot_http.post_event(gw.http.port, private_message("x", message_id=31))
    assert r.status_code == 503
    await nats_server.start()

    async def accepted() -> bool:
        return (await onebot_http.post_event(gw.http.port, private_message("x", message_id=31))).status_code == 204

    await wait_until(accepted, timeout=20, interval=0.2)
    assert len(await inbound(nats_server.url)) == 1


async def test_reply_goes_through_the_http_api_quoting_the_message(gateway_factory: Any, nats_server: Any,
                                                                   onebot_http: FakeOneBotHTTP) -> None:
    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    await onebot_http.post_event(gw.http.port, group_message("问题", message_id=51))
    [msg] = await inbound(nats_server.url)
    await _reply(nats_server.url, "http-reply", msg.conversation, in_reply_to=msg.id)
    sts = await wait_for_status(nats_server.url, "http-reply", "sent")
    assert onebot_http.calls == [{"action": "send_group_msg", "params": {
        "group_id": 123456789, "message": [{"type": "reply", "data": {"id": "51"}},
                                           {"type": "text", "data": {"text": "您好，已处理"}}]}}]
    assert sts[-1].provider_id == f"{SELF_ID}:7000"


async def test_http_api_404_is_permanent_and_500_transient(gateway_factory: Any, nats_server: Any,
                                                           onebot_http: FakeOneBotHTTP) -> None:
    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    await onebot_http.post_event(gw.http.port, private_message("问题", message_id=61))
    [msg] = await inbound(nats_server.url)
    onebot_http.fail_next(404)
    await _reply(nats_server.url, "http-404", msg.conversation)
    sts = await wait_for_status(nats_server.url, "http-404", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "unknown_action"
    onebot_http.fail_next(500)
    await _reply(nats_server.url, "http-500", msg.conversation, parts=[TextPart(text="再试")])
    sts = await wait_for_status(nats_server.url, "http-500", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    onebot_http.fail_next(200, {"status": "failed", "retcode": 1400, "data": None})
    await _reply(nats_server.url, "http-1400", msg.conversation)
    sts = await wait_for_status(nats_server.url, "http-1400", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "bad_request"


@pytest.mark.parametrize("section,missing", [({"transport": "http", "url": "http://x"}, "secret"),
                                             ({"transport": "forward_ws"}, "url")])
def test_transport_without_what_it_needs_is_a_config_error(section: dict[str, Any], missing: str) -> None:
    from gateway import ConfigError
    from gateway.testing import make_config

    with pytest.raises(ConfigError) as info:
        make_config("nats://127.0.0.1:4222", {"qq": {"type": "qq", "onebot": section}})
    assert missing in str(info.value)


async def test_forward_socket_of_an_account_not_allowed_is_dropped_and_retried(
        gateway_factory: Any, nats_server: Any, onebot_server: FakeOneBotServer) -> None:
    gw = await gateway_factory({"qq": onebot_config(transport="forward_ws", url=onebot_server.url,
                                                    self_ids=["1"])})
    onebot_server.on_connect.append(private_message("不该发布", message_id=3))
    await wait_until(lambda: onebot_server.accepted >= 2, timeout=10)  # closed, then connected again

    async def dropped() -> bool:
        return await metric(gw.http.port, "gateway_channel_events_total", event="onebot_unidentified") >= 1

    await wait_until(dropped)
    assert await inbound(nats_server.url) == []
    assert "no OneBot implementation connected" in gw.health()["channels"]["qq"]["detail"]


async def test_a_malformed_message_post_is_a_400_not_an_acknowledgement(gateway_factory: Any, nats_server: Any,
                                                                        onebot_http: FakeOneBotHTTP) -> None:
    # 204 tells the implementation the event is on the bus: not for one that was dropped.
    gw = await gateway_factory({"qq": _http_config(onebot_http)})
    r = await onebot_http.post_event(gw.http.port, {"post_type": "message", "message_type": "group", "message": "x"})
    assert r.status_code == 400 and "ids" in r.text
    r = await onebot_http.post_event(gw.http.port, group_message(42, message_id=81))
    assert r.status_code == 400
    assert await inbound(nats_server.url) == []
