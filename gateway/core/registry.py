"""Plugin discovery: every plugin, built-in or third-party, comes through the entry-point
group ``gateway.plugins`` and the same ``load_setuptools_entrypoints`` call."""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import cast

import pluggy

from . import hookspecs as _hookspecs
from .channel.api import Channel
from .errors import PluginError

ENTRY_POINT_GROUP = "gateway.plugins"
LOAD_ENV = "GATEWAY_LOAD_PLUGINS"
"""Comma-separated entry-point names: load only these (all when unset)."""


@dataclass(frozen=True)
class ChannelTypeInfo:
    """A loaded channel type and where it came from."""

    type: str
    cls: builtins.type[Channel]  # the field above shadows the builtin in this class body
    plugin: str
    """The plugin's registered name (the entry-point name for entry-point plugins)."""
    package: str
    version: str
    source: str
    """``entry point <group>:<name> = <value>`` or ``registered in code``."""


class PluginManager:
    """Loads plugins, validates their hooks and indexes channel types by name."""

    def __init__(self, *, load_entry_points: bool = True, extra: list[object] | None = None):
        self.pm = pluggy.PluginManager("gateway")
        self.pm.add_hookspecs(_hookspecs)
        self._dist: dict[str, tuple[str, str, str]] = {}
        if load_entry_points:
            self._load_entry_points()
        for plugin in extra or []:
            self.pm.register(plugin)
        self._check_pending()
        self.channel_types = self._collect_channel_types()

    def _check_pending(self) -> None:
        """Like ``pm.check_pending()``, but naming the plugin and the known hooks."""
        known = sorted(n for n in dir(_hookspecs) if hasattr(getattr(_hookspecs, n), "gateway_spec"))
        for name in sorted(vars(self.pm.hook)):
            caller = getattr(self.pm.hook, name)
            if name.startswith("_") or not hasattr(caller, "has_spec") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.optionalhook:
                    raise PluginError(
                        f"plugin {self.pm.get_name(impl.plugin)!r}: hook implementation {name!r} matches no hook "
                        f"(misspelled? known hooks: {', '.join(known)})")
        self.pm.check_pending()

    def _load_entry_points(self) -> None:
        only = {n.strip() for n in os.environ.get(LOAD_ENV, "").split(",") if n.strip()}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if only and ep.name not in only:
                self.pm.set_blocked(ep.name)
                continue
            if self.pm.get_plugin(ep.name) or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is named, not a traceback
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc!r}") from exc
            try:
                self.pm.register(plugin, name=ep.name)
            except ValueError as exc:
                raise PluginError(f"plugin {ep.name!r} could not be registered: {exc}") from exc
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {ep.name!r} is invalid: {exc}") from exc
            dist = ep.dist
            self._dist[ep.name] = (
                dist.metadata["Name"] if dist else "?",
                dist.version if dist else "?",
                f"entry point {ENTRY_POINT_GROUP}:{ep.name} = {ep.value}",
            )

    def _collect_channel_types(self) -> dict[str, ChannelTypeInfo]:
        found: dict[str, ChannelTypeInfo] = {}
        for impl in self.pm.hook.register_channel_types.get_hookimpls():
            name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                # pluggy types a hook's result as object; each item is checked below.
                classes = cast(Iterable[object], impl.function() or [])
            except Exception as exc:
                raise PluginError(f"plugin {name!r}: register_channel_types raised {exc!r}") from exc
            for cls in classes:
                if not (isinstance(cls, type) and issubclass(cls, Channel)):
                    raise PluginError(f"plugin {name!r} registered {cls!r}, which is not a gateway.Channel subclass")
                ctype = getattr(cls, "channel_type", None)
                if not isinstance(ctype, str) or not ctype:
                    raise PluginError(f"plugin {name!r}: {cls.__qualname__} has no 'channel_type' name")
                if ctype in found:
                    raise PluginError(
                        f"channel type {ctype!r} is registered twice: by plugin {found[ctype].plugin!r} "
                        f"and by plugin {name!r}"
                    )
                package, version, source = self._dist.get(name, ("-", "-", "registered in code"))
                found[ctype] = ChannelTypeInfo(ctype, cls, name, package, version, source)
        return dict(sorted(found.items()))

    @property
    def hook(self) -> pluggy.HookRelay:
        """The pluggy hook relay."""
        return self.pm.hook
