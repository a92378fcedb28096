"""What a reload leaves behind in the stores: unfinished rows no worker will take up.

A tenant removed from the config, or every tenant when data_dir moves,
leaves its store where it was. Its queued and processing messages and its
pending replies are acknowledged work: the reload answer and the log say how
many stay there (readable with ``chatq history``), and a data_dir change is
refused while any store holds some, unless forced.
"""

from __future__ import annotations

from collections.abc import Iterable

from loguru import logger

from chatq.config import ChatqConfig
from chatq.shared.errors import StoreError
from chatq.tenant_worker.history import unfinished_counts

__all__ = ["describe", "stored_tenants", "unfinished"]

Counts = dict[str, dict[str, int]]


def unfinished(config: ChatqConfig, tenant_ids: Iterable[str]) -> Counts:
    """Per tenant with any: its unfinished messages and pending replies (in `config`'s data_dir)."""
    found: Counts = {}
    for tenant_id in tenant_ids:
        try:
            counts = unfinished_counts(config.store_path(tenant_id))
        except StoreError as exc:  # unreadable: say so rather than claim nothing is left
            logger.warning("reload: cannot count what {} leaves behind: {}", tenant_id, exc)
            counts = {"messages": -1, "replies": -1}
        if any(counts.values()):
            found[tenant_id] = counts
    return found


def stored_tenants(config: ChatqConfig) -> list[str]:
    """Every tenant with a store in `config`'s data_dir, configured now or not."""
    return sorted(path.stem for path in config.supervisor.data_dir.glob("*.sqlite3"))


def describe(counts: Counts) -> str:
    """``acme: 3 messages, 1 reply; globex: ...`` (a count that could not be read: ``?``)."""
    return "; ".join(
        f"{tenant}: {_amount(c['messages'], 'message', 'messages')},"
        f" {_amount(c['replies'], 'reply', 'replies')}"
        for tenant, c in sorted(counts.items())
    )


def _amount(n: int, one: str, many: str) -> str:
    if n < 0:
        return f"? {many}"
    return f"{n} {one if n == 1 else many}"
