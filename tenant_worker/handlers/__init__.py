"""chatq."""
