"""One module per command; importing this package registers them all on `vision_bridge.app.app`."""

from vision_bridge.commands import models  # noqa: F401
from vision_bridge.commands import plan  # noqa: F401
from vision_bridge.commands import extract  # noqa: F401
from vision_bridge.commands import edit  # noqa: F401
from vision_bridge.commands import bulk_edit  # noqa: F401
from vision_bridge.commands import train  # noqa: F401
from vision_bridge.commands import evaluate  # noqa: F401
from vision_bridge.commands import quickstart  # noqa: F401
from vision_bridge.commands import cache  # noqa: F401
