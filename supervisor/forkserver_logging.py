"""Imported by the fork server after the modules its children run (``spawn.PRELOAD``).

Sets up, once, the logging its workers and the gateway use
(`chatq.shared.log.preset_logging`), at the level and in the format the
supervisor named in ``CHATQ_FORKSERVER_LOG`` ("LEVEL FORMAT"): a child whose
settings match only points the inherited sink at its pipe. Without the
variable, or with a setting it cannot use, each child sets up its own, as
before. The variable is dropped here, so workers do not inherit it.
"""

import contextlib
import os

from chatq.shared.errors import ConfigError
from chatq.shared.log import preset_logging

_setting = os.environ.pop("CHATQ_FORKSERVER_LOG", "").split()
if len(_setting) == 2 and _setting[1] in ("text", "json"):
    with contextlib.suppress(ConfigError):  # a bad level: each child reports it itself
        preset_logging(_setting[0], "text" if _setting[1] == "text" else "json")
