"""What a visitor of a company's website expects of its chat box, in Debian's chromium at a
desktop's size and at a phone's (360×640): notices of replies, times and ticks, the agent's
name, picture and typing, links, emoji, files, branding, languages, the page's context for
the agent and a JavaScript API; and the defects that made it undeployable (a phone's photo,
long pastes, scrolling past images, refused sites, look-alike states, a clipped box).

Each test saves a screenshot ``<test>-<screen>.png`` under pytest's temporary directory."""

from __future__ import annotations

import hashlib
import hmac
import re
import signal
import struct
import tomllib
import uuid
import zlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from gateway import FilePart, ImagePart, Sender, TextPart
from gateway.testing import GatewayProcess

from .conftest import inbound, reply
from .test_browser import Site, demo, eventually, on_bus, published, start_chat, write

ROOT = Path(__file__).resolve().parents[2]
USER_SECRET = "site-user-secret-for-the-api-test"
SCREENS = {"desktop": {"width": 1280, "height": 720}, "phone": {"width": 360, "height": 640}}
W = "#gw-webchat"


def png(width: int, height: int, rgb: tuple[int, int, int] = (31, 111, 235)) -> bytes:
    """A real PNG of one colour (its size matters: the layout changes when it is drawn)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def shop() -> Iterator[Site]:
    site = Site()
    site.files["/lin.png"] = ("image/png", png(48, 48, (200, 80, 40)))
    yield site
    site.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, shop: Site) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("widget"), channels=(
        f'[channels.web]\ntype = "webchat"\nallowed_origins = ["{shop.url}"]\nsound = true\n'
        f'user_secret = "{USER_SECRET}"\nupload_types = ["image/png", "image/jpeg", "application/pdf"]\n'))
    proc.start()
    shop.embed(proc)
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.logs()


@pytest.fixture(params=list(SCREENS))
def screen(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def page(browser: Browser, screen: str) -> Iterator[Page]:
    phone = screen == "phone"
    ctx = browser.new_context(viewport=SCREENS[screen], is_mobile=phone, has_touch=phone, locale="en-US",
                              timezone_id="Asia/Shanghai", accept_downloads=True)
    yield ctx.new_page()
    ctx.close()


def snap(page: Page, shots: Path, request: pytest.FixtureRequest, what: str = "") -> None:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    page.screenshot(path=shots / f"{name}{'-' + what if what else ''}.png")


def shadow(page: Page, script: str) -> Any:
    """Evaluate ``script`` with ``r`` bound to the widget's shadow root."""
    return page.evaluate(f"() => {{ const r = document.querySelector('{W}').shadowRoot; {script} }}")


def unique(text: str) -> str:
    """``text`` made unique (both screens of a test share the module's gateway)."""
    return f"{text} #{uuid.uuid4().hex[:6]}"


