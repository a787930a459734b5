"""A gateway upgraded in place from the release before the channel toolkit (commit
f3660f2) keeps using the WeChat state that release left in the channel's KV.

Each test writes the old records byte for byte as f3660f2 wrote them, straight into the
state bucket of a real nats-server (not through the new code), then shows the new code
acting on them. The formats are spelled out in the tests, with where f3660f2 made them."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import nats
import pytest

from gateway import ImagePart, ObjectRef, Outbound, TextPart
from gateway.wire import encode
from gateway_plugins.wechat import StoredMedia

from .conftest import ACCOUNT, channel_config, inbound, post, signed_query, text_message, wait_state, xml

OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


# --- the previous release's storage ------------------------------------------------------

def old_kv_key(channel: str, key: str) -> str:
    """The KV key f3660f2 stored a channel's state key under (gateway/core/inbound/pipeline.py
    ``_State._key`` and ``_token``): ``<channel>.<key>`` for keys of ``[-_=a-zA-Z0-9]``,
    else ``<channel>.h-`` + 40 base32 characters of the key's SHA-256."""
    if re.fullmatch(r"[-_=a-zA-Z0-9]{1,200}", key):
        return f"{channel}.{key}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return f"{channel}.h-" + base64.b32encode(digest[:25]).decode("ascii").lower()[:40]


async def write_old(url: str, channel: str, key: str, value: bytes) -> None:
    """Store ``value`` as f3660f2's ``ctx.state.put(key, value)`` did (every WeChat record
    was written without a TTL): a KV put into bucket ``gw_state``."""
    nc = await nats.connect(url)
    try:
        await (await nc.jetstream().key_value("gw_state")).put(old_kv_key(channel, key), value)
    finally:
        await nc.close()


async def send(nc, outbound: Outbound) -> None:
    await nc.jetstream().publish("gw.out.wechat.wx", encode(outbound), headers={"Nats-Msg-Id": outbound.id})


async def customer_writes(gw) -> str:
    r = await post(gw.http.port, xml(text_message("help", msg_id="9001", openid=OPENID)), signed_query())
    assert r.status_code == 200
    return gw.channels["wx"].ctx.conversation_key(OPENID)


# --- template messages -----------------------------------------------------------------------

@pytest.mark.parametrize(("status", "state"), [("success", "delivered"), ("failed:user block", "dead")])
async def test_template_result_for_a_template_sent_before_the_upgrade_is_reported(
        gateway_factory, fake_wechat, nats_server, status, state):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    # The previous release sent outbound "o-old" as template message 200228399 and kept
    # (f3660f2 plugins/wechat/_channel.py _send_template: _TemplateSent(outbound_id,
    # conversation), msgspec JSON, no TTL) under "tmpl-<msgid>".
    conversation = gw.channels["wx"].ctx.conversation_key(OPENID)
    old = b'{"outbound_id":"o-old","conversation":"' + conversation.encode() + b'"}'
    await write_old(nats_server.url, "wx", "tmpl-200228399", old)

    finish = {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": int(time.time()), "MsgType": "event",
              "Event": "TEMPLATESENDJOBFINISH", "MsgID": 200228399, "Status": status}
    r = await post(gw.http.port, xml(finish), signed_query())
    assert (r.status_code, r.text) == (200, "success")
    sts = await wait_state(nats_server.url, "o-old", state)
    assert sts[-1].conversation == conversation and sts[-1].provider_id == "200228399"
    assert await inbound(nats_server.url) == []


# --- access_token ----------------------------------------------------------------------------

async def test_access_token_record_of_the_previous_release_costs_one_fetch_and_nothing_fails(
        gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    # f3660f2 plugins/wechat/_api.py: _TokenRecord(token, expires_at, lease_until), msgspec
    # JSON, under "access-token". The new release keeps {"value", "expires_at"} there and
    # does not read this one (docs/channels/wechat.md, Upgrading): it fetches a new token.
    old = b'{"token":"OLD_TOKEN_OF_F3660F2","expires_at":%.3f,"lease_until":0.0}' % (time.time() + 7000)
    await write_old(nats_server.url, "wx", "access-token", old)

    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-1", conversation=conv, parts=[TextPart(text="hello")]))
    sts = await wait_state(nats_server.url, "o-1", "sent")
    assert [s.state for s in sts] == ["accepted", "sent"] and fake_wechat.tokens_issued == 1


# --- media -----------------------------------------------------------------------------------

async def test_media_uploaded_by_the_previous_release_is_reused_not_uploaded_again(
        gateway_factory, fake_wechat, nats_server, nc):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    # The previous release uploaded this image as temporary media and kept (f3660f2
    # plugins/wechat/_channel.py _media_id: _Upload(media_id, expires_at), msgspec JSON,
    # no TTL) under "upload-<kind>-<sha256 of the bytes>".
    media_id = fake_wechat.add_media(PNG, "image/png")
    old = b'{"media_id":"%s","expires_at":%.3f}' % (media_id.encode(), time.time() + 86400)
    await write_old(nats_server.url, "wx", f"upload-image-{hashlib.sha256(PNG).hexdigest()}", old)

    conv = await customer_writes(gw)
    await send(nc, Outbound(id="o-img", conversation=conv, parts=[ImagePart(data=PNG, content_type="image/png")]))
    await wait_state(nats_server.url, "o-img", "sent")
    assert fake_wechat.uploads == [] and [m["image"]["media_id"] for m in fake_wechat.custom] == [media_id]


async def test_inbound_media_copied_by_the_previous_release_is_still_found(gateway_factory, fake_wechat, nats_server):
    gw = await gateway_factory({"wx": channel_config(fake_wechat)})
    # f3660f2 plugins/wechat/_channel.py _copy_media: StoredMedia(ref, content_type,
    # message_id), msgspec JSON, no TTL, under "media-<MediaId>".
    sha = hashlib.sha256(PNG).hexdigest()
    old = (b'{"ref":{"bucket":"gw_blobs","name":"%s","size":%d,"sha256":"%s"},"content_type":"image/png",'
           b'"message_id":"01JEXAMPLEGATEWAYID0000000"}' % (sha.encode(), len(PNG), sha.encode()))
    await write_old(nats_server.url, "wx", "media-OLD_MEDIA_ID", old)

    assert await gw.channels["wx"].channel.stored_media("OLD_MEDIA_ID") == StoredMedia(
        ref=ObjectRef(bucket="gw_blobs", name=sha, size=len(PNG), sha256=sha), content_type="image/png",
        message_id="01JEXAMPLEGATEWAYID0000000")
