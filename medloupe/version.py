"""The package version (its own module, so anything may import it without importing more)."""

__version__ = "0.1.0"
