"""Deluceva: delta-based neural-network inference for fast video analytics on CPUs."""

__version__ = "0.1.0"
