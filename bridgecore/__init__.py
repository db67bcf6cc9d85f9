"""vision-bridge's library: no Prefect here (tasks/ and flows/ wrap it)."""

import logging


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# diffusers 0.42 warns on every model load when torchao (the fp8 option) is installed, because it looks for tensor
# classes that torchao >= 0.16 no longer has; they matter only for loading torchao-serialized checkpoints, which
# vision-bridge never does. Only that one message is dropped.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
    _DropMessage("Unable to import `torchao` Tensor objects"))
