"""Package attributes imported on first use, so the plain-Python parts of llama_jax (the engine's
scheduler, the server's protocol, a CLI's --help) load without jax."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module `__getattr__` for `package`: name -> getattr(import_module(package.exports[name]), name)."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["lazy_getattr"]
