"""Omnichannel message gateway: channels in, one schema, a NATS JetStream bus, replies out.

Integrators import everything from here; underscore modules are private.
"""

from importlib.metadata import PackageNotFoundError, version

from .core.bus.connection import Subjects
from .core.channel.api import Channel, ChannelContext, ChannelState, Conversation, KeyValue, PublishResult, Reach, Receipt
from .core.config import ChannelConfig, Config, Duration, load_config, parse_config, seconds
from .core.errors import (
    BusUnavailable,
    ConfigError,
    Deferred,
    DeliveryError,
    GatewayError,
    PayloadTooLarge,
    PluginError,
    RequestError,
    SignatureError,
    body_problem,
)
from .core.process import Gateway
from .core.channel.api import MediaPart
from .core.logs import Throttle
from .core.scheduling.quiet import check_quiet_hours, quiet_until
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
from .core.scheduling.survey import match_choice
from .core.retry import Backoff, Supervised
from .core.channel.toolkit import (
    Lease,
    ProviderIndex,
    Sent,
    SharedValue,
    check_timestamp,
    TIMEOUT,
    UNREACHABLE,
    not_connected,
    parse_retry_after,
    provider_call,
    provider_error,
    transport_error,
    public_url,
    stable_id,
    verify_ed25519,
    verify_hmac,
)
from .core.hookspecs import hookimpl
from .core.registry import PluginManager
from .core.retry import Backoff
from .core.channel.ratelimit import RateLimiter
from .core.channel.websocket_client import WebSocketClient
from .core.http.websocket import Handshake, WebSocketClosed, WebSocketConnection, tokens_equal
from .core.schema import (
    SCHEMA_VERSION,
    ConversationMark,
    DeskOpened,
    FollowupStatus,
    SlaEvent,
    DeliveryState,
    AudioPart,
    ChoicePart,
    DeadLetter,
    DeliveryStatus,
    ErrorInfo,
    EventPart,
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
    Fallback,
    DeskTask,
    Task,
    Survey,
    Template,
    TextPart,
    UnknownPart,
    VideoPart,
)

try:
    __version__ = version("omnichannel-gateway")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "SCHEMA_VERSION",
    "AudioPart",
    "Backoff",
    "BusUnavailable",
    "Channel",
    "ChannelConfig",
    "ChannelContext",
    "ChannelState",
    "ChoicePart",
    "Config",
    "ConfigError",
    "Conversation",
    "DeadLetter",
    "Deferred",
    "DeliveryError",
    "DeliveryStatus",
    "Duration",
    "ErrorInfo",
    "EventPart",
    "FilePart",
    "Gateway",
    "GatewayError",
    "HtmlPart",
    "ImagePart",
    "KeyValue",
    "LinkPart",
    "LocationPart",
    "Message",
    "ObjectRef",
    "Outbound",
    "Part",
    "Participant",
    "PayloadTooLarge",
    "PluginError",
    "PluginManager",
    "PublishResult",
    "QuietHours",
    "Reach",
    "Receipt",
    "Reminder",
    "ReminderStatus",
    "Fallback",
    "DeskTask",
    "Task",
    "RequestError",
    "SignatureError",
    "Subjects",
    "Survey",
    "Template",
    "Throttle",
    "TextPart",
    "UnknownPart",
    "VideoPart",
    "WebSocketClient",
    "WebSocketClosed",
    "WebSocketConnection",
    "Handshake",
    "tokens_equal",
    "__version__",
    "hookimpl",
    "load_config",
    "parse_config",
    "seconds",
]

# The channel toolkit (gateway/core/channel/toolkit.py) and the types a plugin's signatures use.
__all__ += [
    "Backoff",
    "DeliveryState",
    "body_problem",
    "check_quiet_hours",
    "quiet_until",
    "match_choice",
    "Lease",
    "MediaPart",
    "ProviderIndex",
    "Sent",
    "SharedValue",
    "RateLimiter",
    "Supervised",
    "check_timestamp",
    "TIMEOUT",
    "UNREACHABLE",
    "not_connected",
    "parse_retry_after",
    "provider_call",
    "provider_error",
    "transport_error",
    "public_url",
    "stable_id",
    "verify_ed25519",
    "verify_hmac",
]

# Service hours (docs/service-hours.md): calendars, pure functions of time, and the desk's
# wire types.
__all__ += [
    "Calendar",
    "Closure",
    "ConversationMark",
    "DeskOpened",
    "FollowupStatus",
    "Holidays",
    "Opening",
    "SlaEvent",
    "calendar_from_config",
    "chinese_holidays",
    "country_holidays",
    "holiday_source",
    "parse_period",
]
