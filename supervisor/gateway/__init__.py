"""The gateway: one public webhook endpoint that routes Meta's updates to tenants."""
