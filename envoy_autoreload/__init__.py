"""envoy-autoreload: a hot-restart supervisor for Envoy. Importing the package does nothing."""

__version__ = "0.1.0"

# Set by a re-exec (reexec.py) for the new image: the fd holding the hand-over
# (handover.py). Here so that a plain start knows it is none without importing that.
HANDOVER_FD_VARIABLE = "ENVOY_AUTORELOAD_HANDOVER_FD"
