"""``python -m chatq.tenant_worker --config PATH --tenant ID``: one worker in the foreground."""

import sys

from chatq.tenant_worker.worker import main

sys.exit(main())
