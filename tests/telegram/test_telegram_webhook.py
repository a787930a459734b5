"""Updates in by webhook: what Telegram POSTs (real update JSON, the secret token header)
to the gateway's real HTTP port, read back off a real nats-server."""

from __future__ import annotations

from typing import Any

from tg_fake import (
    BOT_ID,
    BOT_USER,
    CUSTOMER,
    GROUP,
    SECRET,
    USERNAME,
    FakeTelegram,
    group_chat,
    mention,
    message,
    post_update,
    tg_config,
    update,
    user,
)

from gateway import AudioPart, FilePart, ImagePart, Message, Subjects
from gateway.testing import stream_messages, wait_until
from gateway.wire import message_decoder


async def published(url: str) -> list[Message]:
    msgs = await stream_messages(url, Subjects().stream_in, Subjects().inbound("telegram", "tg"))
    return [message_decoder.decode(m.data) for m in msgs]


async def start(gateway_factory: Any, fake: FakeTelegram, **over: Any) -> Any:
    return await gateway_factory({"tg": tg_config(fake, **over)})


async def test_private_message_is_published_with_sender_route_and_meta(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    r = await post_update(gw.http.port, update(650000001, message=message(42, "你好，我的订单在哪里？")))
    assert r.status_code == 200, r.text
    [msg] = await published(nats_server.url)
    assert msg.parts[0].text == "你好，我的订单在哪里？"
    assert msg.sender.id == str(CUSTOMER) and msg.sender.name == "Wang Fang"
    assert msg.provider_id == f"{BOT_ID}:{CUSTOMER}:42"
    assert msg.meta["chat_type"] == "private" and msg.meta["update_id"] == "650000001"
    assert msg.meta["username"] == "wangfang" and msg.meta["message_id"] == "42"
    assert msg.sent_at is not None and msg.sent_at.year == 2025
    conv = await gw.channels["tg"].ctx.get_conversation(msg.conversation)
    assert conv.route == {"chat_id": str(CUSTOMER), "chat_type": "private", "message_id": "42"}


async def test_wrong_or_missing_secret_token_is_403_and_publishes_nothing(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    body = update(1, message=message(1))
    assert (await post_update(gw.http.port, body, secret=None)).status_code == 403
    assert (await post_update(gw.http.port, body, secret=SECRET[:-1] + "x")).status_code == 403
    assert (await post_update(gw.http.port, body, secret=SECRET + "x")).status_code == 403
    assert await published(nats_server.url) == []
    assert (await post_update(gw.http.port, body)).status_code == 200


async def test_malformed_updates_are_400_and_the_gateway_keeps_serving(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    for body in (b"{not json", b"[]", b'{"message": {}}', b'{"update_id": "7"}',
                 b'{"update_id": 7, "message": {"message_id": 1}}',
                 b'{"update_id": 7, "message": {"message_id": 1, "date": 1764900000, "text": "no chat"}}',
                 b'{"update_id": 7, "message": {"message_id": 1, "date": 1764900000, "chat": "x", "text": "t"}}',
                 b'{"update_id": 7, "callback_query": {"chat_instance": "1", "data": "sv:x:0"}}',
                 b'{"update_id": 7, "my_chat_member": {"date": 1764900000}}'):
        r = await post_update(gw.http.port, body)
        assert r.status_code == 400, (body, r.status_code, r.text)
    assert (await post_update(gw.http.port, update(8, message=message(8)))).status_code == 200
    assert len(await published(nats_server.url)) == 1


async def test_photo_document_and_voice_are_copied_into_the_object_store(gateway_factory, fake_tg, nats_server):
    photo, doc, voice = b"\xff\xd8\xff\xe0 jpeg" * 40, b"%PDF-1.7 invoice" * 30, b"OggS voice" * 50
    fake_tg.add_file("AgAD-large", photo, "photos/file_1.jpg")
    fake_tg.add_file("BQAD-doc", doc, "documents/file_2.pdf")
    fake_tg.add_file("AwAD-voice", voice, "voice/file_3.oga")
    gw = await start(gateway_factory, fake_tg)
    sizes = [{"file_id": "AgAD-small", "file_unique_id": "s", "width": 90, "height": 60, "file_size": 50},
             {"file_id": "AgAD-large", "file_unique_id": "l", "width": 1280, "height": 853, "file_size": len(photo)}]
    updates = [
        update(10, message=message(10, None, photo=sizes, caption="the box was broken")),
        update(11, message=message(11, None, document={"file_id": "BQAD-doc", "file_unique_id": "d",
                                                       "file_name": "invoice.pdf", "mime_type": "application/pdf",
                                                       "file_size": len(doc)})),
        update(12, message=message(12, None, voice={"file_id": "AwAD-voice", "file_unique_id": "v", "duration": 3,
                                                    "mime_type": "audio/ogg", "file_size": len(voice)})),
    ]
    for u in updates:
        assert (await post_update(gw.http.port, u)).status_code == 200
    m_photo, m_doc, m_voice = await published(nats_server.url)
    ctx = gw.channels["tg"].ctx
    assert m_photo.parts[0].text == "the box was broken"
    image = m_photo.parts[1]
    assert isinstance(image, ImagePart) and image.media_id == "AgAD-large" and image.ref is not None
    assert await ctx.get_blob(image.ref) == photo
    file = m_doc.parts[0]
    assert isinstance(file, FilePart) and file.filename == "invoice.pdf" and file.content_type == "application/pdf"
    assert await ctx.get_blob(file.ref) == doc
    audio = m_voice.parts[0]
    assert isinstance(audio, AudioPart) and audio.duration == 3.0 and audio.content_type == "audio/ogg"
    assert await ctx.get_blob(audio.ref) == voice
    for m in (m_photo, m_doc, m_voice):  # the file URL carries the bot token: never published
        assert "file/bot" not in str(m) and "AAH3kTzq" not in str(m)


async def test_a_file_over_max_media_size_keeps_its_file_id_and_is_not_fetched(gateway_factory, fake_tg, nats_server):
    fake_tg.add_file("BQAD-big", b"x" * 5000, "documents/big.zip")
    gw = await start(gateway_factory, fake_tg, max_media_size=4096)
    doc = {"file_id": "BQAD-big", "file_unique_id": "b", "file_name": "big.zip", "file_size": 5000}
    assert (await post_update(gw.http.port, update(20, message=message(20, None, document=doc)))).status_code == 200
    [msg] = await published(nats_server.url)
    part = msg.parts[0]
    assert isinstance(part, FilePart) and part.ref is None and part.data is None
    assert part.media_id == "BQAD-big" and part.size == 5000
    assert fake_tg.called("getFile") == []


async def test_a_file_telegram_cannot_serve_now_is_answered_503_and_published_on_the_retry(
        gateway_factory, fake_tg, nats_server):
    fake_tg.add_file("AwAD-v", b"OggS" * 10, "voice/v.oga")
    fake_tg.get_file_script.append("server")
    gw = await start(gateway_factory, fake_tg)
    body = update(30, message=message(30, None, voice={"file_id": "AwAD-v", "file_unique_id": "v", "duration": 1}))
    assert (await post_update(gw.http.port, body)).status_code == 503
    assert await published(nats_server.url) == []
    assert (await post_update(gw.http.port, body)).status_code == 200
    [msg] = await published(nats_server.url)
    assert msg.parts[0].ref is not None


async def test_group_messages_are_published_only_when_they_address_the_bot(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    grp = group_chat()
    bot_msg = message(500, "How can we help?", chat=grp, sender=BOT_USER)
    cases = [
        (update(40, message=message(40, "lunch anyone?", chat=grp)), False),
        (update(41, message=message(41, chat=grp, **mention(f"@{USERNAME} my parcel is late"))), True),
        (update(42, message=message(42, "still late", chat=grp, reply_to_message=bot_msg)), True),
        (update(43, message=message(43, chat=grp, **mention("@someone_else hi", "someone_else"))), False),
        (update(44, message=message(44, chat=grp, text=f"/status@{USERNAME}",
                                    entities=[{"offset": 0, "length": 7 + len(USERNAME) + 1,
                                               "type": "bot_command"}])), True),
        (update(45, message=message(45, "hey bot", chat=grp, entities=[
            {"offset": 4, "length": 3, "type": "text_mention", "user": BOT_USER}])), True),
    ]
    for body, _ in cases:
        assert (await post_update(gw.http.port, body)).status_code == 200
    msgs = await published(nats_server.url)
    assert [m.meta["message_id"] for m in msgs] == [str(b["message"]["message_id"]) for b, keep in cases if keep]
    assert msgs[0].parts[0].text == "my parcel is late"  # the leading @mention is not the customer's words
    assert msgs[0].meta["chat_title"] == "Acme customers" and msgs[0].meta["chat_type"] == "supergroup"
    assert len({m.conversation for m in msgs}) == 1  # the group is one conversation
    assert msgs[1].in_reply_to == f"{BOT_ID}:{GROUP}:500"


async def test_group_messages_all_and_none(gateway_factory, fake_tg, nats_server):
    gw = await gateway_factory({"all": tg_config(fake_tg, group_messages="all"),
                                "none": tg_config(fake_tg, group_messages="none")})
    body = update(50, message=message(50, "lunch anyone?", chat=group_chat()))
    assert (await post_update(gw.http.port, body, channel="all")).status_code == 200
    assert (await post_update(gw.http.port, body, channel="none")).status_code == 200
    subjects = Subjects()
    got_all = await stream_messages(nats_server.url, subjects.stream_in, subjects.inbound("telegram", "all"))
    got_none = await stream_messages(nats_server.url, subjects.stream_in, subjects.inbound("telegram", "none"))
    assert len(got_all) == 1 and got_none == []


async def test_group_mention_waits_for_the_bots_username(gateway_factory, fake_tg, nats_server):
    """Without ``username`` the channel asks getMe; until it knows, a group message that
    mentions someone is answered 503 (Telegram retries), never dropped."""
    gw = await start(gateway_factory, fake_tg)
    await wait_until(lambda: gw.channels["tg"].channel.username == USERNAME)
    assert fake_tg.called("getMe")
    channel = gw.channels["tg"].channel
    channel.username = ""  # as before getMe answered
    body = update(60, message=message(60, chat=group_chat(), **mention(f"@{USERNAME} hi")))
    assert (await post_update(gw.http.port, body)).status_code == 503
    channel.username = USERNAME
    assert (await post_update(gw.http.port, body)).status_code == 200
    assert len(await published(nats_server.url)) == 1


async def test_an_edit_is_a_new_message_naming_the_original(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    original = message(70, "order 1234", date=1764900000)
    edited = message(70, "order 12345", date=1764900000, edit_date=1764900030)
    assert (await post_update(gw.http.port, update(70, message=original))).status_code == 200
    assert (await post_update(gw.http.port, update(71, edited_message=edited))).status_code == 200
    assert (await post_update(gw.http.port, update(71, edited_message=edited))).status_code == 200  # a retry
    first, edit = await published(nats_server.url)
    assert edit.parts[0].text == "order 12345"
    assert edit.meta["edited"] is True and edit.meta["edit_of"] == first.id and edit.meta["edited_at"] == 1764900030
    assert edit.id != first.id and edit.conversation == first.conversation


async def test_edits_can_be_ignored(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg, edits=False)
    edited = message(80, "changed", edit_date=1764900030)
    assert (await post_update(gw.http.port, update(80, edited_message=edited))).status_code == 200
    assert await published(nats_server.url) == []


async def test_service_messages_and_other_updates_are_acknowledged_without_publishing(
        gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg)
    joined = message(90, None, chat=group_chat(), new_chat_members=[user(555, "New", None, None)])
    assert (await post_update(gw.http.port, update(90, message=joined))).status_code == 200
    poll_answer = {"poll_id": "1", "user": user(), "option_ids": [0]}
    assert (await post_update(gw.http.port, update(91, poll_answer=poll_answer))).status_code == 200
    assert await published(nats_server.url) == []


async def test_public_url_registers_the_webhook_with_the_secret_token(gateway_factory, fake_tg):
    gw = await start(gateway_factory, fake_tg, public_url="https://gw.example.com/")
    await wait_until(lambda: fake_tg.webhook is not None)
    hook = fake_tg.webhook
    assert hook["url"] == "https://gw.example.com/channels/tg/webhook"  # the token is not in it
    assert hook["secret_token"] == SECRET
    assert hook["allowed_updates"] == ["message", "edited_message", "callback_query", "my_chat_member"]
    await wait_until(lambda: gw.channels["tg"].ctx.health == "running")


async def test_a_body_over_max_body_is_413(gateway_factory, fake_tg, nats_server):
    gw = await start(gateway_factory, fake_tg, max_body=2048)
    r = await post_update(gw.http.port, update(1, message=message(1, "x" * 4000)))
    assert r.status_code == 413
    assert await published(nats_server.url) == []


async def test_download_media_off_publishes_the_file_id_only(gateway_factory, fake_tg, nats_server):
    fake_tg.add_file("AgAD-p", b"\xff\xd8jpeg", "photos/p.jpg")
    gw = await start(gateway_factory, fake_tg, download_media=False)
    sizes = [{"file_id": "AgAD-p", "file_unique_id": "p", "width": 10, "height": 10, "file_size": 6}]
    assert (await post_update(gw.http.port, update(2, message=message(2, None, photo=sizes)))).status_code == 200
    [msg] = await published(nats_server.url)
    assert isinstance(msg.parts[0], ImagePart) and msg.parts[0].ref is None and msg.parts[0].media_id == "AgAD-p"
    assert fake_tg.called("getFile") == []