def oid(name: str) -> str:
    """A unique outbound id (the bus drops a second outbound with the same id)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def tell(page: Page, gateway: GatewayProcess, text: str) -> str:
    """Write ``text`` (made unique) in the widget; its conversation key on the bus."""
    text = unique(text)
    write(page, text)
    return str(published(gateway, text).conversation)


# --- notices of a reply --------------------------------------------------------------------


def test_a_reply_to_a_closed_box_shows_an_unread_badge_a_title_notice_and_plays_the_sound(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Ann")
    conversation = tell(page, gateway, "Badge please")
    page.get_by_role("button", name="Close chat").click()
    on_bus(reply(gateway.bus_url, conversation, oid("r-badge-1"), "First answer"))
    on_bus(reply(gateway.bus_url, conversation, oid("r-badge-2"), "Second answer"))
    badge = page.locator(f"{W} .badge")
    expect(badge).to_have_text("2")
    expect(page).to_have_title(re.compile(r"^\(2\) New message · .*web chat demo$"))
    assert int(page.locator(W).get_attribute("data-sounds") or 0) >= 1
    snap(page, shots, request)
    page.get_by_role("button", name="Open chat (2)").click()
    expect(badge).to_be_hidden()
    expect(page).to_have_title(re.compile(r"^[^(].*web chat demo$"))


# --- times, days, ticks ----------------------------------------------------------------------


def test_messages_show_their_time_a_day_separator_and_ticks_that_turn_to_read(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Ben")
    conversation = tell(page, gateway, "When do you open?")
    mine = page.locator(".msg.visitor", has_text="When do you open?")
    expect(mine.locator(".tick")).to_have_text("✓")
    on_bus(reply(gateway.bus_url, conversation, oid("r-ticks"), "At nine."))
    expect(mine).to_have_attribute("data-state", "read")  # an answer means the desk read it
    expect(mine.locator(".tick")).to_have_text("✓✓")
    expect(page.locator(f"{W} .day")).to_have_text(["Today"])
    shown = page.locator(".msg.agent", has_text="At nine.").locator(".meta").inner_text()
    assert re.fullmatch(r"\d{1,2}:\d{2}( [AP]M)?", shown), shown
    snap(page, shots, request, "today")
    # The same conversation seen the next day: yesterday's messages under "Yesterday".
    page.clock.set_system_time(datetime.now(timezone.utc) + timedelta(days=1))
    page.reload()
    expect(page.locator(f"{W} .day")).to_have_text(["Yesterday"])


# --- the agent: name, picture, typing ----------------------------------------------------------


def test_the_agents_typing_name_and_picture_are_shown(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    page.goto(shop.url)  # the picture is on another host: the shop's page has no CSP against it
    page.get_by_placeholder("Your name").fill("Cai")
    page.get_by_role("button", name="Start chat").click()
    conversation = tell(page, gateway, "Anyone?")
    on_bus(reply(gateway.bus_url, conversation, oid("t-lin"), meta={"typing": True}, sender=Sender(name="Lin")))
    typing = page.locator(f"{W} .typing")
    expect(typing).to_have_text("Lin is typing…")
    snap(page, shots, request, "typing")
    on_bus(reply(gateway.bus_url, conversation, oid("r-lin"), "Lin here, how can I help?",
                 sender=Sender(name="Lin", avatar_url=f"{shop.url}/lin.png")))
    answer = page.locator(".msg.agent", has_text="Lin here")
    expect(answer.locator(".who")).to_have_text("Lin")
    expect(typing).to_be_hidden()
    page.wait_for_function(f"() => {{ const i = document.querySelector('{W}').shadowRoot"
                           f".querySelector('.who img'); return i && i.complete && i.naturalWidth === 48 }}")
    snap(page, shots, request)


# --- links, emoji, files ----------------------------------------------------------------------


def test_links_in_a_reply_open_safely_and_other_schemes_stay_text(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Dee")
    conversation = tell(page, gateway, "Where can I read more?")
    text = ("See https://www.example.com/help?a=1&b=2. Or write to help@example.com, "
            "never javascript:alert(1) nor <a href=javascript:alert(2)>this</a>.")
    on_bus(reply(gateway.bus_url, conversation, oid("r-links"), text))
    answer = page.locator(".msg.agent", has_text="See ")
    expect(answer).to_contain_text("<a href=javascript:alert(2)>this</a>")
    links = answer.locator("a")
    expect(links).to_have_count(2)
    assert [links.nth(i).get_attribute("href") for i in range(2)] == [
        "https://www.example.com/help?a=1&b=2", "mailto:help@example.com"]
    for i in range(2):
        assert links.nth(i).get_attribute("rel") == "noopener noreferrer"
        assert links.nth(i).get_attribute("target") == "_blank"
    snap(page, shots, request)


def test_an_emoji_picked_is_inserted_where_the_cursor_is_and_sent(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Eli")
    box = page.get_by_placeholder("Type a message")
    tail = unique("")
    box.fill("Thanks !" + tail)
    box.evaluate("b => b.setSelectionRange(7, 7)")
    page.get_by_role("button", name="Insert an emoji").click()
    snap(page, shots, request)
    page.get_by_role("button", name="👍").click()
    expect(box).to_have_value("Thanks 👍!" + tail)
    page.get_by_role("button", name="Send", exact=True).click()
    published(gateway, "Thanks 👍!" + tail)


def test_a_pdf_goes_both_ways_as_a_download_and_a_type_not_accepted_is_refused_with_its_reason(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    start_chat(page, gateway, "Fei")
    conversation = tell(page, gateway, "I attach my contract")
    contract = tmp_path / "合同.pdf"
    contract.write_bytes(b"%PDF-1.4\n% the visitor's contract\n%%EOF\n")
    page.locator(f"{W} input[type=file]").set_input_files(str(contract))
    expect(page.locator(".msg.visitor .file", has_text="合同.pdf")).to_be_visible()

    def uploaded() -> Any:
        return next((m for m in on_bus(inbound(gateway.bus_url)) if m.conversation == conversation
                     and m.parts and isinstance(m.parts[0], FilePart)), None)

    [part] = eventually(uploaded).parts
    assert isinstance(part, FilePart) and part.filename == "合同.pdf" and part.content_type == "application/pdf"

    invoice = b"%PDF-1.4\n% the invoice\n%%EOF\n"
    on_bus(reply(gateway.bus_url, conversation, oid("r-invoice"), parts=[
        TextPart(text="Signed, and here is the invoice."),
        FilePart(data=invoice, filename="invoice-4711.pdf", content_type="application/pdf", size=len(invoice))]))
    link = page.locator(".msg.agent .file", has_text="invoice-4711.pdf")
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == "invoice-4711.pdf"
    assert Path(download.value.path()).read_bytes() == invoice

    notes = tmp_path / "notes.txt"
    notes.write_text("plain text")
    page.locator(f"{W} input[type=file]").set_input_files(str(notes))
    expect(page.locator(f"{W} .err")).to_have_text("This file type cannot be sent.")
    liar = tmp_path / "photo.png"
    liar.write_text("<html>not a picture</html>")
    page.locator(f"{W} input[type=file]").set_input_files(str(liar))
    refused = page.locator(".msg.visitor", has_text="photo.png")
    expect(refused).to_have_attribute("data-state", "failed")
    expect(refused.locator(".tick")).to_have_text("not sent: This file type cannot be sent.")
    snap(page, shots, request)


# --- branding and languages --------------------------------------------------------------------


def test_colour_position_title_and_launcher_icon_come_from_the_script_tag(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest,
        screen: str) -> None:
    shop.embed(gateway, attributes=f'data-color="#0a7d4f" data-position="left" data-title="Shop help" '
                                   f'data-launcher-icon="{shop.url}/lin.png"')
    try:
        page.goto(shop.url)
        launcher = page.get_by_role("button", name="Open chat")
        expect(launcher).to_be_visible()
        assert launcher.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(10, 125, 79)"
        box = launcher.bounding_box()
        assert box is not None and box["x"] < SCREENS[screen]["width"] / 2  # bottom left
        page.wait_for_function(f"() => {{ const i = document.querySelector('{W}').shadowRoot"
                               f".querySelector('.launcher img'); return i && i.naturalWidth === 48 }}")
        snap(page, shots, request, "closed")
        launcher.click()
        expect(page.locator(f"{W} .title")).to_have_text("Shop help")
        snap(page, shots, request, "open")
    finally:
        shop.embed(gateway)


def test_the_widget_speaks_the_pages_language_or_the_browsers_and_the_script_tag_can_choose(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    try:
        shop.embed(gateway, lang="zh-CN")
        page.goto(shop.url)
        expect(page.get_by_placeholder("您的称呼")).to_be_visible()
        page.get_by_placeholder("您的称呼").fill("王小姐")
        page.get_by_role("button", name="开始咨询").click()
        expect(page.get_by_placeholder("请输入消息")).to_be_visible()
        expect(page.get_by_role("button", name="发送", exact=True)).to_be_visible()
        expect(page.locator(f"{W} .status")).to_have_text("在线")
        expect(page.locator(f"{W} .msg.welcome")).to_have_text("您好！请问有什么可以帮您？")
        page.get_by_placeholder("请输入消息").fill("你好，我的订单到哪了？")
        page.get_by_role("button", name="发送", exact=True).click()
        expect(page.locator(".msg.visitor", has_text="我的订单")).to_have_attribute("data-state", "sent")
        expect(page.locator(f"{W} .day")).to_have_text(["今天"])
        snap(page, shots, request, "zh-CN")
        shop.embed(gateway, attributes='data-open="true" data-lang="en"', lang="zh-CN")
        page.reload()
        expect(page.get_by_placeholder("Type a message")).to_be_visible()
    finally:
        shop.embed(gateway)


def test_a_page_without_a_language_gets_the_browsers(browser: Browser, gateway: GatewayProcess, shop: Site,
                                                     screen: str) -> None:
    ctx = browser.new_context(viewport=SCREENS[screen], locale="zh-CN")
    try:
        page = ctx.new_page()
        page.goto(shop.url)  # the shop's page has no lang attribute
        expect(page.get_by_placeholder("您的称呼")).to_be_visible()
    finally:
        ctx.close()


def test_the_channels_own_branding_language_and_words(
        browser: Browser, tmp_path: Path, screen: str, shots: Path, request: pytest.FixtureRequest) -> None:
    proc = GatewayProcess(tmp_path, channels=(
        '[channels.web]\ntype = "webchat"\ncolor = "#c0392b"\nposition = "left"\ntitle = "小店客服"\n'
        'language = "zh-CN"\nprechat = false\n[channels.web.strings.zh-CN]\nsend = "发出"\n'))
    proc.start()
    ctx = browser.new_context(viewport=SCREENS[screen], locale="en-US")
    try:
        page = ctx.new_page()
        page.goto(demo(proc))  # the demo page says lang="en": the channel's language wins
        expect(page.get_by_role("button", name="发出", exact=True)).to_be_visible()
        expect(page.locator(f"{W} .title")).to_have_text("小店客服")
        head = page.locator(f"{W} .head").evaluate("h => getComputedStyle(h).backgroundColor")
        assert head == "rgb(192, 57, 43)"
        snap(page, shots, request)
    finally:
        ctx.close()
        proc.signal(signal.SIGTERM)
        proc.wait()


# --- the page's context for the agent, the JavaScript API ------------------------------------


def test_the_page_referrer_locale_time_zone_and_browser_reach_the_agent(
        gateway: GatewayProcess, shop: Site, page: Page) -> None:
    page.goto(shop.url + "/cart?step=2", referer="https://search.example.com/?q=shop")
    page.get_by_placeholder("Your name").fill("Gus")
    page.get_by_role("button", name="Start chat").click()
    text = unique("Question about my cart")
    write(page, text)
    msg = published(gateway, text)
    assert msg.meta["page"] == shop.url + "/cart?step=2"
    assert msg.meta["referrer"] == "https://search.example.com/?q=shop"
    assert msg.meta["locale"] == "en-US" and msg.meta["timezone"] == "Asia/Shanghai"
    assert "Chrome/" in msg.meta["browser"]


def test_the_page_opens_closes_identifies_and_hears_replies_through_the_javascript_api(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    shop.embed(gateway, attributes="")
    try:
        page.goto(shop.url)
        page.wait_for_function("() => window.GatewayWebchat !== undefined")
        page.evaluate("() => { window.heard = []; GatewayWebchat.on('message', m => window.heard.push(m)); }")
        signature = hmac.new(USER_SECRET.encode(), b"customer-77", hashlib.sha256).hexdigest()
        page.evaluate("([id, sig]) => GatewayWebchat.identify(id, sig)", ["customer-77", signature])
        page.evaluate("() => GatewayWebchat.open()")
        expect(page.get_by_placeholder("Type a message")).to_be_visible()  # a signed-in user: no form
        text = unique("Signed in and asking")
        write(page, text)
        msg = published(gateway, text)
        assert msg.sender.id == "u-customer-77"
        page.evaluate("() => GatewayWebchat.close()")
        expect(page.get_by_placeholder("Type a message")).to_be_hidden()
        api = oid("r-api")
        on_bus(reply(gateway.bus_url, msg.conversation, api, "Heard through the API",
                     sender=Sender(name="Lin")))
        heard = eventually(lambda: page.evaluate("() => window.heard"))
        assert [(m["id"], m["text"], m["agent"]) for m in heard] == [(api, "Heard through the API", "Lin")]
        snap(page, shots, request)
    finally:
        shop.embed(gateway)


# --- the defects --------------------------------------------------------------------------------


def test_a_3_mb_photo_is_sent_with_the_example_configuration(
        browser: Browser, tmp_path: Path, screen: str, shots: Path, request: pytest.FixtureRequest) -> None:
    proc = GatewayProcess(tmp_path)
    example = (ROOT / "gateway.example.toml").read_text()
    assert tomllib.loads(example)["channels"]["web"]["type"] == "webchat"
    # Only where it listens and keeps its data change: every limit is the example's own.
    mine = re.sub(r"(?m)^port = 8080\b", f"port = {proc.http_port}", example)
    mine = re.sub(r"(?m)^embedded_port = \d+", f"embedded_port = {proc.nats_port}", mine)
    mine = mine.replace('data_dir = "./data/nats"', f'data_dir = "{tmp_path / "nats"}"')
    if "embedded_port" not in mine:
        mine = mine.replace("[bus]\n", f"[bus]\nembedded_port = {proc.nats_port}\n", 1)
    assert mine.count(str(proc.http_port)) == 1 and mine.count(str(proc.nats_port)) == 1
    proc.config.write_text(mine)
    proc.start()
    ctx = browser.new_context(viewport=SCREENS[screen])
    try:
        page = ctx.new_page()
        page.goto(f"http://127.0.0.1:{proc.http_port}/channels/web/demo")
        page.get_by_placeholder("Your name").fill("Han")
        page.get_by_role("button", name="Start chat").click()
        expect(page.get_by_placeholder("Type a message")).to_be_visible()
        photo = tmp_path / "IMG_2046.png"
        big = png(1024, 1024)
        noise = hashlib.sha256(b"x").digest() * (3 * 1024 * 1024 // 32)  # incompressible-ish filler after IEND
        photo.write_bytes(big + noise)
        assert photo.stat().st_size > 3 * 1024 * 1024
        page.locator(f"{W} input[type=file]").set_input_files(str(photo))
        sent = page.locator(".msg.visitor img.pic")
        expect(sent).to_have_count(1, timeout=20000)
        page.wait_for_function(f"() => {{ const i = document.querySelector('{W}').shadowRoot"
                               f".querySelector('.msg.visitor img.pic'); return i && i.naturalWidth === 1024 }}")

        def probe() -> Any:
            return next((m for m in on_bus(inbound(proc.bus_url)) if m.parts and isinstance(m.parts[0], ImagePart)), None)

        [part] = eventually(probe).parts
        assert isinstance(part, ImagePart) and part.size == photo.stat().st_size
        snap(page, shots, request)
    finally:
        ctx.close()
        proc.signal(signal.SIGTERM)
        proc.wait()


def test_a_long_paste_is_refused_visibly_and_never_cut(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Ivy")
    box = page.get_by_placeholder("Type a message")
    box.click()
    long = "x" * 4500
    page.keyboard.insert_text(long)  # what a paste does
    expect(box).to_have_value(long)  # nothing cut
    expect(page.locator(f"{W} .err")).to_have_text("Too long: 4500 of 4000 characters. Shorten it or send it in parts.")
    expect(page.get_by_role("button", name="Send", exact=True)).to_be_disabled()
    box.press("Enter")
    snap(page, shots, request)
    fits = unique("").strip() + "x" * 3992
    box.fill(fits)
    expect(page.locator(f"{W} .err")).to_be_hidden()
    page.get_by_role("button", name="Send", exact=True).click()
    msg = published(gateway, fits)
    assert [m.parts for m in on_bus(inbound(gateway.bus_url)) if m.conversation == msg.conversation] == [
        [TextPart(text=fits)]]  # the long one was never sent, not even cut


def test_the_newest_message_is_in_view_once_the_images_above_it_are_drawn(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Jun")
    conversation = tell(page, gateway, "Show me the colours")
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (40, 60, 200)]):
        on_bus(reply(gateway.bus_url, conversation, oid(f"r-pic-{i}"),
                     parts=[ImagePart(data=png(600, 450, colour), content_type="image/png")]))
    on_bus(reply(gateway.bus_url, conversation, oid("r-last"), "The newest message"))
    expect(page.locator(".msg.agent", has_text="The newest message")).to_be_visible()
    page.reload()  # a visitor coming back: the history is drawn, then its images arrive
    newest = page.locator(".msg.agent", has_text="The newest message")
    page.wait_for_function(f"() => [...document.querySelector('{W}').shadowRoot.querySelectorAll('img.pic')]"
                           f".filter(i => i.complete && i.naturalWidth === 600).length === 3")
    expect(newest).to_be_in_viewport()
    at_bottom = shadow(page, "const l = r.querySelector('.list'); return l.scrollTop + l.clientHeight >= l.scrollHeight - 4;")
    assert at_bottom
    snap(page, shots, request)


def test_a_site_that_is_not_listed_is_told_the_chat_is_unavailable(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    other = Site()
    try:
        other.embed(gateway)
        page.goto(other.url)
        expect(page.locator(f"{W} .status")).to_have_text("Chat unavailable")
        expect(page.locator(f"{W} .notice")).to_have_text("The chat is not available on this site.")
        assert page.locator(W).get_attribute("data-status") == "down"
        snap(page, shots, request)
    finally:
        other.close()


def test_a_lost_connection_and_offline_hours_look_different(
        browser: Browser, tmp_path: Path, screen: str, shots: Path, request: pytest.FixtureRequest) -> None:
    now = datetime.now(timezone.utc)
    start, end = (now - timedelta(hours=1)).strftime("%H:%M"), (now + timedelta(hours=2)).strftime("%H:%M")
    proc = GatewayProcess(tmp_path, channels=(
        f'[channels.web]\ntype = "webchat"\nprechat = false\n'
        f'offline_hours = {{ start = "{start}", end = "{end}", tz = "UTC" }}\n'))
    proc.start()
    ctx = browser.new_context(viewport=SCREENS[screen])
    try:
        page = ctx.new_page()
        page.goto(demo(proc))
        expect(page.locator(f"{W} .status")).to_have_text("Away — we reply later")
        expect(page.locator(f"{W} .notice")).to_contain_text("We are offline right now")
        away = page.locator(f"{W} .dot").evaluate("d => getComputedStyle(d).backgroundColor")
        snap(page, shots, request, "offline-hours")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        expect(page.locator(f"{W} .status")).to_have_text("Connecting…")
        lost = page.locator(f"{W} .dot").evaluate("d => getComputedStyle(d).backgroundColor")
        assert away != lost
        snap(page, shots, request, "disconnected")
    finally:
        ctx.close()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
            proc.wait()


def test_delete_is_offered_only_once_there_is_something_to_delete(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Kai")
    delete = page.get_by_role("button", name="Delete", exact=True)
    expect(page.get_by_role("button", name="Close chat")).to_be_visible()
    expect(delete).to_be_hidden()
    snap(page, shots, request, "new")
    write(page, unique("Now there is a message"))
    expect(delete).to_be_visible()


def test_the_message_box_grows_with_what_is_typed_instead_of_clipping_it(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Lea")
    box = page.get_by_placeholder("Type a message")
    one = box.bounding_box()
    box.fill("line one\nline two\nline three\nline four")
    four = box.bounding_box()
    assert one is not None and four is not None and four["height"] > one["height"] + 30
    assert box.evaluate("b => b.scrollHeight <= b.clientHeight + 2")  # nothing hidden
    box.fill("\n".join(f"line {i}" for i in range(30)))
    many = box.bounding_box()
    assert many is not None and many["height"] <= 142  # then it scrolls, the messages stay in view
    snap(page, shots, request)


def test_the_documented_javascript_api_example_works_as_pasted(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    doc = (ROOT / "docs/channels/webchat.md").read_text()
    block = doc[doc.index("### The page's JavaScript API"):].split("```html\n", 1)[1].split("```", 1)[0]
    shop.page = ('<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1">'
                 '</head><body>' + block.replace("https://gateway.example.com", f"http://127.0.0.1:{gateway.http_port}")
                 + "</body></html>").encode()
    try:
        page.goto(shop.url)
        page.get_by_role("button", name="Need help?").click()
        page.get_by_placeholder("Your name").fill("Mia")
        page.get_by_role("button", name="Start chat").click()
        conversation = tell(page, gateway, "Through the documented page")
        on_bus(reply(gateway.bus_url, conversation, oid("r-doc"), "Hello Mia", sender=Sender(name="Lin")))
        expect(page.locator("#chat-news")).to_have_text("Lin: Hello Mia")
        snap(page, shots, request)
    finally:
        shop.embed(gateway)


def test_a_refusal_is_told_in_the_visitors_language(
        gateway: GatewayProcess, shop: Site, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    shop.embed(gateway, lang="zh-CN")
    try:
        page.goto(shop.url)
        page.get_by_placeholder("您的称呼").fill("王小姐")
        page.get_by_placeholder("电话（选填）").fill("call me maybe")
        page.get_by_role("button", name="开始咨询").click()
        expect(page.locator(f"{W} .err")).to_have_text("电话号码似乎不正确。")
        snap(page, shots, request)
    finally:
        shop.embed(gateway)


def test_a_visitor_writing_too_fast_is_told_how_long_to_wait_and_the_message_goes_after(
        gateway: GatewayProcess, page: Page, shots: Path, request: pytest.FixtureRequest) -> None:
    start_chat(page, gateway, "Noa")  # the profile took one of the burst of 5 (20 a minute)
    box = page.get_by_placeholder("Type a message")
    texts = [unique(f"quick {i}") for i in range(6)]
    for text in texts:
        box.fill(text)
        box.press("Enter")
    expect(page.locator(f"{W} .err")).to_have_text(re.compile(r"^Too many messages, try again in [1-9][0-9]* s\.$"))
    snap(page, shots, request)
    last = page.locator(".msg.visitor", has_text=texts[-1])
    expect(last).to_have_attribute("data-state", "sent", timeout=20000)  # sent again after the wait, once
    published(gateway, texts[-1])
