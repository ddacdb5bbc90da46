# Empty on purpose: mypy reads this stub instead of hot-restarter.py, upstream's file kept
# byte for byte as Envoy ships it (untyped Python 2/3 code), which `mypy --strict bench`
# would otherwise check. Nothing imports either; see README.md here.
