"""Email channel plugin (``type = "email"``): SMTP listener and IMAP mailbox in, SMTP out,
threading by Message-ID / In-Reply-To / References. See docs/channels/email.md."""

from gateway import Channel, hookimpl

from ._channel import EmailChannel
from ._config import DkimConfig, EmailConfig, ImapConfig, SmtpInConfig, SmtpOutConfig

__all__ = ["DkimConfig", "EmailChannel", "EmailConfig", "ImapConfig", "SmtpInConfig", "SmtpOutConfig",
           "register_channel_types"]


@hookimpl
def register_channel_types() -> list[type[Channel]]:
    """The email channel type."""
    return [EmailChannel]
