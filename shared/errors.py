"""The one exception tree of chatq.

    ChatqError                      base of everything chatq raises on purpose
    ├── ConfigError                 a settings file or variable is invalid
    ├── QueueError                  per-chat queue refused or dropped a message
    │   ├── QueueFullError          the chat already has max_queue_size pending
    │   └── QueueClearedError       clear_all() dropped a pending message
    ├── StoreError                  the tenant's SQLite store failed (for good: not a database, ...)
    │   ├── StoreInUse              another worker holds it (it may yet exit)
    │   └── StoreUnavailable        for now (disk full, locked, I/O error): retried, 503 meanwhile
    ├── RedriveRefused              retry/resend named a message or reply it cannot put back
    ├── HandlerError                a tenant handler failed
    │   ├── HandlerTimeoutError     ... by running past handler_timeout
    │   └── PermanentHandlerError   ... in a way retrying will not fix
    ├── TransportError              sending a reply failed
    │   ├── RetryableTransportError ... for now (5xx, timeout, connection)
    │   │   └── TransientTransportError ... for a while that is known to pass: no attempt limit
    │   │       └── PairRateLimitError  ... to one recipient too often: back off that chat
    │   ├── PermanentTransportError ... for good (4xx, bad recipient)
    │   └── SendingPausedError      ... for every chat until an operator acts (bad token)
    ├── ForwardError                the gateway could not get an update committed by a tenant
    └── ControlError                an ops request could not be served
        ├── SupervisorNotRunning    no supervisor answers on the control socket
        ├── SupervisorRunning       another supervisor already runs on this run_dir
        └── NoSuchTenant            the request names an unknown tenant

Retry policy keys on these classes: anything retryable is neither a
Permanent* error nor a ConfigError.
"""

from __future__ import annotations


class ChatqError(Exception):
    """Base class of every error chatq raises on purpose."""

    # Seconds a server asked us to wait before trying again (its Retry-After
    # header on a 429 or 503); None when it did not say. Retries honour it.
    retry_after: float | None = None


class ConfigError(ChatqError):
    """A configuration file or environment variable is invalid."""


class QueueError(ChatqError):
    """The per-chat queue refused or dropped a message."""


class QueueFullError(QueueError):
    """The chat already has max_queue_size messages pending (QUEUE_FULL)."""

    def __init__(self, tenant_id: str, chat_id: str, limit: int) -> None:
        super().__init__(
            f"QUEUE_FULL: chat {chat_id!r} of tenant {tenant_id!r} has {limit} pending"
        )
        self.tenant_id = tenant_id
        self.chat_id = chat_id
        self.limit = limit


class QueueClearedError(QueueError):
    """clear_all() dropped this message before it ran."""

    def __init__(self, tenant_id: str, chat_id: str) -> None:
        super().__init__(f"QUEUE_CLEARED: chat {chat_id!r} of tenant {tenant_id!r} was cleared")
        self.tenant_id = tenant_id
        self.chat_id = chat_id


class StoreError(ChatqError):
    """The tenant's SQLite store could not be opened, migrated or written."""


class RedriveRefused(ChatqError):
    """`chatq retry`/`resend` named an unknown id, or one that is not failed: nothing changed."""


class StoreInUse(StoreError):
    """Another worker holds the tenant's store (it may yet exit: worth a retry)."""


class StoreUnavailable(StoreError):
    """The store failed for now (disk full, locked, I/O error): wait and retry, answer 503."""


class HandlerError(ChatqError):
    """A tenant handler failed; retried unless permanent."""


class HandlerTimeoutError(HandlerError):
    """A handler ran past handler_timeout and was cancelled."""


class PermanentHandlerError(HandlerError):
    """A handler failure that retrying will not fix (e.g. a 4xx answer)."""


class TransportError(ChatqError):
    """Sending a reply failed."""


class RetryableTransportError(TransportError):
    """Sending failed for now (5xx, timeout, connection refused): try again later."""


class PermanentTransportError(TransportError):
    """Sending failed for good (4xx, unknown recipient): do not try again."""


class ForwardError(ChatqError):
    """The gateway could not get a tenant's part of a webhook committed now (Meta retries)."""


class TransientTransportError(RetryableTransportError):
    """A failure known to pass (provider overload, 5xx, timeouts): retried without a limit."""


class PairRateLimitError(TransientTransportError):
    """Too many messages to one recipient (WhatsApp 131056): back off that chat only."""


class SendingPausedError(TransportError):
    """The provider refuses all of the tenant's sending (bad token, account locked): pause."""


class ControlError(ChatqError):
    """An ops request could not be served."""


class SupervisorNotRunning(ControlError):
    """No supervisor answers on the control socket."""


class SupervisorRunning(ControlError):
    """Another supervisor already runs on this run_dir (it holds supervisor.lock)."""


class NoSuchTenant(ControlError):
    """The request names a tenant the supervisor does not know."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no such tenant: {tenant_id}")
        self.tenant_id = tenant_id


__all__ = [
    "ChatqError",
    "ConfigError",
    "ControlError",
    "ForwardError",
    "HandlerError",
    "HandlerTimeoutError",
    "NoSuchTenant",
    "PairRateLimitError",
    "PermanentHandlerError",
    "PermanentTransportError",
    "QueueClearedError",
    "QueueError",
    "QueueFullError",
    "RedriveRefused",
    "RetryableTransportError",
    "SendingPausedError",
    "StoreError",
    "StoreInUse",
    "StoreUnavailable",
    "SupervisorNotRunning",
    "SupervisorRunning",
    "TransientTransportError",
    "TransportError",
]
