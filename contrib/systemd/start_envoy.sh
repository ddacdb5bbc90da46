#!/bin/sh
# Run by envoy-autoreload with RESTART_EPOCH=0, 1, 2, ... (contrib/systemd unit).
# `exec` is required: Envoy must be the daemon's own child so signals reach it and its
# parent-death signal ties it to the daemon.
# --parent-shutdown-time-s bounds how long an old epoch may keep its connections after a
# restart; envoy-autoreload waits that long before the next restart (--max-drain-wait).
exec /usr/local/bin/envoy \
    -c /etc/envoy/envoy.yaml \
    --restart-epoch "$RESTART_EPOCH" \
    --base-id 0 \
    --drain-time-s 20 \
    --parent-shutdown-time-s 30 \
    --log-level info
