"""`python -m envoy_autoreload` is the `envoy-autoreload` command."""

from envoy_autoreload.cli import main

if __name__ == "__main__":
    main()
