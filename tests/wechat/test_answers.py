"""What the WeChat webhook answers and logs about requests it refuses: the reason names the
field or the limit, never a value the sender wrote; the channel's own body limit is the one
the HTTP layer applies and names."""

from __future__ import annotations

import time

import httpx
from structlog.testing import capture_logs

from .conftest import ACCOUNT, channel_config, post, signed_query, text_message, xml

MARKER = "Zq7MARKERx9"


async def test_refusals_never_repeat_field_values_in_answers_or_logs(gateway_factory):
    gw = await gateway_factory({"wx": channel_config()})
    bodies = [
        f'<?xml version="1.0" encoding="{MARKER}"?><xml><Content>x</Content></xml>',
        # A digit int() refuses: its error quotes the value.
        xml(text_message(msg_id="9001", CreateTime="\u00b2" + "\u00b3" * 3)),
        # The template result of a template this gateway never sent: logged, without its status.
        xml({"ToUserName": ACCOUNT, "FromUserName": "oyORnu", "CreateTime": int(time.time()), "MsgType": "event",
             "Event": "TEMPLATESENDJOBFINISH", "MsgID": 4242, "Status": MARKER}),
    ]
    with capture_logs() as logs:
        answers = [await post(gw.http.port, body, signed_query()) for body in bodies]
    assert [a.status_code for a in answers] == [400, 400, 200], [a.text for a in answers]
    for a in answers:
        assert MARKER not in a.text and "\u00b3" not in a.text, a.text
    assert MARKER not in repr(logs) and "\u00b3" not in repr(logs), logs
    assert answers[0].text == "malformed XML: unsupported encoding declaration\n"
    assert answers[1].text == "not a WeChat message: a field has an unusable value\n"


async def test_a_body_over_the_channel_limit_is_refused_by_content_length_naming_that_limit(gateway_factory):
    gw = await gateway_factory({"wx": channel_config(max_body=4096)})
    with capture_logs() as logs:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=30) as c:
            # Over the server's 1 MiB as well: the channel's lower limit is still the one named.
            for size in (5000, 1_100_000):
                r = await c.post("/channels/wx/webhook", params=signed_query(), content=b"<" * size)
                assert r.status_code == 413
                assert r.text == "body exceeds 4096 bytes (the limit of channel 'wx')\n"
    sample = gw.metrics.registry.get_sample_value(
        "gateway_inbound_rejected_total", {"channel_type": "wechat", "channel": "wx", "reason": "413"})
    assert sample == 2
    assert len([e for e in logs if e["event"] == "request rejected" and e["status"] == 413]) == 2
