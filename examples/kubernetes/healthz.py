#!/opt/envoy-autoreload/bin/python3
"""The pod's exec probe, installed in the image as /usr/local/lib/envoy-autoreload/healthz.

Exit 0 when the daemon's /healthz answers 200 (an Envoy serves), else 1 with one line
saying why. A file, not `python3 -c SCRIPT` in the manifest: podman's kube play (4.3)
splits an exec probe's arguments on spaces and runs them through a shell, so any script
given inline breaks there. Stdlib only, as it runs beside the daemon on every probe.
"""

import sys
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:9902/healthz"

try:
    urllib.request.urlopen(URL, timeout=3)
except OSError as err:
    sys.exit(f"healthz: {err}")
