"""The `module.path:function` handler: a tenant's own async function.

The function is imported once, when the worker boots, and must be an
``async def f(message, ctx)`` returning ``str | list[str] | None``. Anything
wrong with the reference (import failure, missing attribute, not a coroutine
function, wrong parameters) is a `ConfigError` with one line, e.g.::

    tenant acme: handler 'mybot.h:reply': no module named 'mybot'

which the worker reports as its "failed to boot" reason.

At call time, an exception from the function that is not already a chatq
error becomes a (retryable) `HandlerError`, with the original as its cause;
a return value of the wrong type is a `PermanentHandlerError`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import cast

from chatq.shared.errors import ChatqError, ConfigError, HandlerError
from chatq.tenant_worker.handlers.base import HandlerContext, normalise_replies
from chatq.tenant_worker.messages import Message

__all__ = ["HandlerFunction", "ModuleHandler", "import_handler_function"]

HandlerFunction = Callable[[Message, HandlerContext], Awaitable[object]]


class _Refused(Exception):
    """Why a handler reference cannot be used (becomes the tail of a ConfigError)."""


class ModuleHandler:
    """Calls a tenant's async function and normalises what it returns."""

    def __init__(self, function: HandlerFunction, ref: str) -> None:
        self._function = function
        self.ref = ref

    @classmethod
    def load(cls, ref: str, tenant_id: str) -> ModuleHandler:
        """Import `ref` ("module.path:function"); ConfigError if it is unusable."""
        return cls(import_handler_function(ref, tenant_id), ref)

    async def handle(self, message: Message, ctx: HandlerContext) -> list[str]:
        """Await the function; its replies as a list."""
        try:
            result = await self._function(message, ctx)
        except ChatqError:
            raise
        except Exception as exc:
            detail = str(exc).replace("\n", " ")
            raise HandlerError(
                f"handler {self.ref!r} raised {type(exc).__name__}: {detail}"
            ) from exc
        return normalise_replies(result)

    async def aclose(self) -> None:
        """Nothing to release: the module stays imported."""


def import_handler_function(ref: str, tenant_id: str) -> HandlerFunction:
    """The async function `ref` names; ConfigError with one line if it cannot be used."""
    try:
        module_name, _, attr = _split(ref)
        return _checked(_attribute(_import(module_name), attr), attr)
    except _Refused as exc:
        raise ConfigError(f"tenant {tenant_id}: handler {ref!r}: {exc}") from exc.__cause__


def _split(ref: str) -> tuple[str, str, str]:
    module_name, sep, attr = ref.partition(":")
    if not (module_name and sep and attr):
        raise _Refused("expected 'module.path:function'")
    return module_name, sep, attr


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise _Refused(f"no module named {exc.name or module_name!r}") from exc
    except Exception as exc:  # the module's own code failed while importing
        detail = str(exc).replace("\n", " ")
        raise _Refused(f"importing {module_name!r} failed: {type(exc).__name__}: {detail}") from exc


def _attribute(module: ModuleType, attr: str) -> object:
    try:
        return cast(object, getattr(module, attr))
    except AttributeError:
        raise _Refused(f"module {module.__name__!r} has no attribute {attr!r}") from None


def _checked(candidate: object, attr: str) -> HandlerFunction:
    if not inspect.iscoroutinefunction(candidate):
        raise _Refused(f"{attr!r} is not an async def function")
    try:
        inspect.signature(candidate).bind(None, None)
    except (TypeError, ValueError):
        raise _Refused(f"{attr!r} must take (message, ctx)") from None
    return cast(HandlerFunction, candidate)
