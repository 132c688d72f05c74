"""Shipped configs (package data), found by name: see ``rcmae.core.config.config_path``."""
