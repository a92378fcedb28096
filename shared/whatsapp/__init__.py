"""Meta's WhatsApp Cloud API, as pure functions: no web framework, no client.

The gateway (webhooks in) and the `whatsapp` transport (Graph API out) both
import from here, so the protocol lives in one place.
"""
