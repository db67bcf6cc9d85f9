"""vision-bridge's library: no Prefect here (tasks/ and flows/ wrap it)."""

import logging


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Warnings that every process importing diffusers prints, all about code paths vision-bridge never takes; only
# these messages are dropped:
# - diffusers 0.42 looks for tensor classes torchao >= 0.16 no longer has (needed only to load torchao-serialized
#   checkpoints; torchao is the fp8 option);
# - torch 2.14 finds torchao registering enums the old way (a deprecation addressed to torchao);
# - bitsandbytes (the 8-bit VLM option) fails to fetch a CPU 4-bit matmul kernel from the Hub at import: offline,
#   or refused by the kernels package's trust check, and offline that package says it skipped the check (we never
#   run 4-bit on a CPU).
_HARMLESS = {"diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
             "torch.utils._pytree": "%s is an Enum subclass and is now natively supported by torch.compile",
             "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
             "kernels._internals.hf_hub":
                 "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"}
for _logger, _prefix in _HARMLESS.items():
    logging.getLogger(_logger).addFilter(_DropMessage(_prefix))
