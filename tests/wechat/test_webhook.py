"""The WeChat webhook against a real gateway and nats-server: signatures, the three
encryption modes with WeChat's published sample vectors, message types, retries and
hostile XML."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway import AudioPart, EventPart, ImagePart, LinkPart, LocationPart, SignatureError, TextPart, UnknownPart, VideoPart
from gateway import check_timestamp
from gateway_plugins.wechat._crypto import MessageCrypto, signature
from gateway_plugins.wechat._xml import parse

from .conftest import ACCOUNT, AES_KEY, APPID, TOKEN, channel_config, encrypted_request, inbound, post, signed_query, text_message, xml

# WeChat's published sample for the official account message encryption (the sample code
# of 消息加解密, also used by wechatpy and most SDKs): these exact bytes decrypt to the
# documented text message.
SAMPLE = {
    "token": "spamtest",
    "encoding_aes_key": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "appid": "wx2c2769f8efd9abc2",
    "timestamp": "1409735669",
    "nonce": "1320562132",
    "signature": "16120ec1b8dbb870f510d87ce6bc2463eae6ca1a",
    "msg_signature": "5d197aaffba7e9b25a30732f161a50dee96bd5fa",
    "encrypt": "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8PGHQHFVAFmOD2Ld"
               "JF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h6tEDYsVticbSnyU8dKOIbgU"
               "6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/H"
               "TnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669W"
               "uMyVWQLCzpu9GhglF2PE=",
}
SAMPLE_BODY = ("<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName><FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSI"
               "WZf0rs]]></FromUserName><CreateTime>1409735668</CreateTime><MsgType><![CDATA[text]]></MsgType><Content>"
               "<![CDATA[abcdteT]]></Content><MsgId>6054768590064713728</MsgId><Encrypt><![CDATA[" + SAMPLE["encrypt"]
               + "]]></Encrypt></xml>")

# wechatpy's own test vector (tests/test_crypto.py, enterprise flavour of the same scheme).
WECHATPY = {
    "token": "123456",
    "encoding_aes_key": "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR",
    "appid": "wx49f0ab532d5d035a",
    "timestamp": "1411525903",
    "nonce": "461056294",
    "msg_signature": "74d92dfeb87ba7c714f89d98870ae5eb62dff26d",
    "encrypt": "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dG"
               "ymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBi"
               "T+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SN"
               "dshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91e"
               "BdCRxthuL0=",
}


# --- crypto with published vectors ---------------------------------------------------


def test_official_sample_signatures_match():
    s = SAMPLE
    assert signature(s["token"], s["timestamp"], s["nonce"]) == s["signature"]
    assert signature(s["token"], s["timestamp"], s["nonce"], s["encrypt"]) == s["msg_signature"]


def test_official_sample_vector_decrypts_to_the_documented_message():
    s = SAMPLE
    crypto = MessageCrypto(s["token"], s["encoding_aes_key"], s["appid"])
    fields = parse(crypto.decrypt(s["encrypt"], s["msg_signature"], s["timestamp"], s["nonce"]).encode())
    assert fields["Content"] == "abcdteT"
    assert fields["MsgId"] == "6054768590064713728"
    assert fields["FromUserName"] == "oyORnuP8q7ou2gfYjqLzSIWZf0rs"


def test_wechatpy_sample_vector_decrypts():
    w = WECHATPY
    crypto = MessageCrypto(w["token"], w["encoding_aes_key"], w["appid"])
    fields = parse(crypto.decrypt(w["encrypt"], w["msg_signature"], w["timestamp"], w["nonce"]).encode())
    assert fields["Content"] == "test" and fields["FromUserName"] == "messense"


def test_sample_vector_with_another_appid_or_signature_is_refused():
    s = SAMPLE
    with pytest.raises(SignatureError, match="another appid"):
        MessageCrypto(s["token"], s["encoding_aes_key"], "wx0000000000000000").decrypt(
            s["encrypt"], s["msg_signature"], s["timestamp"], s["nonce"])
    with pytest.raises(SignatureError, match="msg_signature"):
        MessageCrypto(s["token"], s["encoding_aes_key"], s["appid"]).decrypt(
            s["encrypt"], s["msg_signature"], s["timestamp"], "1320562133")


def test_stale_or_future_timestamp_is_refused():
    now = 1_700_000_000
    check_timestamp(str(now - 299), 300, now=now)
    for bad in (str(now - 301), str(now + 301), "", "12a", None):
        with pytest.raises(SignatureError):
            check_timestamp(bad, 300, now=now)


def test_encrypt_then_decrypt_round_trips():
    crypto = MessageCrypto(TOKEN, AES_KEY, APPID)
    body = xml(text_message("往返 round trip"))
    encrypt, msg_sig = crypto.encrypt(body, "1700000000", "42")
    assert crypto.decrypt(encrypt, msg_sig, "1700000000", "42") == body


# --- the webhook ----------------------------------------------------------------------


async def test_official_sample_posted_in_compatible_mode_is_published(gateway_factory, nats_server):
    s = SAMPLE
    # The sample is from 2014: this one test switches the replay window off.
    gw = await gateway_factory({"wx": channel_config(mode="compatible", encoding_aes_key=s["encoding_aes_key"],
                                                     timestamp_tolerance="0s")})
    r = await post(gw.http.port, SAMPLE_BODY, {"signature": s["signature"], "timestamp": s["timestamp"],
                                                "nonce": s["nonce"], "encrypt_type": "aes",
                                                "msg_signature": s["msg_signature"]})
    assert r.status_code == 200 and r.text == "success"
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="abcdteT")]
    assert msg.provider_id == "6054768590064713728" and msg.meta["msg_id"] == "6054768590064713728"
    assert msg.sender.id == "oyORnuP8q7ou2gfYjqLzSIWZf0rs" and msg.recipient.id == "gh_10f6c3c3ac5a"
    assert msg.meta["encrypted"] is True
    assert msg.sent_at.timestamp() == 1409735668


async def test_get_verification_echoes_echostr(gateway_factory):
    gw = await gateway_factory({"wx": channel_config()})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}") as c:
        ok = await c.get("/channels/wx/webhook", params={**signed_query(), "echostr": "5837397749145348"})
        bad = await c.get("/channels/wx/webhook", params={**signed_query(token="wrong"), "echostr": "x"})
        old = await c.get("/channels/wx/webhook",
                          params={**signed_query(timestamp=str(int(time.time()) - 3600)), "echostr": "x"})
    assert (ok.status_code, ok.text) == (200, "5837397749145348")
    assert bad.status_code == 403 and "x" not in bad.text.replace("\n", "")
    assert old.status_code == 403


async def test_plaintext_mode_checks_the_signature(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config()})
    body = xml(text_message("hi", msg_id="1001"))
    assert (await post(gw.http.port, body, signed_query(token="wrong"))).status_code == 403
    assert (await post(gw.http.port, body, {k: v for k, v in signed_query().items() if k != "signature"})).status_code == 403
    old = signed_query(timestamp=str(int(time.time()) - 600))
    assert (await post(gw.http.port, body, old)).status_code == 403
    r = await post(gw.http.port, body, signed_query())
    assert (r.status_code, r.text) == (200, "success")
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="hi")] and msg.meta["encrypted"] is False


async def test_safe_mode_round_trip_and_unencrypted_refused(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(mode="safe", encoding_aes_key=AES_KEY)})
    q, body = encrypted_request(xml(text_message("安全模式", msg_id="2001")), mode="safe")
    r = await post(gw.http.port, body, q)
    assert (r.status_code, r.text) == (200, "success")
    plain = await post(gw.http.port, xml(text_message("plain", msg_id="2002")), signed_query())
    assert plain.status_code == 403
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="安全模式")] and msg.meta["encrypted"] is True


async def test_safe_mode_refuses_bad_msg_signature_other_appid_and_garbage(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(mode="safe", encoding_aes_key=AES_KEY)})
    q, body = encrypted_request(xml(text_message(msg_id="2101")))
    assert (await post(gw.http.port, body, {**q, "msg_signature": "0" * 40})).status_code == 403
    q2, body2 = encrypted_request(xml(text_message(msg_id="2102")), appid="wx0000000000000000")
    r = await post(gw.http.port, body2, q2)
    assert r.status_code == 403 and "appid" in r.text
    q3 = signed_query()
    garbage = "AAAA" * 8
    q3.update(encrypt_type="aes", msg_signature=signature(TOKEN, q3["timestamp"], q3["nonce"], garbage))
    r = await post(gw.http.port, f"<xml><Encrypt><![CDATA[{garbage}]]></Encrypt></xml>", q3)
    assert r.status_code == 403
    assert await inbound(nats_server.url) == []


async def test_compatible_mode_accepts_encrypted_and_plaintext(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(mode="compatible", encoding_aes_key=AES_KEY)})
    q, body = encrypted_request(xml(text_message("both", msg_id="3001")), mode="compatible")
    assert (await post(gw.http.port, body, q)).status_code == 200
    assert (await post(gw.http.port, xml(text_message("plain", msg_id="3002")), signed_query())).status_code == 200
    msgs = await inbound(nats_server.url)
    assert [(m.parts[0].text, m.meta["encrypted"]) for m in msgs] == [("both", True), ("plain", False)]


NOW = int(time.time())
OPENID = "oUser"
CASES = [
    ({"MsgType": "image", "PicUrl": "http://mmbiz.example/pic.jpg", "MediaId": "MID_IMG", "MsgId": 5001},
     ImagePart(url="http://mmbiz.example/pic.jpg", media_id="MID_IMG")),
    ({"MsgType": "voice", "MediaId": "MID_V", "Format": "amr", "Recognition": "腾讯微信团队", "MsgId": 5002},
     AudioPart(media_id="MID_V", content_type="audio/amr", recognition="腾讯微信团队")),
    ({"MsgType": "voice", "MediaId": "MID_V2", "Format": "speex", "MsgId": 5003},
     AudioPart(media_id="MID_V2", content_type="audio/speex")),
    ({"MsgType": "video", "MediaId": "MID_VID", "ThumbMediaId": "MID_T", "MsgId": 5004},
     VideoPart(media_id="MID_VID", thumb_media_id="MID_T")),
    ({"MsgType": "shortvideo", "MediaId": "MID_SV", "ThumbMediaId": "MID_T2", "MsgId": 5005},
     VideoPart(media_id="MID_SV", thumb_media_id="MID_T2")),
    ({"MsgType": "location", "Location_X": "23.134521", "Location_Y": "113.358803", "Scale": "20",
      "Label": "广州市天河区", "MsgId": 5006},
     LocationPart(latitude=23.134521, longitude=113.358803, label="广州市天河区", scale=20.0)),
    ({"MsgType": "link", "Title": "公众平台官网链接", "Description": "描述", "Url": "https://mp.weixin.qq.com", "MsgId": 5007},
     LinkPart(url="https://mp.weixin.qq.com", title="公众平台官网链接", description="描述")),
    ({"MsgType": "event", "Event": "subscribe", "EventKey": "qrscene_123123", "Ticket": "TICKET"},
     EventPart(event="subscribe", key="qrscene_123123", data={"Ticket": "TICKET"})),
    ({"MsgType": "event", "Event": "unsubscribe"}, EventPart(event="unsubscribe")),
    ({"MsgType": "event", "Event": "SCAN", "EventKey": "SCENE_VALUE", "Ticket": "TICKET"},
     EventPart(event="scan", key="SCENE_VALUE", data={"Ticket": "TICKET"})),
    ({"MsgType": "event", "Event": "CLICK", "EventKey": "MENU_HELP"}, EventPart(event="click", key="MENU_HELP")),
    ({"MsgType": "event", "Event": "VIEW", "EventKey": "https://example.com/", "MenuId": "7"},
     EventPart(event="view", key="https://example.com/", data={"MenuId": "7"})),
    ({"MsgType": "event", "Event": "LOCATION", "Latitude": "23.137466", "Longitude": "113.352425", "Precision": "119.385040"},
     EventPart(event="location", data={"Latitude": "23.137466", "Longitude": "113.352425", "Precision": "119.385040"})),
    ({"MsgType": "miniprogrampage", "Title": "t", "AppId": "wxapp", "PagePath": "p", "MsgId": 5008},
     UnknownPart(raw={"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": str(NOW + 13), "MsgType": "miniprogrampage",
                      "Title": "t", "AppId": "wxapp", "PagePath": "p", "MsgId": "5008"})),
]


async def test_message_types_map_to_parts(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(download_media=False)})
    for i, (fields, _) in enumerate(CASES):
        body = xml({"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": NOW + i, **fields})
        r = await post(gw.http.port, body, signed_query())
        assert r.status_code == 200, (fields, r.text)
    msgs = await inbound(nats_server.url)
    assert [m.parts for m in msgs] == [[part] for _, part in CASES]
    assert msgs[0].provider_id == "5001"
    assert msgs[7].provider_id == f"event:{OPENID}:{NOW + 7}:subscribe"
    assert msgs[4].meta["msg_type"] == "shortvideo" and msgs[7].meta["event"] == "subscribe"
    assert len({m.conversation for m in msgs}) == 1


async def test_msgid_above_2_pow_53_stays_exact(gateway_factory, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config()})
    big = "9223372036854775807"
    await post(gw.http.port, xml(text_message(msg_id=big)), signed_query())
    raw = (await nc.jetstream().get_last_msg("GW_IN", "gw.in.wechat.wx")).data
    assert f'"provider_id":"{big}"'.encode() in raw and f'"msg_id":"{big}"'.encode() in raw


async def test_wechat_retry_within_5s_is_published_once(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config()})
    body = xml(text_message("retry me", msg_id="7001"))
    t0 = time.monotonic()
    first = await post(gw.http.port, body, signed_query())
    answered = time.monotonic() - t0
    # WeChat retries with a new timestamp and nonce, both sequentially and, when our
    # answer is slow, while the first attempt is still in flight.
    again = await post(gw.http.port, body, signed_query())
    concurrent = await asyncio.gather(*(post(gw.http.port, body, signed_query()) for _ in range(3)))
    assert all((r.status_code, r.text) == (200, "success") for r in [first, again, *concurrent])
    assert answered < 5
    msgs = await inbound(nats_server.url)
    assert [m.provider_id for m in msgs] == ["7001"]


async def test_concurrent_first_delivery_and_retries_are_published_once(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(mode="safe", encoding_aes_key=AES_KEY)})
    body = xml(text_message("concurrent", msg_id="7101"))
    reqs = [encrypted_request(body) for _ in range(3)]
    rs = await asyncio.gather(*(post(gw.http.port, b, q) for q, b in reqs))
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert [m.provider_id for m in await inbound(nats_server.url)] == ["7101"]


async def test_event_retries_are_published_once_by_sender_and_create_time(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config()})
    click = {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": NOW, "MsgType": "event", "Event": "CLICK",
             "EventKey": "K"}
    await asyncio.gather(*(post(gw.http.port, xml(click), signed_query()) for _ in range(3)))
    await post(gw.http.port, xml({**click, "CreateTime": NOW + 1}), signed_query())
    msgs = await inbound(nats_server.url)
    assert [m.provider_id for m in msgs] == [f"event:{OPENID}:{NOW}:click", f"event:{OPENID}:{NOW + 1}:click"]


# --- hostile input ----------------------------------------------------------------------

XXE = ('<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName><CreateTime>1</CreateTime>'
       '<MsgType>text</MsgType><Content>&xxe;</Content><MsgId>1</MsgId></xml>')
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
          + ']><xml><Content>&lol9;</Content></xml>')
PARAM_ENTITY = '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]><xml/>'


async def test_hostile_xml_is_refused_and_the_endpoint_keeps_serving(gateway_factory, nats_server):
    gw = await gateway_factory({"wx": channel_config(mode="compatible", encoding_aes_key=AES_KEY)})
    for body in (XXE, LAUGHS, PARAM_ENTITY, "<xml><unclosed>", "not xml at all", "<notxml/>"):
        r = await post(gw.http.port, body, signed_query())
        assert r.status_code == 400, (body[:40], r.status_code, r.text)
        assert "passwd" not in r.text and "lol" not in r.text
    huge = "<xml><Content>" + "A" * 70_000 + "</Content></xml>"
    assert (await post(gw.http.port, huge, signed_query())).status_code == 413
    # Safe-mode envelope with a DTD: refused before any decryption.
    q, _ = encrypted_request(xml(text_message(msg_id="8001")))
    assert (await post(gw.http.port, XXE, q)).status_code == 400
    ok = await post(gw.http.port, xml(text_message("still here", msg_id="8002")), signed_query())
    assert (ok.status_code, ok.text) == (200, "success")
    assert [m.parts[0].text for m in await inbound(nats_server.url)] == ["still here"]


async def test_body_above_the_gateway_limit_is_refused_with_413(gateway_factory):
    gw = await gateway_factory({"wx": channel_config()})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http.port}", timeout=10) as c:
        async def chunks():
            for _ in range(40):
                yield b"<" * 4096
        r = await c.post("/channels/wx/webhook", params=signed_query(), content=chunks())
    assert r.status_code == 413



async def test_location_report_does_not_reopen_the_48_hour_window(gateway_factory, nats_server):
    """WeChat does not count a LOCATION report as an interaction, so it must not move
    last_inbound_at; a menu CLICK does."""
    gw = await gateway_factory({"wx": channel_config()})
    conversation = gw.channels["wx"].ctx.conversation_key(OPENID)

    async def last_inbound():
        return (await gw.get_conversation(conversation)).last_inbound_at

    async def event(name: str, at: int) -> None:
        body = {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": at, "MsgType": "event", "Event": name}
        assert (await post(gw.http.port, xml(body), signed_query())).status_code == 200

    assert (await post(gw.http.port, xml(text_message("hi", msg_id="7001", openid=OPENID)), signed_query())).status_code == 200
    first = await last_inbound()
    await event("LOCATION", NOW + 10)
    assert await last_inbound() == first
    await event("CLICK", NOW + 20)
    assert await last_inbound() > first
    assert len(await inbound(nats_server.url)) == 3  # all published, only some count
