"""The channel's documentation names every configuration key."""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway_plugins.email import DkimConfig, EmailConfig, ImapConfig, SmtpInConfig, SmtpOutConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "channels" / "email.md"


def test_every_config_key_is_documented():
    text = DOC.read_text()
    missing = []
    for section, struct in (("", EmailConfig), ("smtp", SmtpInConfig), ("imap", ImapConfig), ("send", SmtpOutConfig),
                            ("dkim", DkimConfig)):
        if section:
            assert f"[channels.<name>.{section}]" in text, section
        for f in msgspec.structs.fields(struct):
            if f"`{f.encode_name}`" not in text:
                missing.append(f"{section}.{f.encode_name}" if section else f.encode_name)
    assert missing == []
