"""The official QQ bot platform by webhook: Ed25519-signed callbacks (the platform
documentation's own examples and a real key), op 13 validation, dispatches, passive
replies with msg_id/msg_seq inside the reply windows, against a local fake OpenAPI."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway import AudioPart, EventPart, FilePart, ImagePart, Outbound, TextPart, VideoPart
from gateway.testing import wait_for_status, wait_until
from gateway.wire import encode
from gateway_plugins.qq._official import classify, public_key, validation_answer

from .conftest import (
    APP_ID,
    SECRET,
    FakeQQBot,
    bot_key,
    c2c,
    callback,
    group_at,
    inbound,
    official_config,
    published,
    signed_headers,
)

# --- the platform documentation's examples ------------------------------------------------


def test_key_from_secret_matches_the_documentations_demo() -> None:
    # sign.md: secret naOC0ocQE3shWLAfffVLB1rhYPG7, seed naOC0ocQE3shWLAfffVLB1rhYPG7naOC.
    assert list(public_key("naOC0ocQE3shWLAfffVLB1rhYPG7")) == [
        215, 195, 98, 254, 120, 174, 248, 31, 242, 50, 135, 180, 147, 98, 139, 93, 176, 42, 60, 79, 227, 11, 33, 94,
        77, 25, 96, 155, 93, 118, 103, 58]


# sign.md's DEMO shows the body on one line, but the bytes it signed are the JSON indented
# by two spaces (found by signing variants: Ed25519 is deterministic).
_DEMO_BODY = b'{\n  "op": 0,\n  "d": {},\n  "t": "GATEWAY_EVENT_NAME"\n}'
_DEMO_SIG = ("865ad13a61752ca65e26bde6676459cd36cf1be609375b37bd62af366e1dc25a"
             "8dc789ba7f14e017ada3d554c671a911bfdf075ba54835b23391d509579ed002")


def test_documentations_demo_signature_verifies() -> None:
    body = _DEMO_BODY
    sig = ("865ad13a61752ca65e26bde6676459cd36cf1be609375b37bd62af366e1dc25a"
           "8dc789ba7f14e017ada3d554c671a911bfdf075ba54835b23391d509579ed002")
    Ed25519PublicKey.from_public_bytes(public_key("naOC0ocQE3shWLAfffVLB1rhYPG7")).verify(
        bytes.fromhex(sig), b"1725442341" + body)


def test_validation_answer_matches_the_documentations_example() -> None:
    # event-emit.md: secret DG5g3B4j9X2KOErG, event_ts 1725442341, plain_token Arq0D5A61EgUu4OxUvOp.
    assert validation_answer("DG5g3B4j9X2KOErG", "1725442341", "Arq0D5A61EgUu4OxUvOp") == {
        "plain_token": "Arq0D5A61EgUu4OxUvOp",
        "signature": "87befc99c42c651b3aac0278e71ada338433ae26fcb24307bdc5ad38c1adc2d0"
                     "1bcfcadc0842edac85e85205028a1132afe09280305f13aa6909ffc2d652c706"}


async def test_documentations_demo_dispatch_is_accepted_on_the_wire(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config(timestamp_tolerance="0s")})
    r = await callback(gw.http.port, _DEMO_BODY, {"X-Signature-Ed25519": _DEMO_SIG,
                                                 "X-Signature-Timestamp": "1725442341"})
    assert r.status_code == 200 and r.json()["op"] == 12
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [EventPart(event="gateway_event_name")]


async def test_documentations_validation_request_is_answered_when_signed(gateway_factory: Any) -> None:
    cfg = official_config(secret="DG5g3B4j9X2KOErG", app_id="11111111", timestamp_tolerance="0s")
    gw = await gateway_factory({"qq": cfg})
    body = b'{"d":{"plain_token":"Arq0D5A61EgUu4OxUvOp","event_ts":"1725442341"},"op":13}'
    r = await callback(gw.http.port, body, signed_headers(body, "DG5g3B4j9X2KOErG", "1725442341"))
    assert r.status_code == 200
    assert r.json()["signature"] == ("87befc99c42c651b3aac0278e71ada338433ae26fcb24307bdc5ad38c1adc2d0"
                                     "1bcfcadc0842edac85e85205028a1132afe09280305f13aa6909ffc2d652c706")


# --- signatures on the wire ------------------------------------------------------------


async def test_unsigned_validation_request_gets_no_signature(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    body = json.dumps({"op": 13, "d": {"plain_token": "forge-me", "event_ts": str(int(time.time()))}}).encode()
    r = await callback(gw.http.port, body, {"Content-Type": "application/json", "X-Bot-Appid": APP_ID})
    assert r.status_code == 403 and "signature" not in r.text.lower().replace("missing signature", "")
    other = bot_key("another-secret-entirely-000000000")
    ts = str(int(time.time()))
    r = await callback(gw.http.port, body, {"X-Signature-Ed25519": other.sign(ts.encode() + body).hex(),
                                            "X-Signature-Timestamp": ts})
    assert r.status_code == 403


async def test_signed_validation_is_answered_with_a_signature_by_the_bot_key(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    ts = str(int(time.time()))
    body = json.dumps({"op": 13, "d": {"plain_token": "tok123", "event_ts": ts}}).encode()
    r = await callback(gw.http.port, body)
    assert r.status_code == 200 and r.json()["plain_token"] == "tok123"
    bot_key().public_key().verify(bytes.fromhex(r.json()["signature"]), (ts + "tok123").encode())


async def test_tampered_or_stale_callback_is_refused(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    for tamper in ("body", "timestamp", "stale", "garbage"):
        body = group_at()
        headers = signed_headers(body, timestamp=str(int(time.time()) - 3600) if tamper == "stale" else None)
        if tamper == "body":
            body = body.replace("你".encode(), "我".encode())
        elif tamper == "timestamp":
            headers["X-Signature-Timestamp"] = str(int(headers["X-Signature-Timestamp"]) + 1)
        elif tamper == "garbage":
            headers["X-Signature-Ed25519"] = "zz" * 64
        r = await callback(gw.http.port, body, headers)
        assert r.status_code == 403, tamper
    assert await inbound(nats_server.url) == []


async def test_signed_garbage_body_is_a_400_naming_no_value(gateway_factory: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    body = b'{"op": "secret-value"}'
    r = await callback(gw.http.port, body)
    assert r.status_code == 400 and "secret-value" not in r.text
    deep = b'{"op": 0, "t": "X", "id": "E", "d": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    r = await callback(gw.http.port, deep)
    assert r.status_code == 400


# --- dispatches ------------------------------------------------------------------------


async def test_group_at_message_is_published_and_acked_with_op_12(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    r = await callback(gw.http.port, group_at(content=" 我要退款", timestamp="2023-11-06T13:37:18+08:00"))
    assert r.status_code == 200 and r.json() == {"op": 12, "d": 0}
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="我要退款")]
    assert msg.sender.id == "E4F4AEA33253A2797FB897C50B81D7ED"
    assert msg.provider_id == "ROBOT1.0_group_1" and msg.meta["group_openid"] == "C9F778FE6ADF9D1D1DBE395BF744A33A"
    assert msg.sent_at == datetime(2023, 11, 6, 5, 37, 18, tzinfo=timezone.utc)


async def test_only_the_one_placeholder_space_of_the_removed_mention_is_stripped(
        gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    contents = {"m-indent": " \u3000  缩进的表格\n  第二行", "m-tab": " \tcode", "m-none": "no space", "m-only": " "}
    for msg_id, content in contents.items():
        assert (await callback(gw.http.port, group_at(msg_id=msg_id, content=content))).status_code == 200
    got = {m.provider_id: m.parts for m in await inbound(nats_server.url)}
    assert got == {"m-indent": [TextPart(text="\u3000  缩进的表格\n  第二行")], "m-tab": [TextPart(text="\tcode")],
                   "m-none": [TextPart(text="no space")], "m-only": []}


async def test_same_message_in_a_new_envelope_is_published_once(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    for _ in range(3):  # each push has a new envelope id and signature, the same message id
        assert (await callback(gw.http.port, group_at(msg_id="ROBOT1.0_same"))).status_code == 200
    assert len(await inbound(nats_server.url)) == 1


async def test_c2c_message_with_attachments_becomes_media_parts(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    attachments = [
        {"content_type": "image/jpeg", "filename": "a.jpg", "size": 1234, "url": "multimedia.nt.qq.com.cn/a"},
        {"content_type": "voice", "filename": "v.amr", "url": "https://x/v"},
        {"content_type": "file", "filename": "发票.pdf", "url": "https://x/f"}]
    await callback(gw.http.port, c2c(content="看图", attachments=attachments))
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="看图"),
                         ImagePart(content_type="image/jpeg", filename="a.jpg", size=1234,
                                   url="https://multimedia.nt.qq.com.cn/a"),
                         AudioPart(filename="v.amr", url="https://x/v"),
                         FilePart(filename="发票.pdf", url="https://x/f")]


async def test_unknown_event_is_kept_as_an_event(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    body = json.dumps({"op": 0, "id": "GROUP_ADD_ROBOT:abc", "t": "GROUP_ADD_ROBOT",
                       "d": {"group_openid": "G1", "op_member_openid": "M1", "timestamp": 1700000000}}).encode()
    assert (await callback(gw.http.port, body)).status_code == 200
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [EventPart(event="group_add_robot", data={"group_openid": "G1", "op_member_openid": "M1",
                                                                  "timestamp": "1700000000"})]
    assert msg.auto


async def test_an_event_without_envelope_id_is_deduplicated_by_an_id_that_repeats_none_of_it(
        gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    body = json.dumps({"op": 0, "t": "FRIEND_ADD", "d": {"openid": "OPENID-7F3A", "timestamp": 1700000000}}).encode()
    for _ in range(2):
        assert (await callback(gw.http.port, body)).status_code == 200
    [msg] = await inbound(nats_server.url)
    assert msg.provider_id is not None and "OPENID-7F3A" not in msg.provider_id and len(msg.provider_id) < 64


# --- passive replies -------------------------------------------------------------------


async def _reply(url: str, outbound_id: str, conversation: str, **fields: Any) -> None:
    nc = await nats.connect(url)
    try:
        out = Outbound(id=outbound_id, conversation=conversation, parts=[TextPart(text="已收到")], **fields)
        await nc.jetstream().publish("gw.out.qq.qq", encode(out), headers={"Nats-Msg-Id": outbound_id})
    finally:
        await nc.close()


async def test_replies_carry_msg_id_and_a_new_msg_seq_each(gateway_factory: Any, nats_server: Any,
                                                          fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, group_at(msg_id="M-1"))
    [msg] = await published(nats_server.url, 1)
    for i in range(3):
        await _reply(nats_server.url, f"r-{i}", msg.conversation)
        await wait_for_status(nats_server.url, f"r-{i}", "sent")
    assert [(m["path"], m["body"]["msg_id"], m["body"]["msg_seq"]) for m in fake_qqbot.messages] == [
        ("/v2/groups/C9F778FE6ADF9D1D1DBE395BF744A33A/messages", "M-1", n) for n in (1, 2, 3)]
    assert fake_qqbot.messages[0]["body"]["content"] == "已收到" and fake_qqbot.messages[0]["body"]["msg_type"] == 0
    assert fake_qqbot.tokens_issued == 1


async def test_reply_names_the_message_it_answers(gateway_factory: Any, nats_server: Any,
                                                  fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, c2c(msg_id="C-1"))
    await callback(gw.http.port, c2c(msg_id="C-2"))
    first, _ = await published(nats_server.url, 2)
    await _reply(nats_server.url, "r-first", first.conversation, in_reply_to=first.id)
    await wait_for_status(nats_server.url, "r-first", "sent")
    assert fake_qqbot.messages[0]["path"].startswith("/v2/users/")
    assert fake_qqbot.messages[0]["body"]["msg_id"] == "C-1"


async def test_in_reply_to_from_another_conversation_never_sends_there(gateway_factory: Any, nats_server: Any,
                                                                      fake_qqbot: FakeQQBot) -> None:
    # A backend's stale or mistaken in_reply_to must not carry a reply to another customer:
    # the reply stays in its own conversation (answering that conversation's last message).
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, c2c(msg_id="A-1", user="USER-A"))
    await callback(gw.http.port, c2c(msg_id="B-1", user="USER-B"))
    a, b = await published(nats_server.url, 2)
    await _reply(nats_server.url, "r-cross", a.conversation, in_reply_to=b.id)
    await wait_for_status(nats_server.url, "r-cross", "sent")
    [sent] = fake_qqbot.messages
    assert sent["path"] == "/v2/users/USER-A/messages" and sent["body"]["msg_id"] == "A-1"


async def test_reply_limit_used_up_fails_before_calling_the_api(gateway_factory: Any, nats_server: Any,
                                                                fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot, group_reply_limit=2)})
    await callback(gw.http.port, group_at(msg_id="M-lim"))
    [msg] = await published(nats_server.url, 1)
    for i in range(2):
        await _reply(nats_server.url, f"ok-{i}", msg.conversation)
        await wait_for_status(nats_server.url, f"ok-{i}", "sent")
    conv = await gw.get_conversation(msg.conversation)
    assert conv is not None
    reach = await gw.channels["qq"].channel.reach(conv, datetime.now(timezone.utc))
    assert not reach.ok and reach.code == "outside_window"
    await _reply(nats_server.url, "too-many", msg.conversation)
    sts = await wait_for_status(nats_server.url, "too-many", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "outside_window"
    assert len(fake_qqbot.messages) == 2


async def test_window_counts_from_the_platforms_message_time(gateway_factory: Any, nats_server: Any,
                                                             fake_qqbot: FakeQQBot) -> None:
    # A push that reaches us an hour late (the platform's retry) opens no window.
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    late = (datetime.now(timezone.utc) - timedelta(minutes=61)).isoformat()
    await callback(gw.http.port, c2c(msg_id="C-old", timestamp=late))
    [msg] = await published(nats_server.url, 1)
    conv = await gw.get_conversation(msg.conversation)
    assert conv is not None
    reach = await gw.channels["qq"].channel.reach(conv, datetime.now(timezone.utc))
    assert not reach.ok and reach.code == "outside_window"


async def test_reply_after_the_window_fails_permanently_before_calling_the_api(
        gateway_factory: Any, nats_server: Any, fake_qqbot: FakeQQBot) -> None:
    # The platform's timestamp has whole seconds: the window may start up to 1 s before now.
    gw = await gateway_factory({"qq": official_config(fake_qqbot, c2c_reply_window="3s")})
    await callback(gw.http.port, c2c(msg_id="C-late"))
    [msg] = await published(nats_server.url, 1)
    conv = await gw.get_conversation(msg.conversation)
    assert conv is not None
    channel = gw.channels["qq"].channel
    now = datetime.now(timezone.utc)
    assert (await channel.reach(conv, now)).ok
    late = await channel.reach(conv, now + timedelta(seconds=4))
    assert not late.ok and late.code == "outside_window" and late.until is not None and late.until <= now + \
        timedelta(seconds=3)

    async def closed() -> bool:
        return not (await channel.reach(conv, datetime.now(timezone.utc))).ok

    await wait_until(closed, timeout=5)
    await _reply(nats_server.url, "late", msg.conversation)
    sts = await wait_for_status(nats_server.url, "late", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "outside_window" and sts[-1].error.permanent
    assert fake_qqbot.messages == [] and fake_qqbot.tokens_issued == 0


async def test_api_error_in_a_200_body_is_classified(gateway_factory: Any, nats_server: Any,
                                                     fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)}, outbound={"backoff": ["100ms"]})
    await callback(gw.http.port, group_at(msg_id="M-err"))
    [msg] = await published(nats_server.url, 1)
    fake_qqbot.fail_next(50006)  # CannotSendEmptyMessage: permanent
    await _reply(nats_server.url, "perm", msg.conversation)
    sts = await wait_for_status(nats_server.url, "perm", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "api_50006"
    fake_qqbot.fail_next(11242)  # "system error, retrying once helps"
    await _reply(nats_server.url, "again", msg.conversation)
    sts = await wait_for_status(nats_server.url, "again", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]


async def test_refused_token_is_replaced_once(gateway_factory: Any, nats_server: Any, fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, group_at(msg_id="M-tok"))
    [msg] = await published(nats_server.url, 1)
    await _reply(nats_server.url, "t-1", msg.conversation)
    await wait_for_status(nats_server.url, "t-1", "sent")
    fake_qqbot.expire_tokens()
    await _reply(nats_server.url, "t-2", msg.conversation)
    sts = await wait_for_status(nats_server.url, "t-2", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"] and fake_qqbot.tokens_issued == 2


def test_classify_maps_http_and_body_codes() -> None:
    assert classify(200, {"id": "x"}) is None
    assert classify(200, {"code": 22009, "message": "msg limit exceed"}).permanent is False  # type: ignore[union-attr]
    assert classify(200, {"code": 50006}).permanent is True  # type: ignore[union-attr]
    assert classify(500, {}).permanent is False  # type: ignore[union-attr]
    assert classify(404, {}).code == "http_404"  # type: ignore[union-attr]


def test_public_key_is_what_cryptography_derives_from_the_repeated_seed() -> None:
    assert public_key(SECRET) == bot_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


async def _reply_parts(url: str, outbound_id: str, conversation: str, parts: list[Any]) -> None:
    nc = await nats.connect(url)
    try:
        out = Outbound(id=outbound_id, conversation=conversation, parts=parts)
        await nc.jetstream().publish("gw.out.qq.qq", encode(out), headers={"Nats-Msg-Id": outbound_id})
    finally:
        await nc.close()


async def test_a_retry_the_platform_refuses_as_a_duplicate_msg_seq_is_sent_once_and_reported_sent(
        gateway_factory: Any, nats_server: Any, fake_qqbot: FakeQQBot) -> None:
    # The platform sent the reply but its answer was lost: the retry reuses the msg_seq, the
    # platform refuses it as a duplicate (40054005), and that means the reply is out.
    gw = await gateway_factory({"qq": official_config(fake_qqbot)}, outbound={"backoff": ["50ms"]})
    await callback(gw.http.port, c2c(msg_id="C-lost"))
    [msg] = await published(nats_server.url, 1)
    fake_qqbot.lose_answers = 1
    await _reply(nats_server.url, "r-lost", msg.conversation)
    sts = await wait_for_status(nats_server.url, "r-lost", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"] and len(fake_qqbot.messages) == 1


async def test_image_reply_is_uploaded_by_url_and_sent_as_media(gateway_factory: Any, nats_server: Any,
                                                                fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, group_at(msg_id="M-img"))
    [msg] = await published(nats_server.url, 1)
    await _reply_parts(nats_server.url, "img", msg.conversation,
                       [TextPart(text="发票如下"), ImagePart(url="https://example.com/invoice.png")])
    await wait_for_status(nats_server.url, "img", "sent")
    assert fake_qqbot.uploads == [{"path": "/v2/groups/C9F778FE6ADF9D1D1DBE395BF744A33A/files",
                                   "body": {"file_type": 1, "url": "https://example.com/invoice.png",
                                            "srv_send_msg": False}}]
    text, media = (m["body"] for m in fake_qqbot.messages)
    assert (text["msg_type"], text["msg_seq"], text["content"]) == (0, 1, "发票如下")
    assert (media["msg_type"], media["msg_seq"], media["msg_id"]) == (7, 2, "M-img")
    assert media["media"]["file_info"] in fake_qqbot.file_infos


async def test_failed_second_reply_resumes_without_resending_the_first(gateway_factory: Any, nats_server: Any,
                                                                      fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, c2c(msg_id="C-resume"))
    [msg] = await published(nats_server.url, 1)
    fake_qqbot.fail_next(304082, endpoint="files")  # "media fetch failed, retry"
    await _reply_parts(nats_server.url, "resume", msg.conversation,
                       [TextPart(text="图"), VideoPart(url="https://example.com/v.mp4")])
    sts = await wait_for_status(nats_server.url, "resume", "sent")
    assert [s.state for s in sts] == ["accepted", "failed", "sent"]
    assert [(m["body"]["content"], m["body"]["msg_seq"]) for m in fake_qqbot.messages] == [("图", 1), (" ", 2)]


async def test_media_without_url_or_file_part_fails_permanently(gateway_factory: Any, nats_server: Any,
                                                               fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot)})
    await callback(gw.http.port, c2c(msg_id="C-nourl"))
    [msg] = await published(nats_server.url, 1)
    await _reply_parts(nats_server.url, "nourl", msg.conversation, [ImagePart(data=b"\x89PNG")])
    await _reply_parts(nats_server.url, "file", msg.conversation, [FilePart(url="https://example.com/a.pdf")])
    for oid in ("nourl", "file"):
        sts = await wait_for_status(nats_server.url, oid, "dead")
        assert sts[-1].error is not None and sts[-1].error.code == "unsupported_content"
    assert fake_qqbot.messages == [] and fake_qqbot.uploads == []


async def test_outbound_needing_more_replies_than_are_left_sends_nothing(gateway_factory: Any, nats_server: Any,
                                                                         fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot, group_reply_limit=2)})
    await callback(gw.http.port, group_at(msg_id="M-three"))
    [msg] = await published(nats_server.url, 1)
    await _reply_parts(nats_server.url, "three", msg.conversation,
                       [TextPart(text="a"), ImagePart(url="https://e/1.png"), ImagePart(url="https://e/2.png")])
    sts = await wait_for_status(nats_server.url, "three", "dead")
    assert sts[-1].error is not None and sts[-1].error.code == "outside_window"
    assert fake_qqbot.messages == [] and fake_qqbot.uploads == []


async def test_message_without_its_ids_is_a_400_naming_no_value(gateway_factory: Any, nats_server: Any) -> None:
    gw = await gateway_factory({"qq": official_config()})
    body = json.dumps({"op": 0, "id": "e1", "t": "GROUP_AT_MESSAGE_CREATE",
                       "d": {"id": "M-x", "author": "private-openid-value", "content": "hi"}}).encode()
    r = await callback(gw.http.port, body)
    assert r.status_code == 400 and "private-openid-value" not in r.text
    assert "GROUP_AT_MESSAGE_CREATE" in r.text
    assert await inbound(nats_server.url) == []


async def test_proactive_messages_go_after_the_window_up_to_the_monthly_quota(
        gateway_factory: Any, nats_server: Any, fake_qqbot: FakeQQBot) -> None:
    gw = await gateway_factory({"qq": official_config(fake_qqbot, c2c_reply_window="1s", proactive_per_month=2)})
    await callback(gw.http.port, c2c(msg_id="C-pro"))
    [msg] = await published(nats_server.url, 1)
    conv = await gw.get_conversation(msg.conversation)
    assert conv is not None
    channel = gw.channels["qq"].channel

    async def window_closed() -> bool:
        reach = await channel.reach(conv, datetime.now(timezone.utc))
        return reach.ok and "proactive" in (reach.detail or "")

    await wait_until(window_closed, timeout=5)
    for i in range(2):
        await _reply(nats_server.url, f"pro-{i}", msg.conversation)
        await wait_for_status(nats_server.url, f"pro-{i}", "sent")
    assert [("msg_id" in m["body"], "msg_seq" in m["body"]) for m in fake_qqbot.messages] == [(False, False)] * 2
    reach = await channel.reach(conv, datetime.now(timezone.utc))
    assert not reach.ok and reach.code == "outside_window"
    await _reply(nats_server.url, "pro-over", msg.conversation)
    sts = await wait_for_status(nats_server.url, "pro-over", "dead")
    assert sts[-1].error is not None and "proactive" in sts[-1].error.message
    assert len(fake_qqbot.messages) == 2


async def test_message_times_are_published_in_utc(gateway_factory: Any, nats_server: Any) -> None:
    # The bus contract's times are UTC; the platform writes Beijing time (+08:00), and a
    # time without an offset is read as Beijing time too.
    from gateway.testing import stream_messages

    gw = await gateway_factory({"qq": official_config()})
    assert (await callback(gw.http.port, c2c(msg_id="t1", timestamp="2023-11-06T13:37:18+08:00"))).status_code == 200
    assert (await callback(gw.http.port, c2c(msg_id="t2", timestamp="2023-11-06T13:37:18"))).status_code == 200
    assert (await callback(gw.http.port, c2c(msg_id="t3", timestamp="9999-12-31T23:59:59-14:00"))).status_code == 200
    raw = [json.loads(m.data) for m in await stream_messages(nats_server.url, "GW_IN", "gw.in.qq.qq")]
    assert [m["sent_at"] for m in raw] == ["2023-11-06T05:37:18Z", "2023-11-06T05:37:18Z", None]
