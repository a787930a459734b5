"""Replies through the WeChat API (a local server speaking its JSON on a real socket):
customer-service messages, the shared access_token, the 48-hour window with template
fallback, error classification and media."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

from gateway import AudioPart, DeliveryError, FilePart, ImagePart, LinkPart, Outbound, Participant, Template, TextPart
from gateway.testing import stream_messages
from gateway.wire import encode
from gateway_plugins.wechat._api import WeChatAPI

from .conftest import ACCOUNT, channel_config, inbound, post, signed_query, text_message, wait_until, wait_state, xml

OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"


async def send(nc, outbound: Outbound, channel: str = "wx") -> None:
    """Publish an outbound as a backend does."""
    await nc.jetstream().publish(f"gw.out.wechat.{channel}", encode(outbound), headers={"Nats-Msg-Id": outbound.id})


async def customer_writes(gw, text: str = "help", msg_id: str = "9001") -> str:
    r = await post(gw.http.port, xml(text_message(text, msg_id=msg_id, openid=OPENID)), signed_query())
    assert r.status_code == 200
    return gw.channels["wx"].ctx.conversation_key(OPENID)


async def customer_wrote_long_ago(gw, hours: float = 49) -> str:
    """A conversation whose last inbound is ``hours`` old (published through the channel's
    own context, with the received time WeChat's retry horizon would never produce)."""
    ctx = gw.channels["wx"].ctx
    msg = ctx.message(conversation=OPENID, sender=Participant(id=OPENID), parts=[TextPart(text="old")],
                      provider_id=f"old-{hours}", received_at=datetime.now(timezone.utc) - timedelta(hours=hours))
    await ctx.publish(msg, route={"openid": OPENID, "account": ACCOUNT})
    return ctx.conversation_key(OPENID)


async def test_reply_is_sent_through_the_customer_service_api(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-1", conversation=conv, parts=[TextPart(text="您好，我们在处理")]))
    sts = await wait_state(nats_server.url, "o-1", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]
    assert fake_wechat.custom == [{"touser": OPENID, "msgtype": "text", "text": {"content": "您好，我们在处理"}}]


async def test_sent_status_carries_the_msgid_wechat_returned_as_a_string(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-id", conversation=conv, parts=[TextPart(text="one"), TextPart(text="two")]))
    sts = await wait_state(nats_server.url, "o-id", "sent")
    # Two parts are two WeChat messages: the status names the last one. The id is above
    # 2**53 and stays exact because it is a string.
    assert sts[-1].provider_id == "6918340117829758979"


async def test_sent_status_has_no_provider_id_when_wechat_answers_without_msgid(gateway_factory, fake_wechat, nats_server, nc):
    fake_wechat.custom_msgid = False
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-noid", conversation=conv, parts=[TextPart(text="hi")]))
    sts = await wait_state(nats_server.url, "o-noid", "sent")
    assert sts[-1].provider_id is None


async def test_access_token_is_fetched_once_and_reused(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    for i in range(3):
        await send(nc, Outbound(id=f"o-{i}", conversation=conv, parts=[TextPart(text=str(i))]))
    await wait_state(nats_server.url, "o-2", "sent")
    assert len(fake_wechat.custom) == 3 and fake_wechat.tokens_issued == 1


async def test_expired_token_mid_run_is_refreshed_once_and_the_send_retried(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-a", conversation=conv, parts=[TextPart(text="a")]))
    await wait_state(nats_server.url, "o-a", "sent")
    fake_wechat.expire_tokens()  # the next call answers 42001 access_token expired
    await send(nc, Outbound(id="o-b", conversation=conv, parts=[TextPart(text="b")]))
    sts = await wait_state(nats_server.url, "o-b", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]  # no failed attempt: refreshed inside one delivery
    assert fake_wechat.tokens_issued == 2
    assert [m["text"]["content"] for m in fake_wechat.custom] == ["a", "b"]


async def test_token_refresh_is_single_flight_across_gateway_processes(gateway_factory, fake_wechat):
    # Two gateways on one bus stand for two processes: they share the channel's state.
    gws = [await gateway_factory({"wx": channel_config(fake_wechat)}, http={"port": 0}) for _ in range(2)]
    apis = [gw.channels["wx"].channel.api for gw in gws]
    fake_wechat.token_delay = 0.3
    tokens = await asyncio.gather(*(api.access_token() for api in apis for _ in range(5)))
    assert len(set(tokens)) == 1 and fake_wechat.tokens_issued == 1
    # WeChat refuses the token (40001) in both processes at once: one refresh between them.
    refreshed = await asyncio.gather(*(api.access_token(stale=tokens[0]) for api in apis for _ in range(3)))
    assert len(set(refreshed)) == 1 and refreshed[0] != tokens[0] and fake_wechat.tokens_issued == 2
    assert sum(api.token_fetches for api in apis) == 2


async def test_token_is_refreshed_early_before_it_expires(gateway_factory, fake_wechat):
    fake_wechat.expires_in = 3
    gw = await gateway_factory({"wx": channel_config(fake_wechat, token_refresh_margin="2s")})
    api = gw.channels["wx"].channel.api
    first = await api.access_token()
    assert await api.access_token() == first
    await asyncio.sleep(1.2)  # 1.8 s of validity left, below the 2 s margin
    second = await api.access_token()
    assert second != first and fake_wechat.tokens_issued == 2


async def test_outside_48h_falls_back_to_the_template_and_reports_its_result(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_wrote_long_ago(gw)
    tmpl = Template(id="TEMPLATE_ID", data={"first": "您的工单已处理", "keyword1": "#1234"}, url="https://example.com/t/1234")
    await send(nc, Outbound(id="o-t", conversation=conv, parts=[TextPart(text="free text")], template=tmpl))
    sts = await wait_state(nats_server.url, "o-t", "sent")
    assert fake_wechat.custom == []
    [payload] = fake_wechat.templates
    assert payload["touser"] == OPENID and payload["template_id"] == "TEMPLATE_ID"
    assert payload["data"] == {"first": {"value": "您的工单已处理"}, "keyword1": {"value": "#1234"}}
    assert payload["url"] == "https://example.com/t/1234" and payload["client_msg_id"] == "o-t"
    msgid = sts[-1].provider_id
    assert msgid == "200228333"
    # WeChat later pushes TEMPLATESENDJOBFINISH for that msgid.
    finish = {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "event",
              "Event": "TEMPLATESENDJOBFINISH", "MsgID": int(msgid), "Status": "success"}
    r = await post(gw.http.port, xml(finish), signed_query())
    assert (r.status_code, r.text) == (200, "success")
    sts = await wait_state(nats_server.url, "o-t", "delivered")
    assert sts[-1].provider_id == msgid
    # The job-finish event is not a customer message: nothing new on GW_IN.
    assert [m.provider_id for m in await inbound(nats_server.url)] == ["old-49"]


async def test_outside_48h_falls_back_to_a_subscription_notification(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_wrote_long_ago(gw)
    fake_wechat.consented.add(OPENID)
    sub = Template(id="SUB_ID", kind="subscription", data={"thing1": "回访：您对服务满意吗？"}, url="pages/survey")
    await send(nc, Outbound(id="o-sub", conversation=conv, parts=[TextPart(text="free text")], template=sub))
    await wait_state(nats_server.url, "o-sub", "sent")
    assert fake_wechat.custom == [] and fake_wechat.templates == []
    assert fake_wechat.subscriptions == [{"touser": OPENID, "template_id": "SUB_ID", "page": "pages/survey",
                                          "data": {"thing1": {"value": "回访：您对服务满意吗？"}}}]


async def test_subscription_notification_without_consent_fails_permanently(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_wrote_long_ago(gw)
    await send(nc, Outbound(id="o-nosub", conversation=conv, parts=[TextPart(text="x")],
                            template=Template(id="SUB_ID", kind="subscription")))
    sts = await wait_state(nats_server.url, "o-nosub", "dead")
    assert sts[-1].error.permanent and "customer refused to receive this message" in sts[-1].error.message


async def test_template_rejected_by_the_customer_is_reported_dead(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_wrote_long_ago(gw)
    await send(nc, Outbound(id="o-tb", conversation=conv, parts=[TextPart(text="x")], template=Template(id="T")))
    msgid = (await wait_state(nats_server.url, "o-tb", "sent"))[-1].provider_id
    finish = {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "event",
              "Event": "TEMPLATESENDJOBFINISH", "MsgID": int(msgid), "Status": "failed:user block"}
    await post(gw.http.port, xml(finish), signed_query())
    sts = await wait_state(nats_server.url, "o-tb", "dead")
    assert [s.state for s in sts] == ["accepted", "sent", "dead"] and "user block" in sts[-1].error.message
    assert (sts[-1].attempt, sts[-1].error.permanent, sts[-1].next_attempt_at) == (0, True, None)
    assert await stream_messages(nats_server.url, "GW_DEAD") == []


async def test_outside_48h_without_template_fails_permanently_with_a_clear_reason(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_wrote_long_ago(gw)
    await send(nc, Outbound(id="o-late", conversation=conv, parts=[TextPart(text="too late")]))
    sts = await wait_state(nats_server.url, "o-late", "dead")
    assert [s.state for s in sts] == ["accepted", "dead"]
    assert "customer has not written for more than 48 hours" in sts[-1].error.message
    assert sts[-1].error.permanent and sts[-1].error.code == "outside_window"
    assert fake_wechat.custom == [] and fake_wechat.templates == []


async def test_outside_a_window_shorter_than_an_hour_the_reason_names_minutes(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat, window="20m")})
    conv = await customer_wrote_long_ago(gw, hours=0.5)
    await send(nc, Outbound(id="o-20m", conversation=conv, parts=[TextPart(text="too late")]))
    sts = await wait_state(nats_server.url, "o-20m", "dead")
    assert "customer has not written for more than 20 minutes:" in sts[-1].error.message


async def test_45015_from_wechat_falls_back_to_the_template(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    fake_wechat.fail_next("custom", 45015, "response out of time limit or subscription is canceled")
    await send(nc, Outbound(id="o-45015", conversation=conv, parts=[TextPart(text="x")], template=Template(id="T1")))
    sts = await wait_state(nats_server.url, "o-45015", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"]
    assert [t["template_id"] for t in fake_wechat.templates] == ["T1"]


async def test_45047_without_template_fails_permanently(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    fake_wechat.fail_next("custom", 45047, "out of response count limit")
    await send(nc, Outbound(id="o-45047", conversation=conv, parts=[TextPart(text="x")]))
    sts = await wait_state(nats_server.url, "o-45047", "dead")
    assert sts[-1].error.code == "45047" and sts[-1].error.permanent
    assert "limit" in sts[-1].error.message


async def test_system_busy_and_rate_limit_are_retried(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw)
    fake_wechat.fail_next("custom", -1, "system error")
    await send(nc, Outbound(id="o-busy", conversation=conv, parts=[TextPart(text="x")]))
    sts = await wait_state(nats_server.url, "o-busy", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    assert sts[1].error.code == "-1" and not sts[1].error.permanent
    assert len(fake_wechat.custom) == 1


async def test_quota_error_is_transient_with_retry_after(fake_wechat):
    from gateway_plugins.wechat._api import api_error

    busy, quota, blocked = api_error(-1, "system error"), api_error(45009, "reach max api daily quota limit"), api_error(43004, "require subscribe")
    assert not busy.permanent and not quota.permanent and quota.retry_after == 3600
    assert blocked.permanent and "unsubscribed" in blocked.message


async def test_blocked_or_invalid_openid_fails_permanently(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    fake_wechat.fail_next("custom", 43004, "require subscribe")
    fake_wechat.fail_next("custom", 40003, "invalid openid")
    await send(nc, Outbound(id="o-43004", conversation=conv, parts=[TextPart(text="x")]))
    await send(nc, Outbound(id="o-40003", conversation=conv, parts=[TextPart(text="y")]))
    a = await wait_state(nats_server.url, "o-43004", "dead")
    b = await wait_state(nats_server.url, "o-40003", "dead")
    assert (a[-1].error.code, b[-1].error.code) == ("43004", "40003")
    assert [s.state for s in a] == ["accepted", "dead"] and fake_wechat.custom == []


async def test_network_errors_and_5xx_are_transient(fake_wechat, tmp_path):
    class State:
        def __init__(self):
            self.d = {}

        async def get(self, k):
            return self.d.get(k)

        async def get_revision(self, k):
            return (self.d[k], 1) if k in self.d else None

        async def create(self, k, v, ttl=None):
            self.d[k] = v
            return True

        async def update(self, k, v, r, ttl=None):
            self.d[k] = v
            return True

        async def put(self, k, v, ttl=None):
            self.d[k] = v

    import structlog

    api = WeChatAPI(base_url="http://127.0.0.1:9", appid="a", secret="s", state=State(), timeout=2,
                    refresh_margin=0, log=structlog.get_logger())
    try:
        await api.access_token()
    except DeliveryError as exc:
        assert not exc.permanent and exc.code == "unreachable"
    else:
        raise AssertionError("no error from a closed port")
    finally:
        await api.aclose()
    api = WeChatAPI(base_url=fake_wechat.url + "/nowhere", appid="a", secret="s", state=State(), timeout=2,
                    refresh_margin=0, log=structlog.get_logger())
    try:
        await api.access_token()
    except DeliveryError as exc:
        assert exc.code == "http_404" and exc.permanent
    finally:
        await api.aclose()


async def test_several_parts_resume_after_a_transient_failure(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)}, outbound={"backoff": ["50ms"]})
    conv = await customer_writes(gw)
    fake_wechat.fail_next("custom", 0)  # the first part goes through ...
    fake_wechat.fail_next("custom", -1, "system error")  # ... the second hits "system busy"
    await send(nc, Outbound(id="o-multi", conversation=conv, parts=[TextPart(text="one"), TextPart(text="two")]))
    sts = await wait_state(nats_server.url, "o-multi", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    assert [m["text"]["content"] for m in fake_wechat.custom] == ["one", "two"]


async def test_link_news_and_miniprogram_cards(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    mp = {"title": "订单", "appid": "wxapp123", "pagepath": "pages/order?id=1", "thumb_media_id": "THUMB"}
    article = {"title": "说明", "description": "d", "url": "https://example.com/a", "picurl": "https://example.com/p.jpg"}
    await send(nc, Outbound(id="o-cards", conversation=conv,
                            parts=[LinkPart(url="https://example.com/help", title="帮助", description="FAQ")],
                            meta={"wechat": {"news": article, "miniprogram": mp, "kf_account": "kf2001@account"}}))
    await wait_state(nats_server.url, "o-cards", "sent")
    kf = {"kf_account": "kf2001@account"}
    assert fake_wechat.custom == [
        {"msgtype": "news", "news": {"articles": [{"title": "帮助", "description": "FAQ", "url": "https://example.com/help"}]},
         "touser": OPENID, "customservice": kf},
        {"msgtype": "news", "news": {"articles": [article]}, "touser": OPENID, "customservice": kf},
        {"msgtype": "miniprogrampage", "miniprogrampage": mp, "touser": OPENID, "customservice": kf},
    ]


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


async def test_images_are_uploaded_once_per_content_and_sent_by_media_id(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    big = PNG + b"\x01" * 40_000  # above the inline limit: travels as an ObjectRef
    ref = await gw.channels["wx"].ctx.put_blob(big, content_type="image/png")
    await send(nc, Outbound(id="o-img1", conversation=conv, parts=[ImagePart(data=PNG, content_type="image/png")]))
    await send(nc, Outbound(id="o-img2", conversation=conv, parts=[ImagePart(data=PNG, content_type="image/png")]))
    await send(nc, Outbound(id="o-img3", conversation=conv, parts=[FilePart(ref=ref, content_type="image/png", filename="a.png")]))
    await send(nc, Outbound(id="o-voice", conversation=conv, parts=[AudioPart(data=b"#!AMR\n", content_type="audio/amr")]))
    await wait_state(nats_server.url, "o-voice", "sent")
    assert [(u["type"], u["size"]) for u in fake_wechat.uploads] == [("image", len(PNG)), ("image", len(big)), ("voice", 6)]
    ids = [u["media_id"] for u in fake_wechat.uploads]
    assert [(m["msgtype"], m[m["msgtype"]]["media_id"]) for m in fake_wechat.custom] == [
        ("image", ids[0]), ("image", ids[0]), ("image", ids[1]), ("voice", ids[2])]


async def test_files_wechat_cannot_carry_fail_permanently(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-pdf", conversation=conv, parts=[FilePart(data=b"%PDF", content_type="application/pdf")]))
    sts = await wait_state(nats_server.url, "o-pdf", "dead")
    assert "application/pdf" in sts[-1].error.message and fake_wechat.uploads == []


async def test_inbound_media_is_copied_in_the_background_without_delaying_the_answer(gateway_factory, fake_wechat, nats_server):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    channel = gw.channels["wx"].channel
    media_id = fake_wechat.add_media(PNG, "image/png")
    fake_wechat.download_delay = 3.0  # slower than WeChat's patience would allow inline
    body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "image",
                "PicUrl": "http://mmbiz.example/x.jpg", "MediaId": media_id, "MsgId": 6001})
    t0 = time.monotonic()
    r = await post(gw.http.port, body, signed_query())
    assert (r.status_code, r.text) == (200, "success") and time.monotonic() - t0 < 1.0
    [first] = await inbound(nats_server.url)
    assert first.parts == [ImagePart(url="http://mmbiz.example/x.jpg", media_id=media_id)]
    assert await channel.stored_media(media_id) is None
    # A retry while the copy runs is published once and copied once.
    await post(gw.http.port, body, signed_query())
    await wait_until(lambda: channel.stored_media(media_id), timeout=10)
    stored = await channel.stored_media(media_id)
    assert stored.message_id == first.id and stored.content_type == "image/png"
    assert await channel.ctx.get_blob(stored.ref) == PNG
    await wait_until(lambda: _count(nats_server.url, 2), timeout=5)
    follow_up = (await inbound(nats_server.url))[1]
    [event] = follow_up.parts
    assert event.event == "media_stored" and event.key == media_id
    assert event.data["message_id"] == first.id and event.data["sha256"] == stored.ref.sha256
    assert follow_up.auto and follow_up.in_reply_to == "6001" and follow_up.conversation == first.conversation
    assert fake_wechat.downloads == 1


async def test_inbound_video_is_followed_to_its_video_url(gateway_factory, fake_wechat, nats_server):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    channel = gw.channels["wx"].channel
    media_id = fake_wechat.add_media(b"\x00\x00\x00\x18ftypmp42", "video/mp4")
    body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "video",
                "MediaId": media_id, "ThumbMediaId": "T", "MsgId": 6101})
    assert (await post(gw.http.port, body, signed_query())).status_code == 200
    await wait_until(lambda: channel.stored_media(media_id), timeout=10)
    stored = await channel.stored_media(media_id)
    assert await channel.ctx.get_blob(stored.ref) == b"\x00\x00\x00\x18ftypmp42" and stored.content_type == "video/mp4"


async def _count(url: str, n: int) -> bool:
    return len(await inbound(url)) >= n


async def test_inbound_media_above_the_size_limit_is_not_copied(gateway_factory, fake_wechat, nats_server):
    gw = await gateway_factory({"wx": channel_config(fake_wechat, max_media_size=1000)})
    channel = gw.channels["wx"].channel
    small, large = fake_wechat.add_media(PNG, "image/png"), fake_wechat.add_media(PNG * 20, "image/png")
    for i, media_id in enumerate((large, small)):
        body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "image",
                    "PicUrl": "http://mmbiz.example/x.jpg", "MediaId": media_id, "MsgId": 6200 + i})
        assert (await post(gw.http.port, body, signed_query())).status_code == 200
    await wait_until(lambda: channel.stored_media(small), timeout=10)
    await channel.wait_background()
    assert await channel.stored_media(large) is None


async def test_media_download_refreshes_an_expired_token(gateway_factory, fake_wechat, nats_server):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    channel = gw.channels["wx"].channel
    await channel.api.access_token()
    fake_wechat.expire_tokens()
    media_id = fake_wechat.add_media(PNG, "image/png")
    body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "image",
                "PicUrl": "http://mmbiz.example/x.jpg", "MediaId": media_id, "MsgId": 6301})
    assert (await post(gw.http.port, body, signed_query())).status_code == 200
    await wait_until(lambda: channel.stored_media(media_id), timeout=10)
    assert fake_wechat.tokens_issued == 2


async def test_reach_follows_the_48_hour_window_and_offers_templates(gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    running = gw.channels["wx"]
    conv_key = await customer_wrote_long_ago(gw, hours=47)
    conv = await running.ctx.get_conversation(conv_key)
    now = datetime.now(timezone.utc)
    soon = await running.channel.reach(conv, now)
    assert soon.ok and soon.template
    assert timedelta(minutes=59) < soon.until - now <= timedelta(hours=1)
    later = await running.channel.reach(conv, now + timedelta(hours=2))
    assert not later.ok and later.code == "outside_window" and later.template and later.until == soon.until


async def test_sent_status_meta_carries_what_the_receipt_said(gateway_factory, fake_wechat, nats_server, nc):
    # The core copies Receipt.meta into the sent status (DeliveryStatus.meta).
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-meta", conversation=conv, parts=[TextPart(text="one"), TextPart(text="two")]))
    sts = await wait_state(nats_server.url, "o-meta", "sent")
    assert sts[-1].meta == {"via": "custom", "messages": 2}
    assert sts[0].state == "accepted" and sts[0].meta == {}
