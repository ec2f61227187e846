"""Deluceva: delta-based neural-network inference for fast video analytics on CPUs."""

__version__ = "0.1.0"

from deluceva.convert import convert  # noqa: E402  (the package attribute is the function, not the submodule)

__all__ = ["convert", "__version__"]
