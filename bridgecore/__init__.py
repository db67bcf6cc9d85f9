"""vision-bridge's library: no Prefect here (tasks/ and flows/ wrap it)."""

import logging


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Two warnings that installing torchao (the fp8 option) adds to every process that imports diffusers, both about
# code paths vision-bridge never takes; only these messages are dropped:
# - diffusers 0.42 looks for tensor classes torchao >= 0.16 no longer has (needed only to load torchao-serialized
#   checkpoints);
# - torch 2.14 finds torchao registering enums the old way (a deprecation addressed to torchao).
_HARMLESS = {"diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
             "torch.utils._pytree": "%s is an Enum subclass and is now natively supported by torch.compile"}
for _logger, _prefix in _HARMLESS.items():
    logging.getLogger(_logger).addFilter(_DropMessage(_prefix))
