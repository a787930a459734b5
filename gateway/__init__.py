"""Omnichannel message gateway: channels in, one schema, a NATS JetStream bus, replies out.

Integrators import everything from here; underscore modules and ``gateway.core`` are
private. Every name in ``__all__`` is described in ``docs/writing-plugins.md`` (a test
checks it), and nothing else is exported.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .core.bus.connection import Subjects
from .core.channel.api import (
    Channel,
    ChannelContext,
    ChannelState,
    Conversation,
    KeyValue,
    Logger,
    MediaPart,
    PublishResult,
    Reach,
    Receipt,
)
from .core.channel.ratelimit import RateLimiter
from .core.channel.providers import (
    TIMEOUT,
    UNREACHABLE,
    not_connected,
    parse_retry_after,
    provider_call,
    provider_error,
    transport_error,
)
from .core.channel.shared import Lease, ProviderIndex, Sent, SharedValue, stable_id
from .core.channel.webhooks import check_timestamp, public_url, verify_ed25519, verify_hmac
from .core.channel.websocket_client import WebSocketClient
from .core.config import ChannelConfig, Config, Duration, load_config, parse_config, seconds
from .core.errors import (
    BusUnavailable,
    ConfigError,
    ConfigValueError,
    Deferred,
    DeliveryError,
    GatewayError,
    PayloadTooLarge,
    PluginError,
    RequestError,
    SignatureError,
    WebSocketClosed,
)
from .core.hookspecs import hookimpl
from .core.http.websocket import Handshake, WebSocketConnection, tokens_equal
from .core.logs import Throttle
from .core.process import Gateway
from .core.scheduling.calendar import (
    Calendar,
    Closure,
    Holidays,
    Opening,
    calendar_from_config,
    chinese_holidays,
    country_holidays,
    holiday_source,
    parse_period,
)
from .core.registry import PluginManager
from .core.retry import Backoff, Supervised
from .core.scheduling.quiet import check_quiet_hours, quiet_until
from .core.schema import (
    SCHEMA_VERSION,
    AudioPart,
    ChoicePart,
    DeadLetter,
    DeliveryState,
    DeliveryStatus,
    DeskTask,
    ErrorInfo,
    EventPart,
    Fallback,
    FilePart,
    HtmlPart,
    ImagePart,
    LinkPart,
    LocationPart,
    Message,
    ObjectRef,
    Outbound,
    Part,
    Participant,
    QuietHours,
    Reminder,
    ReminderStatus,
    Sender,
    ConversationMark,
    DeskOpened,
    FollowupStatus,
    SlaEvent,
    Survey,
    Task,
    Template,
    TextPart,
    UnknownPart,
    VideoPart,
)

try:
    __version__ = _version("omnichannel-gateway")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# One sorted list (tests/test_public_api.py keeps it sorted, without duplicates, and
# checks that every name is documented).
__all__ = [
    "AudioPart",
    "Backoff",
    "BusUnavailable",
    "Calendar",
    "Channel",
    "ChannelConfig",
    "ChannelContext",
    "ChannelState",
    "ChoicePart",
    "Closure",
    "Config",
    "ConfigError",
    "ConfigValueError",
    "Conversation",
    "ConversationMark",
    "DeadLetter",
    "Deferred",
    "DeliveryError",
    "DeliveryState",
    "DeliveryStatus",
    "DeskOpened",
    "DeskTask",
    "Duration",
    "ErrorInfo",
    "EventPart",
    "Fallback",
    "FilePart",
    "FollowupStatus",
    "Gateway",
    "GatewayError",
    "Handshake",
    "Holidays",
    "HtmlPart",
    "ImagePart",
    "KeyValue",
    "Lease",
    "LinkPart",
    "LocationPart",
    "Logger",
    "MediaPart",
    "Message",
    "ObjectRef",
    "Opening",
    "Outbound",
    "Part",
    "Participant",
    "PayloadTooLarge",
    "PluginError",
    "PluginManager",
    "ProviderIndex",
    "PublishResult",
    "QuietHours",
    "RateLimiter",
    "Reach",
    "Receipt",
    "Reminder",
    "ReminderStatus",
    "RequestError",
    "SCHEMA_VERSION",
    "Sender",
    "Sent",
    "SharedValue",
    "SignatureError",
    "SlaEvent",
    "Subjects",
    "Supervised",
    "Survey",
    "TIMEOUT",
    "Task",
    "Template",
    "TextPart",
    "Throttle",
    "UNREACHABLE",
    "UnknownPart",
    "VideoPart",
    "WebSocketClient",
    "WebSocketClosed",
    "WebSocketConnection",
    "__version__",
    "calendar_from_config",
    "check_quiet_hours",
    "check_timestamp",
    "chinese_holidays",
    "country_holidays",
    "holiday_source",
    "hookimpl",
    "load_config",
    "not_connected",
    "parse_config",
    "parse_period",
    "parse_retry_after",
    "provider_call",
    "provider_error",
    "public_url",
    "quiet_until",
    "seconds",
    "stable_id",
    "tokens_equal",
    "transport_error",
    "verify_ed25519",
    "verify_hmac",
]
