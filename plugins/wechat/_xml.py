"""Parsing the XML WeChat posts, hardened: no DTD at all (so no external entities and no
entity expansion), a size limit, and a flat result whose values are all strings."""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError

import defusedxml
from defusedxml.ElementTree import fromstring

from gateway import RequestError


def parse(data: bytes | str) -> dict[str, str]:
    """The children of ``<xml>`` as ``{tag: text}``. Nested elements (menu events'
    ``ScanCodeInfo``, ``SendPicsInfo`` ...) are flattened as ``Parent.Child``; repeated
    tags get ``.1``, ``.2`` suffixes. Text is kept as sent (a customer's
    leading spaces are theirs); callers strip the fields that are identifiers. Raises :class:`RequestError` (400) for anything that
    is not a plain WeChat XML document."""
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise RequestError(f"XML refused: {type(exc).__name__}") from None
    except ParseError as exc:
        # expat's messages are fixed texts with a position, never a piece of the document.
        raise RequestError(f"malformed XML: {exc}") from None
    except (ValueError, LookupError):
        # These quote the document (an unknown encoding name): say what, not which.
        raise RequestError("malformed XML: unsupported encoding declaration") from None
    if root.tag != "xml":
        raise RequestError("malformed XML: root element is not <xml>")
    out: dict[str, str] = {}
    _flatten(root, "", out)
    return out


def _flatten(el: Element, prefix: str, out: dict[str, str]) -> None:
    seen: dict[str, int] = {}
    for child in el:
        name = prefix + child.tag
        n = seen.get(name, 0)
        seen[name] = n + 1
        key = name if n == 0 else f"{name}.{n}"
        if len(child):
            _flatten(child, key + ".", out)
        else:
            out[key] = child.text or ""
