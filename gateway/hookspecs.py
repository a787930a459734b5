"""Every hook a plugin can implement, each with its docstring: the specification, read
here rather than in the private module that defines it. Mark implementations with
:data:`gateway.hookimpl`. (tests/test_plugins.py checks that this list is every hook the
plugin manager knows.)"""

from __future__ import annotations

from .core.hookspecs import enrich_message, register_channel_types

__all__ = ["enrich_message", "register_channel_types"]
