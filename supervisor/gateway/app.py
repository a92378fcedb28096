"""The gateway's HTTP face: Meta's handshake and webhooks, and its metrics.

    GET  /whatsapp[/<tenant>]   hub.mode=subscribe + the right hub.verify_token
                                -> 200 with hub.challenge as the plain body; else 403
    POST /whatsapp[/<tenant>]   X-Hub-Signature-256 over the raw body: missing 401,
                                wrong 403; body over max_body_bytes 413; not JSON or
                                not an update 400; then every tenant's part is forwarded
                                and the answer is 200 only once all are committed,
                                503 if any is not (Meta re-delivers; the committed
                                parts come back as duplicates). Unknown numbers: 200.
    GET  /metrics               Prometheus text (see supervisor/gateway/stats.py)

Other paths: 404; other methods: 405. Served by shared/http_server.py
(aiohttp's HTTP parser under a lean protocol). Nothing is stored here: an
acknowledged update is in the tenants' stores, so the process may be killed
at any moment.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from chatq.shared import json_codec
from chatq.shared.errors import ForwardError
from chatq.shared.http_server import Answer, Request
from chatq.shared.whatsapp.webhook import (
    SIGNATURE_HEADER,
    BadUpdate,
    Routed,
    Signature,
    parse_update,
    verify_signature,
)
from chatq.supervisor.gateway.routes import Path, Routes, Split
from chatq.supervisor.gateway.stats import GatewayStats

__all__ = ["Forward", "GatewayApp"]

MAX_CHALLENGE_CHARS = 256
WEBHOOK_PREFIX = "/whatsapp"
Forward = Callable[[str, Routed], Awaitable[None]]
"""Hands one tenant's part to its worker; returns once committed, else ForwardError."""
_Result = tuple[int, dict[str, Any]]
_NOT_FOUND = Answer.json(404, {"error": "not found"})


