"""The command-line tools (``rcmae-pretrain``, ...); each is also ``python tools/<name>.py``."""
