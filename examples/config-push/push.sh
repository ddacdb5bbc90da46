#!/bin/sh
# How a push should replace /etc/envoy so that envoy-autoreload restarts once, on a whole
# config: stage the new tree, then let rsync rename every file into place at the end
# (--delay-updates). envoy-autoreload's debounce turns the burst into one restart, the
# content digest skips pushes that changed nothing, and validation refuses a broken push
# while the running Envoy keeps serving. Salt's file.recurse and Ansible's copy/template
# modules write each file atomically (temp file + rename), which works the same way.
#
#   ./push.sh staged-config/ [host]
set -eu
src=${1:?usage: push.sh STAGED_DIR [HOST]}
dest=/etc/envoy/
if [ -n "${2:-}" ]; then
    rsync -a --delete --delay-updates "$src" "$2:$dest"
    # Optional: wait for the outcome, and fail the push if the new config does not serve.
    ssh "$2" systemctl reload envoy-autoreload
else
    rsync -a --delete --delay-updates "$src" "$dest"
    systemctl reload envoy-autoreload
fi
