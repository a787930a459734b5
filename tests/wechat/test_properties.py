"""Property-based: whatever the fields of a correctly signed WeChat callback hold (plaintext
and safe mode), the webhook answers without a 5xx, and everything it publishes decodes with
the gateway's own decoder (issue 9.8). One gateway process for the module; hypothesis
drives it over HTTP like WeChat would."""

from __future__ import annotations

import asyncio
import time
from xml.sax.saxutils import escape

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.wire import message_decoder
from gateway.testing import GatewayProcess, stream_messages

from .conftest import ACCOUNT, AES_KEY, APPID, SECRET, TOKEN, encrypted_request, signed_query

OPENID = "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters XML 1.0 can carry (others make the parser refuse the body with a 400, which
# is right but tests nothing deeper).
_xml_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="".join(
    chr(c) for c in range(32) if chr(c) not in "\t\n\r") + "\ufffe\uffff")
text = st.text(_xml_chars, max_size=40)
numberish = st.one_of(
    st.integers(-10**25, 10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e400", "-1e-400", "", " 12 ", "0x10", "1_000",
                     "12345678901234567890", "9999999999999", str(int(time.time()))]),
    text,
)
msg_types = st.one_of(st.sampled_from(["text", "image", "voice", "video", "shortvideo", "location", "link", "event",
                                       "file", "miniprogrampage"]), text)
events = st.one_of(st.sampled_from(["subscribe", "unsubscribe", "SCAN", "LOCATION", "CLICK", "VIEW",
                                    "TEMPLATESENDJOBFINISH", "scancode_push", "pic_weixin"]), text)
callbacks = st.fixed_dictionaries(
    {"ToUserName": st.one_of(st.just(ACCOUNT), text), "FromUserName": st.one_of(st.just(OPENID), text),
     "CreateTime": numberish, "MsgType": msg_types},
    optional={"MsgId": numberish, "MsgID": numberish, "Content": text, "Location_X": numberish,
              "Location_Y": numberish, "Scale": numberish, "Label": text, "PicUrl": text, "MediaId": text,
              "Format": text, "Recognition": text, "ThumbMediaId": text, "Title": text, "Description": text,
              "Url": text, "Event": events, "EventKey": text, "Latitude": numberish, "Longitude": numberish,
              "Precision": numberish, "Status": text, "MsgDataId": numberish, "Idx": numberish},
)


# Cases found by the robustness run of issue 9.8, always tried besides the random ones.
KNOWN = [
    {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": "12345678901234567890", "MsgType": "text",
     "Content": "hi", "MsgId": "1"},
    {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": "9999999999999", "MsgType": "text", "MsgId": "2"},
    {"ToUserName": ACCOUNT, "FromUserName": OPENID, "CreateTime": "1700000000", "MsgType": "location",
     "Location_X": "nan", "Location_Y": "inf", "MsgId": "3"},
]


def known(test):
    for fields in KNOWN:
        test = example(fields=fields)(test)
    return test


def to_xml(fields: dict[str, str]) -> str:
    return "<xml>" + "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items()) + "</xml>"


def wechat(name: str, **extra: str) -> str:
    lines = [f"[channels.{name}]", 'type = "wechat"', f'appid = "{APPID}"', f'secret = "{SECRET}"',
             f'token = "{TOKEN}"', 'api_base = "http://127.0.0.1:9"', "download_media = false"]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class Gateway:
    """The gateway process and what of GW_IN has been checked so far."""

    def __init__(self, gp: GatewayProcess):
        self.gp = gp
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{gp.http_port}", timeout=10)
        self.checked = 0

    def post(self, channel: str, body: str, params: dict[str, str]) -> httpx.Response:
        return self.http.post(f"/channels/{channel}/webhook", params=params, content=body.encode(),
                              headers={"Content-Type": "text/xml"})

    def published_decode(self) -> None:
        new = asyncio.run(stream_messages(self.gp.bus_url, "GW_IN", after=self.checked))
        for m in new:
            message_decoder.decode(m.data)  # raises if the gateway published what it cannot read
            self.checked = m.seq


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gp = GatewayProcess(tmp_path_factory.mktemp("wx-props"),
                        channels=wechat("wxp") + wechat("wxs", mode="safe", encoding_aes_key=AES_KEY))
    gp.start()
    gw = Gateway(gp)
    try:
        yield gw
    finally:
        gw.http.close()
        gp.signal(15)
        gp.wait(60)


def check(gw: Gateway, r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    assert gw.gp.proc is not None and gw.gp.proc.poll() is None
    if r.status_code == 200:
        assert r.text == "success"
    gw.published_decode()


@SETTINGS
@known
@given(fields=callbacks)
def test_plaintext_callback_fields_never_give_5xx_and_what_is_published_decodes(gateway, fields):
    check(gateway, gateway.post("wxp", to_xml(fields), signed_query()))


@SETTINGS
@known
@given(fields=callbacks)
def test_safe_mode_callback_fields_never_give_5xx_and_what_is_published_decodes(gateway, fields):
    params, body = encrypted_request(to_xml(fields), "safe")
    check(gateway, gateway.post("wxs", body, params))
