"""Prefect tasks over the library, one per stage. Importing the package sets up what every task's logs need: the
library's INFO lines (model loads, batch sizing, training progress) reach the Prefect UI with
`PREFECT_LOGGING_EXTRA_LOGGERS=bridgecore` (set in the pools' job variables), and progress bars become periodic
lines in a worker's log instead of screens of redraws."""

import logging

logging.getLogger("bridgecore").setLevel(logging.INFO)

from bridgecore.console import quiet_library_bars  # noqa: E402 - after the level: the library logs from its import

quiet_library_bars()
