"""Webhook updates shaped like Meta's (WhatsApp Cloud API reference examples)."""

from __future__ import annotations

from typing import Any

WABA_ID = "102290129340398"


def text_message(wamid: str, sender: str = "16315551181", body: str = "hi") -> dict[str, Any]:
    return {
        "from": sender,
        "id": wamid,
        "timestamp": "1700000000",
        "type": "text",
        "text": {"body": body},
    }


def contact(wa_id: str, name: str) -> dict[str, Any]:
    return {"profile": {"name": name}, "wa_id": wa_id}


def status(wamid: str, state: str, *, code: int | None = None, title: str = "") -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": wamid,
        "status": state,
        "timestamp": "1700000100",
        "recipient_id": "16315551181",
    }
    if state != "read":
        item["conversation"] = {"id": "c0ffee", "origin": {"type": "service"}}
        item["pricing"] = {"billable": True, "pricing_model": "CBP", "category": "service"}
    if code is not None:
        item["errors"] = [{"code": code, "title": title, "message": title}]
    return item


def change(
    phone_number_id: str,
    *,
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    contacts: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_number_id},
    }
    if contacts is not None:
        value["contacts"] = contacts
    if messages is not None:
        value["messages"] = messages
        if contacts is None:
            value["contacts"] = [
                contact(m["from"], f"name-{m['from']}")
                for m in messages
                if isinstance(m, dict) and isinstance(m.get("from"), str)
            ]
    if statuses is not None:
        value["statuses"] = statuses
    return {"value": value, "field": "messages"}


def update(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    """An update whose changes are spread over `entries` entries."""
    buckets: list[list[dict[str, Any]]] = [[] for _ in range(entries)]
    for n, item in enumerate(changes):
        buckets[n % entries].append(item)
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": WABA_ID, "changes": bucket} for bucket in buckets],
    }
