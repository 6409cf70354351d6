"""`python -m server` starts the HTTP server."""

import sys

from server.cli import main

sys.exit(main())
