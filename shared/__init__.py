"""Code both the supervisor and the tenant workers use."""
