"""Defaults shared by several tools (light: the command lines read them before importing torch)."""


KNN_DEFAULTS = {"k": 20, "temperature": 0.07, "pool": "cls", "batch_size": 256}
