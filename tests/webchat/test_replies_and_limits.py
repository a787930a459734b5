"""The web chat over its wire, for what a deployed widget needs: acks that say what was stored,
replies with files, the agent's name, picture, typing and reading, uploads as large as a
phone's photo, refusals a page can read, and a quiet log under refused handshakes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import websockets.asyncio.client
import websockets.exceptions

from gateway import FilePart, ImagePart, Sender, Survey, TextPart
from gateway.testing import GatewayProcess, wait_for_status

from .conftest import Visitor, inbound, reply, webchat

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
ROOT = Path(__file__).resolve().parents[2]


def base(gw) -> str:
    return f"http://127.0.0.1:{gw.http.port}/channels/web"


async def test_a_retried_frame_id_with_other_words_is_acknowledged_with_the_words_that_were_stored(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    first = await v.say("my order is 4711", "c-1")
    again = await v.say("my order is 9999", "c-1")  # same id, other text: a duplicate of the first
    assert first["message"]["text"] == again["message"]["text"] == "my order is 4711"
    [msg] = await inbound(nats_server.url)
    assert msg.parts == [TextPart(text="my order is 4711")]
    [kept] = (await Visitor.connect(gw.http.port, f"?token={v.token}")).history
    assert kept["text"] == "my order is 4711"


async def test_tabs_racing_on_a_survey_are_all_told_the_one_answer_that_was_kept(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    first = await Visitor.connect(gw.http.port)
    await first.say("thanks", "c-0")
    [msg] = await inbound(nats_server.url)
    tabs = [first] + [await Visitor.connect(gw.http.port, f"?token={first.token}") for _ in range(3)]
    await reply(nats_server.url, msg.conversation, "s-1", "How did we do?", kind="survey",
                survey=Survey(choices=["满意", "一般", "不满意", "很差"]))
    for tab in tabs:
        await tab.next("message")
    await asyncio.gather(*(tab.send({"type": "choice", "id": f"k-{i}", "survey": "s-1", "index": i})
                           for i, tab in enumerate(tabs)))
    told: set[str] = set()
    answered: set[int] = set()
    for i, tab in enumerate(tabs):
        async with asyncio.timeout(5):
            while True:
                frame = await tab.next()
                if frame.get("id") == f"k-{i}" and frame["type"] in ("ack", "error"):
                    break
        if frame["type"] == "ack":
            told.add(frame["message"]["text"])
        answered |= {f["index"] for f in tab.frames if f["type"] == "answered"}
    [answer] = [m for m in await inbound(nats_server.url) if m.id != msg.id]
    kept = answer.parts[0].text
    assert told == {kept} and answered == {["满意", "一般", "不满意", "很差"].index(kept)}


async def test_a_wait_is_told_in_whole_seconds_never_as_zero(gateway_factory):
    # 240 a minute: the bucket refills every 0.25 s, so a refusal's wait is below half a second.
    gw = await gateway_factory({"web": webchat(messages_per_minute=240, messages_per_address_minute=240)})
    v = await Visitor.connect(gw.http.port)
    for i in range(80):
        answer = await v.say(f"m{i}", f"c-{i}")
        if answer["type"] == "error":
            break
    assert answer["code"] == "rate_limited", answer
    assert re.fullmatch(r"too many messages, try again in [1-9][0-9]* s", answer["message"]), answer["message"]
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        for i in range(80):
            r = await c.post(f"/upload?id=i-{i}", content=PNG,
                             headers={"Authorization": f"Bearer {v.token}", "Content-Type": "image/png"})
            if r.status_code == 429:
                break
    assert r.status_code == 429 and re.fullmatch(r"too many messages, try again in [1-9][0-9]* s\n", r.text), r.text


async def test_a_reply_with_a_pdf_is_sent_whole_the_file_as_a_download_of_the_visitor_only(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v, other = await Visitor.connect(gw.http.port), await Visitor.connect(gw.http.port)
    await v.say("please send the invoice", "c-1")
    [msg] = await inbound(nats_server.url)
    await reply(nats_server.url, msg.conversation, "r-pdf",
                parts=[TextPart(text="Here is your invoice."),
                       FilePart(data=PDF, filename="../发票 2026:12.pdf", content_type="application/pdf")])
    shown = (await v.next("message"))["message"]
    assert shown["text"] == "Here is your invoice."
    assert shown["attachments"] == [{"type": "application/pdf", "name": "发票 2026_12.pdf", "size": len(PDF),
                                     "image": False}]
    await wait_for_status(nats_server.url, "r-pdf", "sent")
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        got = await c.get("/media/r-pdf/0", headers={"Authorization": f"Bearer {v.token}"})
        assert got.status_code == 200 and got.content == PDF
        assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''%E5%8F%91%E7%A5%A8%202026_12.pdf"
        assert got.headers["content-type"] == "application/pdf"
        theirs = await c.get("/media/r-pdf/0", headers={"Authorization": f"Bearer {other.token}"})
        assert theirs.status_code == 404


async def test_a_file_the_desk_keeps_elsewhere_is_a_link_and_a_part_that_cannot_be_shown_is_left_out(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    await v.say("manual?", "c-1")
    [msg] = await inbound(nats_server.url)
    await reply(nats_server.url, msg.conversation, "r-url", parts=[
        TextPart(text="The manual:"),
        FilePart(url="https://cdn.example.com/manual.pdf", filename="manual.pdf", content_type="application/pdf"),
        ImagePart(url="javascript:alert(1)", content_type="image/png")])
    shown = (await v.next("message"))["message"]
    assert shown["text"] == "The manual:" and shown["attachments"] == [
        {"type": "application/pdf", "name": "manual.pdf", "size": 0, "image": False,
         "url": "https://cdn.example.com/manual.pdf"}]
    [sent] = [s for s in await wait_for_status(nats_server.url, "r-url", "sent") if s.state == "sent"]
    assert sent.meta["dropped"] == ["image part 3: no content and no http(s) URL"]


async def test_the_agents_name_and_picture_travel_with_the_reply_and_an_unsafe_picture_is_dropped(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    await v.say("hello", "c-1")
    [msg] = await inbound(nats_server.url)
    await reply(nats_server.url, msg.conversation, "r-1", "Hi, Lin here.",
                sender=Sender(name="Lin", avatar_url="https://cdn.example.com/lin.png"))
    await reply(nats_server.url, msg.conversation, "r-2", "And me.",
                sender=Sender(name="Bo", avatar_url="javascript:alert(1)"))
    lin = (await v.next("message"))["message"]
    bo = (await v.next("message"))["message"]
    assert (lin["agent"], lin["avatar"]) == ("Lin", "https://cdn.example.com/lin.png")
    assert bo["agent"] == "Bo" and "avatar" not in bo


async def test_typing_and_reading_are_outbounds_without_parts_shown_live_and_reading_is_kept(
        gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port)
    await v.say("first", "c-1")
    await v.say("second", "c-2")
    first, second = await inbound(nats_server.url)
    await reply(nats_server.url, first.conversation, "t-1", meta={"typing": True}, sender=Sender(name="Lin"))
    assert await v.next("typing") == {"type": "typing", "on": True, "agent": "Lin"}
    await reply(nats_server.url, first.conversation, "read-1", meta={"read": first.id})
    assert await v.next("read") == {"type": "read", "ids": [first.id]}
    history = (await Visitor.connect(gw.http.port, f"?token={v.token}")).history
    assert [e.get("state") for e in history] == ["read", None]
    await reply(nats_server.url, first.conversation, "r-1", "An answer reads the rest.")
    assert await v.next("read") == {"type": "read", "ids": [second.id]}
    await reply(nats_server.url, first.conversation, "bad", meta={"typing": "yes"})
    [dead] = [s for s in await wait_for_status(nats_server.url, "bad", "dead") if s.state == "dead"]
    assert dead.error is not None and dead.error.code == "empty"


async def test_a_visitors_page_locale_and_browser_are_in_the_meta_of_their_messages(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()})
    v = await Visitor.connect(gw.http.port, user_agent_header="Mozilla/5.0 TestBrowser/1.0")
    await v.send({"type": "context", "page": "https://shop.example.com/cart?step=2", "referrer": "javascript:x",
                  "locale": "zh-CN", "timezone": "Asia/Shanghai"})
    await v.say("hi", "c-1")
    [msg] = await inbound(nats_server.url)
    assert msg.meta == {"visitor": "anonymous", "page": "https://shop.example.com/cart?step=2", "locale": "zh-CN",
                        "timezone": "Asia/Shanghai", "browser": "Mozilla/5.0 TestBrowser/1.0"}


async def test_a_refusal_of_the_http_layer_can_be_read_by_the_embedding_page(gateway_factory):
    gw = await gateway_factory({"web": webchat(max_upload_size=4096, allowed_origins=["https://shop.example.com"])})
    v = await Visitor.connect(gw.http.port)
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        r = await c.post("/upload?id=i-1", content=b"\xff\xd8\xff" + b"\x00" * 5000, headers={
            "Authorization": f"Bearer {v.token}", "Content-Type": "image/jpeg", "Origin": "https://shop.example.com"})
    assert r.status_code == 413 and r.headers["access-control-allow-origin"] == "*"
    assert r.text == "body exceeds 4096 bytes (the limit of channel 'web')\n"


async def test_the_upload_limit_is_the_channels_own_above_the_http_max_body(gateway_factory, nats_server):
    gw = await gateway_factory({"web": webchat()}, http={"max_body": 1048576})
    v = await Visitor.connect(gw.http.port)
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * (3 * 4096)  # 3 MiB
    async with httpx.AsyncClient(base_url=base(gw), timeout=30) as c:
        r = await c.post("/upload?id=i-1&name=IMG_0001.jpg", content=photo,
                         headers={"Authorization": f"Bearer {v.token}", "Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    [msg] = await inbound(nats_server.url)
    [part] = msg.parts
    assert isinstance(part, ImagePart) and part.size == len(photo) and part.filename == "IMG_0001.jpg"


async def test_status_tells_a_page_whether_it_may_use_the_chat(gateway_factory):
    gw = await gateway_factory({"web": webchat(allowed_origins=["https://shop.example.com"])})
    async with httpx.AsyncClient(base_url=base(gw)) as c:
        ok = await c.get("/status", headers={"Origin": "https://shop.example.com"})
        no = await c.get("/status", headers={"Origin": "https://evil.example.net"})
    assert ok.status_code == 200 and ok.json()["ok"] is True
    assert no.status_code == 403 and no.json()["code"] == "origin_not_allowed"
    assert no.headers["access-control-allow-origin"] == "https://evil.example.net"  # readable: it says only "no"


def test_refused_handshakes_are_counted_and_logged_throttled_without_uvicorns_raw_line(tmp_path: Path) -> None:
    proc = GatewayProcess(tmp_path, channels='[channels.web]\ntype = "webchat"\n'
                                             'allowed_origins = ["https://shop.example.com"]\n')
    proc.start()
    try:
        async def attack() -> None:
            for _ in range(40):
                try:
                    async with websockets.asyncio.client.connect(
                            f"ws://127.0.0.1:{proc.http_port}/channels/web/ws", origin="https://evil.example.net",
                            open_timeout=5):
                        raise AssertionError("accepted")
                except websockets.exceptions.InvalidStatus as exc:
                    assert exc.response.status_code == 403

        asyncio.run(attack())
        metrics = httpx.get(f"http://127.0.0.1:{proc.http_port}/metrics").text
        assert re.search(r'gateway_websocket_refused_total\{[^}]*reason="origin"[^}]*\} 40\.0', metrics) or \
            re.search(r'gateway_websocket_refused_total\{[^}]*reason="403"[^}]*\} 40\.0', metrics), metrics
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    lines = proc.logs().splitlines()
    assert not [ln for ln in lines if "without completing handshake" in ln]
    refused = [json.loads(ln) for ln in lines if '"websocket refused"' in ln]
    assert 1 <= len(refused) <= 2 and refused[0]["status"] == 403  # one line per 10 s, the rest counted


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_check_config_warns_about_limits_that_contradict_each_other(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[bus]\nmax_message_size = 2048\n[http]\nbody_timeout = "5s"\n'
                      '[channels.web]\ntype = "webchat"\nmax_upload_size = 20971520\nmessages_per_minute = 30\n'
                      'messages_per_address_minute = 10\n')
    done = check_config(config)
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stdout.splitlines() if ": warning: " in ln]
    assert [w.split(": warning: ")[1].split(" (")[0] for w in warnings] == [
        "channels.web: max_message_chars", "channels.web: max_upload_size",
        "channels.web: messages_per_address_minute"], done.stdout
    assert "[bus] max_message_size (2048)" in warnings[0] and "[http] body_timeout (5s)" in warnings[1]


def test_the_example_configuration_checks_without_a_warning() -> None:
    done = check_config(ROOT / "gateway.example.toml")
    assert done.returncode == 0 and "warning" not in done.stdout, done.stdout + done.stderr


def doc_block(language: str, after: str) -> str:
    """The first ``language`` code block after the line containing ``after`` in webchat.md."""
    text = (ROOT / "docs/channels/webchat.md").read_text()
    return text[text.index(after):].split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_strings_table_has_every_key_in_both_languages_and_the_docs_list_them() -> None:
    from plugins.webchat._config import STRING_KEYS

    script = (ROOT / "plugins/webchat/static/widget.js").read_text()
    tables = script[script.index("var STRINGS = {"):script.index("function pickLanguage")]
    en, zh = tables.split('"zh-CN": {')
    key = re.compile(r'(?:^|[{,\s])"?([a-z_]+)"?:\s*"', re.M)
    assert set(key.findall(en.split('"en": {')[1])) == STRING_KEYS
    assert set(key.findall(zh)) == STRING_KEYS
    doc = (ROOT / "docs/channels/webchat.md").read_text()
    listed = doc[doc.index("The keys: "):doc.index("(placeholders in braces")]
    assert set(re.findall(r"`([a-z_]+)`", listed)) == STRING_KEYS


def test_the_documented_strings_section_is_a_valid_configuration(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[channels.web]\ntype = "webchat"\n' + doc_block("toml", "its strings table"))
    done = check_config(config)
    assert done.returncode == 0, done.stdout + done.stderr
    config.write_text('[channels.web]\ntype = "webchat"\n[channels.web.strings.zh-CN]\nsnd = "发出"\n')
    wrong = check_config(config)
    assert wrong.returncode != 0 and "strings.zh-CN: unknown key(s) snd" in wrong.stdout + wrong.stderr
