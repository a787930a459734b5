"""docs/service-hours.md: its configuration blocks load as pasted (the closures file too),
and its tables name every field of the wire types they describe."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from gateway import (
    ConversationMark,
    DeskOpened,
    FollowupStatus,
    PluginManager,
    SlaEvent,
    calendar_from_config,
    load_config,
)

DOC = Path(__file__).parent.parent.parent / "docs" / "service-hours.md"


def test_the_configuration_blocks_load_and_build_their_calendars(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2
    (tmp_path / "desk-closures.toml").write_text(blocks[1], encoding="utf-8")
    (tmp_path / "gateway.toml").write_text(blocks[0], encoding="utf-8")
    config = load_config(tmp_path / "gateway.toml", PluginManager().channel_types)
    assert set(config.settings.calendars) == {"desk", "support-24h"}
    desk = calendar_from_config("desk", config.settings.calendars["desk"])
    assert desk.openings and desk.closures and desk.holidays is not None
    assert calendar_from_config("support-24h", config.settings.calendars["support-24h"]).always_open
    svc = config.channels["support-mail"].service
    assert svc is not None and svc.business_hours and svc.first_response == 8 * 3600 and str(svc.first_response) == "8h"


def test_the_tables_name_every_field_of_the_desk_wire_types():
    text = DOC.read_text(encoding="utf-8")
    for tp in (ConversationMark, DeskOpened, SlaEvent, FollowupStatus):
        for f in msgspec.structs.fields(tp):
            assert f"`{f.encode_name}`" in text or f.encode_name in text, f"{tp.__name__}.{f.encode_name}"