class GatewayApp:
    """The routes and their handlers; the forwarding and the clock are injected."""

    def __init__(
        self,
        routes: Routes,
        verify_token: str,
        forward: Forward,
        stats: GatewayStats,
        *,
        max_body_bytes: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._routes = routes
        self._verify_token = verify_token
        self._forward = forward
        self.stats = stats
        self._max_body = max_body_bytes
        self._clock = clock

    async def handle(self, request: Request) -> Answer:
        """Route one request: /whatsapp[/<tenant>] (GET, HEAD, POST) and GET /metrics."""
        path = request.path
        if path == "/metrics":
            if request.method in ("GET", "HEAD"):
                return self.metrics()
            return _not_allowed("GET, HEAD")
        tenant = _tenant_of(path)
        if tenant is None:
            return _NOT_FOUND
        if request.method == "POST":
            return await self.webhook(request, tenant or None)
        if request.method in ("GET", "HEAD"):
            return self.handshake(request, tenant or None)
        return _not_allowed("GET, HEAD, POST")

    def handshake(self, request: Request, tenant: str | None) -> Answer:
        query = request.query
        token = query.get("hub.verify_token", "")
        challenge = query.get("hub.challenge", "")
        ok = (
            self._routes.path(tenant) is not None  # an unknown tenant's path: 403, as a bad token
            and query.get("hub.mode") == "subscribe"
            and hmac.compare_digest(token.encode(), self._verify_token.encode())
        )
        if not ok or len(challenge) > MAX_CHALLENGE_CHARS:
            logger.warning("handshake refused on {}: wrong mode or verify token", request.path)
            return self._answer(403, "verification failed")
        logger.info("handshake answered on {}", request.path)
        self.stats.answered(200)
        return Answer(200, challenge.encode(), "text/plain; charset=utf-8")

    async def webhook(self, request: Request, tenant: str | None) -> Answer:
        started = self._clock()
        self.stats.in_flight += 1
        try:
            code, body = await self._webhook(request, tenant)
        finally:
            self.stats.in_flight -= 1
        self.stats.answered(code, self._clock() - started)
        return Answer.json(code, body)

    def metrics(self) -> Answer:
        return Answer(200, self.stats.exposition(), "text/plain; version=0.0.4; charset=utf-8")

    # -- one webhook ------------------------------------------------------------

    async def _webhook(self, request: Request, tenant: str | None) -> _Result:
        path = self._routes.path(tenant)
        if path is None:
            return 404, {"error": "no such tenant"}
        raw = request.body
        if raw is None:
            return 413, {"error": f"body over {self._max_body} bytes"}
        refused = self._check_signature(request, raw, path)
        if refused is not None:
            return refused
        skipped: list[str] = []
        try:
            routed = parse_update(json_codec.loads(raw), skipped)
        except (ValueError, RecursionError) as exc:  # BadUpdate is a ValueError too
            reason = str(exc) if isinstance(exc, BadUpdate) else "body is not JSON"
            logger.warning("webhook refused (400): {:.300}", reason)
            return 400, {"error": reason[:300]}
        if skipped and not any(part.messages or part.statuses for part in routed.values()):
            logger.warning("webhook refused (400): {:.300}", skipped[0])  # nothing usable in it
            return 400, {"error": skipped[0][:300]}
        if skipped:
            self.stats.skipped_items.inc(len(skipped))
            logger.warning(
                "webhook: {} item(s) of an unexpected shape skipped, e.g. {:.300}",
                len(skipped),
                skipped[0],
            )
        split = self._routes.split(routed, path)
        self._note_unknown(split)
        return await self._forward_all(split)

    def _check_signature(self, request: Request, raw: bytes, path: Path) -> _Result | None:
        if path.secret is None:
            logger.warning("webhook on {} refused: no app_secret configured for it", request.path)
            return 403, {"error": "no app_secret configured for this path"}
        verdict = verify_signature(raw, request.headers.get(SIGNATURE_HEADER), path.secret)
        if verdict is Signature.MISSING:
            logger.warning("webhook on {} refused: no {} header", request.path, SIGNATURE_HEADER)
            return 401, {"error": f"missing {SIGNATURE_HEADER}"}
        if verdict is Signature.BAD:
            logger.warning("webhook on {} refused: wrong signature", request.path)
            return 403, {"error": "signature does not match"}
        return None

    def _note_unknown(self, split: Split) -> None:
        for number in split.unknown:
            self.stats.unknown_numbers.inc()
            logger.warning("webhook for phone_number_id {:.40} which no tenant has", number)
        for number, tenant in split.foreign.items():
            self.stats.unknown_numbers.inc()
            logger.warning(
                "webhook for phone_number_id {} of tenant {} refused on this path: that"
                " tenant's app has another secret (its callback is /whatsapp/{})",
                number,
                tenant,
                tenant,
            )

    async def _forward_all(self, split: Split) -> _Result:
        tenants = list(split.parts)
        outcomes = await self._outcomes(split, tenants)
        failed = {}
        for tenant, outcome in zip(tenants, outcomes, strict=True):
            if isinstance(outcome, ForwardError):
                failed[tenant] = str(outcome)
            elif outcome is not None:
                logger.opt(exception=outcome).error("forwarding to {} failed", tenant)
                failed[tenant] = "internal error"
        if failed:
            logger.warning("webhook answered 503: {}", "; ".join(failed.values()))
            return 503, {"error": "not committed now; send again", "tenants": sorted(failed)}
        messages = statuses = 0
        for part in split.parts.values():
            messages += len(part.messages)
            statuses += len(part.statuses)
        unknown = len(split.unknown) + len(split.foreign)
        return 200, {"messages": messages, "statuses": statuses, "unknown_numbers": unknown}

    async def _outcomes(self, split: Split, tenants: list[str]) -> list[BaseException | None]:
        """Each tenant's forward: None once committed, else what it raised."""
        if len(tenants) == 1:  # the usual webhook: no task and gather for one forward
            try:
                await self._forward(tenants[0], split.parts[tenants[0]])
            except Exception as exc:
                return [exc]
            return [None]
        return await asyncio.gather(
            *(self._forward(tenant, split.parts[tenant]) for tenant in tenants),
            return_exceptions=True,
        )

    def _answer(self, code: int, error: str) -> Answer:
        self.stats.answered(code)
        return Answer.json(code, {"error": error})


def _tenant_of(path: str) -> str | None:
    """'' for /whatsapp, the id for /whatsapp/<id>; None for any other path."""
    if not path.startswith(WEBHOOK_PREFIX):
        return None
    rest = path[len(WEBHOOK_PREFIX) :]
    if not rest:
        return ""
    if rest[0] != "/" or len(rest) == 1 or "/" in rest[1:]:
        return None
    return rest[1:]


def _not_allowed(allow: str) -> Answer:
    return Answer(405, b'{"error":"method not allowed"}', headers=(("Allow", allow),))
