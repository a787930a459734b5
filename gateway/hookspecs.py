"""Every hook a plugin can implement, each with its docstring: the specification, read
here rather than in the private module that defines it. Mark implementations with
:data:`gateway.hookimpl`."""

from __future__ import annotations

from .core import hookspecs as _spec

# Built from the private module so a new hook is public (and checked by the docs test) at once.
__all__ = sorted(n for n, f in vars(_spec).items() if callable(f) and hasattr(f, "gateway_spec"))
globals().update({n: getattr(_spec, n) for n in __all__})
