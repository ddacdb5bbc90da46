#!/bin/sh
# Run by envoy-autoreload with RESTART_EPOCH=0, 1, 2, ... (contrib/systemd unit).
# `exec` is required: Envoy must be the daemon's own child so signals reach it and its
# parent-death signal ties it to the daemon.
# --parent-shutdown-time-s bounds how long an old epoch may keep its connections after a
# restart; envoy-autoreload waits that long before the next restart (--max-drain-wait).
# ENVOY_AUTORELOAD_SNAPSHOT is the read-only copy (in the unit's StateDirectory) of the
# config the daemon validated: starting it means what runs is byte for byte what passed,
# and a rollback starts the last good config. Unset, /etc/envoy/envoy.yaml is started.
exec /usr/local/bin/envoy \
    -c "${ENVOY_AUTORELOAD_SNAPSHOT:-/etc/envoy/envoy.yaml}" \
    --restart-epoch "$RESTART_EPOCH" \
    --base-id 0 \
    --drain-time-s 20 \
    --parent-shutdown-time-s 30 \
    --log-level info
