"""envoy-autoreload: a hot-restart supervisor for Envoy. Importing the package does nothing."""

__version__ = "0.1.0"
