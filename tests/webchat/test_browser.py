"""The widget in a real browser: Playwright drives Debian's chromium against the demo page of
a real ``gateway run`` subprocess (embedded nats-server, no secret configured: the channel
generates its own). One browser for the module, a fresh browser context (its own
localStorage: its own visitor) per test. Screenshots go to ``webchat-screenshots*/`` under
pytest's temporary directory (``--basetemp`` to choose it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from gateway import ChoicePart, ImagePart, Survey, TextPart
from gateway.testing import GatewayProcess, free_port, statuses

from .conftest import inbound, reply

T = TypeVar("T")
PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5a1ae5b0000000049454e44ae426082")
DRAWN = ("() => { const i = document.querySelector('#gw-webchat').shadowRoot.querySelector('.msg.visitor img');"
         " return i && i.complete && i.naturalWidth === 1 }")


def on_bus(coro: Any) -> Any:
    """Run a bus coroutine to its end (in a thread: Playwright's sync API owns this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(30)


def eventually(probe: Callable[[], T | None], timeout: float = 10) -> T:
    """Poll ``probe`` until it returns something, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


class Site:
    """Another website (another origin: another port) whose page embeds the widget with the
    snippet of docs/channels/webchat.md; ``files`` are served too (an agent's picture)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.page = b""
        self.headers: dict[str, str] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                kind, body = site.files.get(self.path, ("text/html; charset=utf-8", site.page))
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for name, value in site.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def embed(self, gateway: GatewayProcess, attributes: str = 'data-open="true"', lang: str = "") -> None:
        html = f' lang="{lang}"' if lang else ""
        self.page = (f'<!doctype html><html{html}><head><meta name="viewport" content="width=device-width, initial-scale=1"><title>A shop</title></head><body><h1>A shop</h1>'
                     f'<script src="http://127.0.0.1:{gateway.http_port}/channels/web/widget.js" async {attributes}>'
                     f'</script></body></html>').encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def shop() -> Iterator[Site]:
    site = Site()
    yield site
    site.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, shop: Site) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("webchat"), channels=(
        f'[channels.web]\ntype = "webchat"\nallowed_origins = ["{shop.url}"]\n'))
    proc.start()
    shop.embed(proc)
    yield proc
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.logs()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    yield ctx
    ctx.close()


def demo(gateway: GatewayProcess) -> str:
    return f"http://127.0.0.1:{gateway.http_port}/channels/web/demo"


def start_chat(page: Page, gateway: GatewayProcess, name: str, email: str = "") -> None:
    """Open the demo page and fill in the pre-chat form."""
    page.goto(demo(gateway))
    page.get_by_placeholder("Your name").fill(name)
    if email:
        page.get_by_placeholder("Email (optional)").fill(email)
    page.get_by_role("button", name="Start chat").click()
    expect(page.get_by_placeholder("Type a message")).to_be_visible()


def write(page: Page, text: str) -> None:
    page.get_by_placeholder("Type a message").fill(text)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator(".msg.visitor", has_text=text)).to_have_attribute("data-state", "sent")


def published(gateway: GatewayProcess, text: str) -> Any:
    """The inbound message on the bus whose first part is ``text``."""
    def probe() -> Any:
        return next((m for m in on_bus(inbound(gateway.bus_url))
                     if m.parts and isinstance(m.parts[0], TextPart) and m.parts[0].text == text), None)
    return eventually(probe)


