"""Pure SMS text rules: GSM-7 / UCS-2 segmentation, E.164 numbers, masking, keywords.

No I/O here: everything takes a value and returns one, so the rules are tested alone
(property tests in tests/sms/test_text.py)."""

from __future__ import annotations

import unicodedata
from typing import Literal

import msgspec
import phonenumbers

# 3GPP TS 23.038: the GSM 7-bit default alphabet (one septet each; ESC itself excluded)
# and its extension table (ESC + one septet: two each).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

# Single message / per part of a concatenated message (the UDH takes 6 bytes).
GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67

Encoding = Literal["GSM-7", "UCS-2"]


class Segmentation(msgspec.Struct, frozen=True):
    """How a text goes out: its encoding, and the text of each segment (joined, they are
    the text again). ``units`` counts septets (GSM-7) or UTF-16 code units (UCS-2)."""

    encoding: Encoding
    parts: tuple[str, ...]
    units: int

    @property
    def segments(self) -> int:
        """What the carrier bills: one per part."""
        return len(self.parts)


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM 7-bit alphabet or its extension table."""
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def _gsm_units(ch: str) -> int:
    return 2 if ch in GSM7_EXTENSION else 1


def _ucs2_units(ch: str) -> int:
    # Characters outside the BMP (most emoji) are a UTF-16 surrogate pair.
    return 2 if ord(ch) > 0xFFFF else 1


def segment(text: str) -> Segmentation:
    """Split ``text`` as a handset and the carriers do: GSM-7 when every character is in
    its alphabet (extension characters count two septets), else UCS-2 (characters outside
    the BMP count two units). Up to 160 septets / 70 units is one message; longer, parts of
    153 / 67, and an escape pair or a surrogate pair is never cut between parts (a part may
    then hold one unit less). The empty text is one empty segment."""
    if is_gsm7(text):
        encoding: Encoding = "GSM-7"
        units_of, single, part = _gsm_units, GSM7_SINGLE, GSM7_PART
    else:
        encoding, units_of, single, part = "UCS-2", _ucs2_units, UCS2_SINGLE, UCS2_PART
    sizes = [units_of(ch) for ch in text]
    total = sum(sizes)
    if total <= single:
        return Segmentation(encoding, (text,), total)
    parts: list[str] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if used + size > part:
            parts.append(text[start:i])
            start, used = i, 0
        used += size
    parts.append(text[start:])
    return Segmentation(encoding, tuple(parts), total)


# --- numbers -----------------------------------------------------------------------------


class NumberError(ValueError):
    """Not a usable phone number (the message never repeats the number)."""


def to_e164(raw: str, default_region: str) -> str:
    """``raw`` as E.164 (``+8613812345678``), read with ``default_region`` (ISO 3166
    alpha-2) when it has no country code. Raises :class:`NumberError` when it is not a
    possible number."""
    try:
        parsed = phonenumbers.parse(raw.strip(), default_region)
    except phonenumbers.NumberParseException:
        raise NumberError("not a phone number") from None
    if not phonenumbers.is_possible_number(parsed):
        raise NumberError("not a possible phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def national(e164: str) -> tuple[int, str]:
    """(country calling code, national significant number) of an E.164 number."""
    parsed = phonenumbers.parse(e164, None)
    return int(parsed.country_code or 0), phonenumbers.national_significant_number(parsed)


def mask(number: str) -> str:
    """A phone number as logs may show it: ``+86138****5678`` (the first six and last
    four characters; shorter numbers keep less)."""
    n = len(number)
    if n <= 4:
        return "*" * n
    if n <= 10:
        return number[:2] + "****" + number[-2:]
    return number[:6] + "****" + number[-4:]


# --- keywords ----------------------------------------------------------------------------


def keyword(text: str) -> str:
    """The normalized form an opt-out / opt-in keyword is compared in: trimmed, case-folded,
    trailing punctuation dropped, full-width forms read as ASCII (``Stop.`` and ``stop`` are
    STOP; ``退订！`` is 退订; ``ＴＤ`` is TD)."""
    # NFKC first: a Chinese input method in full-width mode types ＴＤ for TD.
    return unicodedata.normalize("NFKC", text).strip().rstrip(".!。 \t").strip().casefold()
