"""``python -m chatq.supervisor.gateway``: the gateway in the foreground."""

import sys

from chatq.supervisor.gateway.main import main

sys.exit(main())
