"""Fixtures of the Telegram tests; the fake Bot API and the update builders are in
``tg_fake`` (a test module directory named like the library cannot be a package: it
would shadow ``telegram``)."""

from __future__ import annotations

from typing import Any

import pytest
from tg_fake import FakeTelegram

from gateway.testing import serve_asgi


@pytest.fixture
async def fake_tg() -> Any:
    """The Bot API fake, serving for one test."""
    fake = FakeTelegram()
    async with serve_asgi(fake.app, fake.port):
        yield fake
