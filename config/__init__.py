"""chatq configuration: the settings models and the TOML + environment loader.

    from chatq.config import load_config
    config = load_config()                 # config/tenants.toml, or $CHATQ_CONFIG
    config.tenant("acme").max_queue_size
    config.socket_path("acme")             # <run_dir>/acme.sock

Any problem raises `shared.errors.ConfigError` with one line naming the file,
the tenant and the field.
"""

from chatq.config.loader import DEFAULT_CONFIG_PATH, load_config
from chatq.config.settings import ChatqConfig, SupervisorSettings, TenantConfig

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ChatqConfig",
    "SupervisorSettings",
    "TenantConfig",
    "load_config",
]