def refused_for_origin(gateway: GatewayProcess) -> float:
    """``gateway_websocket_refused_total`` of the channel for 403 (origin not allowed)."""
    text = httpx.get(f"http://127.0.0.1:{gateway.http_port}/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith("gateway_websocket_refused_total{")
                 and 'channel="web"' in ln and 'reason="403"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def states(gateway: GatewayProcess, outbound_id: str) -> list[str]:
    return [s.state for s in on_bus(statuses(gateway.bus_url, outbound_id))]


def test_a_message_typed_in_the_widget_reaches_the_bus_and_the_reply_shows_live_and_after_reload(
        gateway: GatewayProcess, context: BrowserContext, shots: Path) -> None:
    page = context.new_page()
    start_chat(page, gateway, "Alice", "alice@example.com")
    write(page, "Where is my order?")
    msg = published(gateway, "Where is my order?")
    assert msg.sender.name == "Alice" and msg.meta["email"] == "alice@example.com"
    assert msg.channel_type == "webchat" and msg.sender.id.startswith("v-")

    on_bus(reply(gateway.bus_url, msg.conversation, "r-live", "It ships today."))
    expect(page.locator(".msg.agent", has_text="It ships today.")).to_be_visible()
    eventually(lambda: "read" in states(gateway, "r-live"))

    page.reload()
    expect(page.locator(".msg.visitor", has_text="Where is my order?")).to_be_visible()
    expect(page.locator(".msg.agent", has_text="It ships today.")).to_be_visible()
    page.screenshot(path=shots / "demo.png")
    assert states(gateway, "r-live").count("read") == 1  # the reload reported nothing twice


def test_a_reply_published_while_the_visitor_is_away_is_shown_when_they_return_and_reported_read(
        gateway: GatewayProcess, context: BrowserContext) -> None:
    page = context.new_page()
    start_chat(page, gateway, "Bob")
    write(page, "Is anyone there?")
    conversation = published(gateway, "Is anyone there?").conversation
    page.close()

    on_bus(reply(gateway.bus_url, conversation, "r-away", "Sorry, we were out. Here now."))
    eventually(lambda: "sent" in states(gateway, "r-away"))
    assert "read" not in states(gateway, "r-away")  # nobody has seen it yet

    back = context.new_page()
    back.goto(demo(gateway))
    expect(back.locator(".msg.agent", has_text="Sorry, we were out. Here now.")).to_be_visible()
    eventually(lambda: "read" in states(gateway, "r-away"))
    assert states(gateway, "r-away")[-2:] == ["delivered", "read"]


def test_markup_in_a_reply_is_shown_as_text_and_never_run(gateway: GatewayProcess, context: BrowserContext) -> None:
    page = context.new_page()
    start_chat(page, gateway, "Carol")
    write(page, "Show me something")
    conversation = published(gateway, "Show me something").conversation
    evil = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    on_bus(reply(gateway.bus_url, conversation, "r-xss", evil))
    expect(page.locator(".msg.agent", has_text=evil)).to_be_visible()
    assert page.evaluate("window.pwned") is None
    assert page.locator("#gw-webchat img").count() == 0


def test_another_visitor_and_a_forged_token_cannot_read_the_conversation(
        gateway: GatewayProcess, browser: Browser) -> None:
    first, second = browser.new_context(), browser.new_context()
    try:
        page = first.new_page()
        start_chat(page, gateway, "Dan")
        write(page, "My order 4711 is late")
        theirs = page.evaluate("Object.entries(localStorage).find(([k]) => k.endsWith(':token'))")

        other = second.new_page()
        start_chat(other, gateway, "Eve")
        write(other, "hello")
        assert "4711" not in other.locator("#gw-webchat .list").inner_text()
        mine = other.evaluate("Object.entries(localStorage).find(([k]) => k.endsWith(':token'))")
        # Dan's visitor id with Eve's signature: the gateway refuses it and Eve starts afresh.
        forged = theirs[1].rsplit(".", 1)[0] + "." + mine[1].rsplit(".", 1)[1]
        other.evaluate("([k, v]) => localStorage.setItem(k, v)", [mine[0], forged])
        other.reload()
        expect(other.locator("#gw-webchat .dot.on")).to_have_count(1)  # connected again, as someone new
        token = other.evaluate("k => localStorage.getItem(k)", mine[0])
        assert token not in (forged, theirs[1], mine[1])
        assert "4711" not in other.locator("#gw-webchat .list").inner_text()
    finally:
        first.close()
        second.close()


def test_survey_choices_are_buttons_on_a_phone_screen_and_the_answer_is_a_choice_part(
        gateway: GatewayProcess, browser: Browser, shots: Path) -> None:
    phone = browser.new_context(viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True)
    try:
        page = phone.new_page()
        start_chat(page, gateway, "Fay")
        write(page, "Thanks, solved")
        conversation = published(gateway, "Thanks, solved").conversation
        on_bus(reply(gateway.bus_url, conversation, "r-survey", "How did we do?",
                     kind="survey", survey=Survey(choices=["满意", "一般", "不满意"])))
        page.get_by_role("button", name="满意", exact=True).click()
        answer = published(gateway, "满意")
        assert [p for p in answer.parts if isinstance(p, ChoicePart)] == [
            ChoicePart(survey="r-survey", choice="满意", index=0)]
        expect(page.get_by_role("button", name="一般")).to_be_disabled()
        # The panel fills the phone's screen and the message box is on it.
        box = page.locator("#gw-webchat .panel").bounding_box()
        assert box is not None and box["width"] == 375 and box["height"] == 667
        composer = page.get_by_placeholder("Type a message").bounding_box()
        assert composer is not None and composer["y"] + composer["height"] <= 667
        page.screenshot(path=shots / "phone.png")
    finally:
        phone.close()


def test_an_image_chosen_in_the_widget_is_uploaded_published_and_shown(
        gateway: GatewayProcess, context: BrowserContext, tmp_path: Path) -> None:
    picture = tmp_path / "receipt.png"
    picture.write_bytes(PNG_1X1)
    page = context.new_page()
    start_chat(page, gateway, "Hal")
    page.locator("#gw-webchat input[type=file]").set_input_files(str(picture))
    shown = page.locator("#gw-webchat .msg.visitor img")
    expect(shown).to_have_count(1)
    page.wait_for_function(DRAWN)

    def probe() -> Any:
        return next((m for m in on_bus(inbound(gateway.bus_url)) if m.sender.name == "Hal"), None)

    [part] = eventually(probe).parts
    assert isinstance(part, ImagePart) and part.content_type == "image/png" and part.ref is not None


def test_a_listed_site_embeds_the_widget_with_one_tag_and_uploads_cross_origin(
        gateway: GatewayProcess, shop: Site, context: BrowserContext, tmp_path: Path) -> None:
    page = context.new_page()
    page.goto(shop.url)
    page.get_by_placeholder("Your name").fill("Jo")
    page.get_by_role("button", name="Start chat").click()
    write(page, "Written on the shop's page")
    assert published(gateway, "Written on the shop's page").sender.name == "Jo"
    # The upload (a CORS preflight: Authorization header) and the image fetch cross origins.
    picture = tmp_path / "p.png"
    picture.write_bytes(PNG_1X1)
    page.locator("#gw-webchat input[type=file]").set_input_files(str(picture))
    page.wait_for_function(DRAWN)


def test_a_site_that_is_not_listed_cannot_open_the_widget(
        gateway: GatewayProcess, context: BrowserContext) -> None:
    other = Site()  # another origin, not in allowed_origins
    try:
        other.embed(gateway)
        before = refused_for_origin(gateway)
        page = context.new_page()
        page.goto(other.url)
        eventually(lambda: refused_for_origin(gateway) > before)  # the handshake was refused: 403
        expect(page.locator("#gw-webchat .dot.on")).to_have_count(0)
    finally:
        other.close()


def test_a_message_written_while_the_gateway_restarts_is_sent_once_when_it_is_back(
        gateway: GatewayProcess, context: BrowserContext) -> None:
    page = context.new_page()
    start_chat(page, gateway, "Ida")
    write(page, "Before the restart")
    gateway.signal(signal.SIGTERM)
    assert gateway.wait() == 0
    expect(page.locator("#gw-webchat .dot.on")).to_have_count(0)  # the widget noticed
    page.get_by_placeholder("Type a message").fill("Written while you were away")
    page.get_by_role("button", name="Send", exact=True).click()
    pending = page.locator(".msg.visitor", has_text="Written while you were away")
    expect(pending).to_have_attribute("data-state", "pending")
    gateway.start()  # same ports, same bus data
    expect(pending).to_have_attribute("data-state", "sent", timeout=20000)  # reconnected with backoff, sent again
    published(gateway, "Written while you were away")
    assert sum(m.sender.name == "Ida" for m in on_bus(inbound(gateway.bus_url))) == 2
    expect(page.locator(".msg.visitor", has_text="Before the restart")).to_be_visible()  # history survived


def test_a_message_left_sending_when_the_tab_closed_is_sent_once_when_the_visitor_comes_back(
        gateway: GatewayProcess, context: BrowserContext) -> None:
    page = context.new_page()
    start_chat(page, gateway, "Kim")
    write(page, "First")
    gateway.signal(signal.SIGTERM)
    assert gateway.wait() == 0
    expect(page.locator("#gw-webchat .dot.on")).to_have_count(0)
    page.get_by_placeholder("Type a message").fill("Typed before closing the tab")
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator(".msg.visitor", has_text="Typed before closing the tab")).to_have_attribute(
        "data-state", "pending")
    page.close()  # the visitor gives up and leaves
    gateway.start()
    back = context.new_page()  # same browser, same localStorage: the same visitor comes back
    back.goto(demo(gateway))
    expect(back.locator(".msg.visitor", has_text="Typed before closing the tab")).to_have_attribute("data-state", "sent")
    published(gateway, "Typed before closing the tab")
    assert sum(m.sender.name == "Kim" for m in on_bus(inbound(gateway.bus_url))) == 2


def test_a_site_with_a_strict_content_security_policy_shows_the_widget_styled(
        gateway: GatewayProcess, shop: Site, context: BrowserContext) -> None:
    # What such a site must allow for the widget (docs/channels/webchat.md), and no
    # 'unsafe-inline' styles: the widget's own styles must apply all the same.
    gw = f"127.0.0.1:{gateway.http_port}"
    shop.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src http://{gw}; connect-src http://{gw} ws://{gw}; img-src blob:")
    try:
        page = context.new_page()
        page.goto(shop.url)
        expect(page.get_by_placeholder("Your name")).to_be_visible()
        panel = page.evaluate("() => getComputedStyle(document.querySelector('#gw-webchat').shadowRoot"
                              ".querySelector('.panel')).position")
        assert panel == "fixed"
    finally:
        shop.headers.clear()


def websocket_metric(port: int, name: str, reason: str | None = None) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith(f"gateway_websocket_{name}{{")
                 and 'channel="web"' in ln and (reason is None or f'reason="{reason}"' in ln)), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_a_page_whose_chat_box_is_closed_gives_its_idle_socket_back_until_the_box_is_opened(
        tmp_path: Path, context: BrowserContext) -> None:
    # Every page of the site runs the widget: a reader who never opens the chat must not
    # hold one of max_connections for as long as the tab stays open.
    proc = GatewayProcess(tmp_path, channels='[channels.web]\ntype = "webchat"\nidle_timeout = "1s"\nprechat = false\n')
    proc.start()
    try:
        page = context.new_page()
        page.goto(demo(proc))
        expect(page.locator("#gw-webchat .dot.on")).to_have_count(1)
        page.get_by_role("button", name="Close chat").click()
        eventually(lambda: websocket_metric(proc.http_port, "closed_total", "idle_timeout") >= 1)
        time.sleep(2)  # an absence: a reconnect (0.5 s at most) would be idle again within this
        assert websocket_metric(proc.http_port, "closed_total", "idle_timeout") == 1
        assert websocket_metric(proc.http_port, "connections") == 0
        page.get_by_role("button", name="Open chat").click()  # the visitor is back: live again
        expect(page.locator("#gw-webchat .dot.on")).to_have_count(1)
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait()
