#!/bin/sh
# Started by envoy-autoreload with RESTART_EPOCH=0, 1, 2, ...
# `exec` matters: the supervisor's child PID must be Envoy itself, so signals reach it
# and Envoy's parent-death signal ties it to the supervisor (ENVOY_FACTS §11).
# Short drain and shutdown times suit a dev loop; production keeps Envoy's defaults
# or whatever its connections need.
# ENVOY_AUTORELOAD_SNAPSHOT is the read-only copy of the config the daemon validated: start
# exactly that, so a save after validation cannot reach Envoy unchecked and a rollback
# starts the last good config. Without the daemon (or without generations) it is unset and
# the file in this directory is used.
here=$(dirname "$0")
exec "${ENVOY_BIN:-envoy}" \
    -c "${ENVOY_AUTORELOAD_SNAPSHOT:-${ENVOY_CONFIG:-$here/envoy.yaml}}" \
    --restart-epoch "$RESTART_EPOCH" \
    --base-id "${ENVOY_BASE_ID:-0}" \
    --drain-time-s 2 --parent-shutdown-time-s 3 \
    --log-level "${ENVOY_LOG_LEVEL:-warning}"
