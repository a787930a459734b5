"""Callbacks that pass the signature check but carry values WeChat would never send (or a
broken client might): answered without a 5xx, and what is published decodes with the
gateway's own decoder (issue 9.8)."""

from __future__ import annotations

import time

import pytest

from gateway import LocationPart, UnknownPart

from .conftest import ACCOUNT, channel_config, inbound, post, signed_query, text_message, xml

OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"


@pytest.mark.parametrize("create_time", ["12345678901234567890", "9999999999999", "1700000000000", "0"])
async def test_implausible_create_time_is_accepted_without_a_sent_time(gateway_factory, nats_server, create_time):
    gw = await gateway_factory({"wx": channel_config()})
    body = xml({**text_message("hello", msg_id="8001"), "CreateTime": create_time})
    r = await post(gw.http.port, body, signed_query())
    assert (r.status_code, r.text) == (200, "success")
    [m] = await inbound(nats_server.url)
    assert m.sent_at is None and m.meta["create_time_invalid"] is True
    assert m.parts[0].text == "hello"


async def test_plausible_create_time_is_the_sent_time(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config()})
    now = int(time.time())
    assert (await post(gw.http.port, xml({**text_message("hi", msg_id="8002"), "CreateTime": now}),
                       signed_query())).status_code == 200
    [m] = await inbound(nats_server.url)
    assert int(m.sent_at.timestamp()) == now and "create_time_invalid" not in m.meta


@pytest.mark.parametrize("x, y", [("nan", "113.3"), ("23.1", "inf"), ("-inf", "1"), ("NaN", "NaN"), ("91", "10"),
                                  ("10", "180.5"), ("1e400", "2")])
async def test_location_that_is_not_a_position_is_published_as_unknown_and_decodes(gateway_factory, nats_server, x, y):
    gw = await gateway_factory({"wx": channel_config()})
    body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "location",
                "Location_X": x, "Location_Y": y, "Scale": "15", "Label": "somewhere", "MsgId": 8003})
    r = await post(gw.http.port, body, signed_query())
    assert (r.status_code, r.text) == (200, "success")
    [m] = await inbound(nats_server.url)  # decoded by the gateway's own decoder
    [part] = m.parts
    assert isinstance(part, UnknownPart) and part.raw["Location_X"] == x
    assert m.meta["location_invalid"] is True


async def test_a_real_location_is_still_a_location(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config()})
    body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "location",
                "Location_X": "-23.134521", "Location_Y": "113.358803", "Scale": "20", "Label": "Guangzhou",
                "MsgId": 8004})
    assert (await post(gw.http.port, body, signed_query())).status_code == 200
    [m] = await inbound(nats_server.url)
    assert m.parts == [LocationPart(latitude=-23.134521, longitude=113.358803, scale=20.0, label="Guangzhou")]
