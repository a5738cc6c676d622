"""Dead letters in the shape of Concur's "Get Notifications by Status", as JSON or XML.

Pure functions, shared by the HTTP service and usable by the CLI. The XML follows Concur's own
examples: root ``NotificationList`` in the 2012/06 notification namespace with ``xmlns:i`` for
``i:nil``, each ``Notification`` with ``Context``, ``EventDateTime``, ``EventType``,
``NotificationURI``, ``ObjectType``, ``ObjectURI`` in that order, then our ``Failure`` element.
The JSON is a list of objects with the same keys. Both are built from one dict, so they cannot
disagree.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

from worker.shapes.times import iso_utc
from worker.store.deadletters import DeadLetter

NAMESPACE = "http://www.concursolutions.com/api/notification/2012/06"
XSI_NAMESPACE = "http://www.w3.org/2001/XMLSchema-instance"
OBJECT_TYPE = "NOTIFICATION"
EVENT_TYPE_PREFIX = "Notification Failed - "
SUPPORTED_STATUSES = ("failed",)
XML_DECLARATION = b'<?xml version="1.0" encoding="utf-8"?>\n'

# Characters XML 1.0 does not allow anywhere in a document (control characters, lone
# surrogates, U+FFFE/U+FFFF). Such a value is kept readable with U+FFFD in their place.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
REPLACEMENT = "\ufffd"

# Names of the item elements of list values in XML.
_ITEM_NAMES = {"Errors": "Error"}


def event_time(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC), None for no time."""
    return iso_utc(ms)


def concur_time(ms: int | None) -> str | None:
    """Milliseconds since the epoch as ``YYYY-MM-DDTHH:MM:SS``, UTC without an offset, as the
    seed's ``EventDateTime`` example writes it (``2012-11-14T19:45:25``); None for no time."""
    shown = iso_utc(ms)
    return None if shown is None else shown.removesuffix("Z")


def xml_safe(text: str) -> str:
    """``text`` with every character XML 1.0 forbids replaced by U+FFFD."""
    return _NOT_XML.sub(REPLACEMENT, text)


def notification_uri(base_url: str, letter_id: str) -> str:
    """The absolute URL that shows (GET) or deletes (DELETE) one failed notification."""
    return f"{base_url.rstrip('/')}/notifications/{quote(letter_id, safe='')}"


def message_uri(base_url: str, message_id: str) -> str:
    """The absolute URL of a message's status."""
    return f"{base_url.rstrip('/')}/messages/{quote(message_id, safe='')}"


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _context_url(request: dict[str, Any]) -> str | None:
    context = request.get("context")
    url = context.get("url") if isinstance(context, dict) else None
    return url if isinstance(url, str) else None


def failure_dict(letter: DeadLetter) -> dict[str, Any]:
    """The ``Failure`` element: why and how the notification failed."""
    return {
        "ReasonCode": letter.reason,
        "Detail": letter.detail or None,
        "HttpStatus": letter.status,
        "Errors": [
            {
                "ErrorId": _text_or_none(item.get("errorId")),
                "ErrorCode": _text_or_none(item.get("errorCode")),
                "ErrorMessage": _text_or_none(item.get("errorMessage")),
            }
            for item in letter.errors
        ],
        "Attempts": letter.attempts,
        "FirstAttemptDateTime": event_time(letter.first_attempt_ms),
        "LastAttemptDateTime": event_time(letter.last_attempt_ms),
        "CorrelationId": letter.correlation_id,
        "UserId": letter.user_id or None,
        "SessionId": _text_or_none(letter.request.get("sessionId")),
        "TemplateId": letter.template_id,
        "Replays": letter.replays,
        "Partner": letter.partner,
        "Company": letter.company,
    }


def notification_dict(letter: DeadLetter, base_url: str) -> dict[str, Any]:
    """One dead letter as a Concur ``Notification`` (PascalCase keys, in the seed's order)."""
    return {
        "Context": _context_url(letter.request),
        "EventDateTime": concur_time(letter.dead_ms),
        "EventType": f"{EVENT_TYPE_PREFIX}{letter.reason}",
        "NotificationURI": notification_uri(base_url, letter.id),
        "ObjectType": OBJECT_TYPE,
        "ObjectURI": message_uri(base_url, letter.id),
        "Failure": failure_dict(letter),
    }


def _fill(element: ET.Element, value: Any) -> None:
    # Values become text or child elements; None becomes i:nil, as in Concur's examples.
    if value is None:
        element.set("i:nil", "true")
    elif isinstance(value, dict):
        for key, child in value.items():
            _fill(ET.SubElement(element, key), child)
    elif isinstance(value, list):
        item_name = _ITEM_NAMES.get(element.tag, "Item")
        for child in value:
            _fill(ET.SubElement(element, item_name), child)
    elif isinstance(value, bool):
        element.text = "true" if value else "false"
    else:
        element.text = xml_safe(str(value))


def notification_element(letter: DeadLetter, base_url: str) -> ET.Element:
    """One dead letter as a ``Notification`` element (namespaces are declared by the document)."""
    element = ET.Element("Notification")
    _fill(element, notification_dict(letter, base_url))
    return element


def _document(root: ET.Element) -> bytes:
    root.set("xmlns", NAMESPACE)
    root.set("xmlns:i", XSI_NAMESPACE)
    # ElementTree escapes &, < and > but leaves a carriage return in text as it is, which a
    # parser would read back as a newline; as a character reference it survives.
    body = ET.tostring(root, encoding="unicode").replace("\r", "&#13;")
    return XML_DECLARATION + body.encode("utf-8")


def notification_list_xml(letters: list[DeadLetter], base_url: str) -> bytes:
    """A ``NotificationList`` document (UTF-8 bytes with the XML declaration)."""
    root = ET.Element("NotificationList")
    root.extend(notification_element(letter, base_url) for letter in letters)
    return _document(root)


def notification_xml(letter: DeadLetter, base_url: str) -> bytes:
    """A document whose root is one ``Notification``."""
    return _document(notification_element(letter, base_url))
