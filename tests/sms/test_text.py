"""SMS text rules: GSM-7 / UCS-2 detection and segmentation at the 160/153 and 70/67
boundaries (extension characters count two, emoji are surrogate pairs), E.164, masking."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from gateway_plugins.sms._text import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    NumberError,
    keyword,
    mask,
    segment,
    to_e164,
)

GSM_BASIC = sorted(GSM7_BASIC)
GSM_ALL = sorted(GSM7_BASIC | GSM7_EXTENSION)


@pytest.mark.parametrize("text, encoding, segments", [
    ("", "GSM-7", 1),
    ("a" * 160, "GSM-7", 1),
    ("a" * 161, "GSM-7", 2),
    ("a" * 306, "GSM-7", 2),
    ("a" * 307, "GSM-7", 3),
    ("€" * 80, "GSM-7", 1),           # 160 septets: extension characters count two
    ("€" * 81, "GSM-7", 2),
    ("a" * 159 + "€", "GSM-7", 2),    # 161 septets
    ("你" * 70, "UCS-2", 1),
    ("你" * 71, "UCS-2", 2),
    ("你" * 134, "UCS-2", 2),
    ("你" * 135, "UCS-2", 3),
    ("a" * 69 + "你", "UCS-2", 1),    # one non-GSM character makes the whole text UCS-2
    ("a" * 70 + "你", "UCS-2", 2),
    ("😀" * 35, "UCS-2", 1),          # 70 UTF-16 units
    ("😀" * 36, "UCS-2", 2),
    ("`", "UCS-2", 1),                # the backtick is not in GSM-7
])
def test_encoding_and_segment_count_at_the_boundaries(text, encoding, segments):
    seg = segment(text)
    assert (seg.encoding, seg.segments) == (encoding, segments)


def test_an_escape_pair_is_never_split_between_parts():
    # 152 septets then "€" (2): the pair does not fit in part one's last septet.
    seg = segment("a" * 152 + "€" + "b" * 10)
    assert seg.parts[0] == "a" * 152 and seg.parts[1].startswith("€")


def test_an_emoji_surrogate_pair_is_never_split_between_parts():
    seg = segment("x" * 66 + "😀" + "y" * 10)
    assert seg.parts[0] == "x" * 66 and seg.parts[1].startswith("😀")


@given(st.text(alphabet=st.sampled_from(GSM_BASIC), max_size=1000))
def test_basic_gsm_text_needs_one_segment_up_to_160_then_153_per_part(text):
    seg = segment(text)
    assert seg.encoding == "GSM-7" and seg.units == len(text)
    assert seg.segments == (1 if len(text) <= 160 else math.ceil(len(text) / 153))


@given(st.text(max_size=800))
def test_parts_join_to_the_text_and_each_fits_its_encodings_part_size(text):
    seg = segment(text)
    assert "".join(seg.parts) == text
    units = (lambda ch: 2 if ch in GSM7_EXTENSION else 1) if seg.encoding == "GSM-7" else \
        (lambda ch: 2 if ord(ch) > 0xFFFF else 1)
    limit_one, limit_part = (160, 153) if seg.encoding == "GSM-7" else (70, 67)
    sizes = [sum(units(ch) for ch in p) for p in seg.parts]
    assert sum(sizes) == seg.units
    assert all(s <= (limit_one if seg.segments == 1 else limit_part) for s in sizes)
    # Greedy: every part but the last is full up to one unit (a pair that did not fit).
    assert all(s >= limit_part - 1 for s in sizes[:-1])


@given(st.text(alphabet=st.sampled_from(GSM_ALL), max_size=400))
def test_gsm_text_is_never_sent_as_ucs2(text):
    assert segment(text).encoding == "GSM-7"


@given(st.text(min_size=1, max_size=300), st.characters(blacklist_characters=GSM_ALL))
def test_any_character_outside_gsm7_makes_the_text_ucs2(text, odd):
    assert segment(text + odd).encoding == "UCS-2"


@given(st.text(max_size=400), st.text(max_size=5))
def test_longer_text_never_needs_fewer_segments(text, more):
    before, after = segment(text), segment(text + more)
    if before.encoding == after.encoding:
        assert after.segments >= before.segments


@pytest.mark.parametrize("raw, region, e164", [
    ("13812345678", "CN", "+8613812345678"),
    ("+86 138 1234 5678", "US", "+8613812345678"),
    ("(415) 555-0123", "US", "+14155550123"),
    ("+14155550123", "CN", "+14155550123"),
])
def test_numbers_are_normalized_to_e164_with_the_default_region(raw, region, e164):
    assert to_e164(raw, region) == e164


@pytest.mark.parametrize("raw", ["", "hello", "12", "+999 1234"])
def test_what_is_not_a_number_is_refused_without_repeating_it(raw):
    with pytest.raises(NumberError) as exc:
        to_e164(raw, "CN")
    assert raw not in str(exc.value) or raw == ""


def test_numbers_are_masked_for_logs():
    assert mask("+8613812345678") == "+86138****5678"
    assert mask("+14155550123") == "+14155****0123"
    assert "5550" not in mask("+14155550123")


@pytest.mark.parametrize("text, word", [(" Stop ", "stop"), ("STOP.", "stop"), ("退订！", "退订"), ("td", "td")])
def test_keywords_compare_trimmed_and_case_folded(text, word):
    assert keyword(text) == word


@pytest.mark.parametrize("typed, word", [("ＴＤ", "td"), ("ｓｔｏｐ！", "stop"), ("退订！", "退订")])
def test_full_width_keywords_read_as_their_ascii_form(typed, word):
    # A Chinese input method in full-width mode types ＴＤ: it is still TD (opt-out is law).
    assert keyword(typed) == word
