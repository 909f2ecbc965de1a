#!/bin/sh
# The image's entrypoint. It starts as root only to do what the unprivileged server cannot, then drops to
# the server's user (uid 10001, made in the Dockerfile) for good before anything else runs:
#   - a secret file (PROMPTSERVE_ADMIN_TOKEN_FILE, e.g. /run/secrets/admin_token) is mounted with the host
#     file's owner and mode: a 0600 file of another user is unreadable to uid 10001. Root copies it to a
#     private file the server user owns (mode 0400, on the container's /dev/shm tmpfs, never on disk).
#   - a bind-mounted store directory owned by another user is handed to the server user.
# Started with `--user` (not root), it runs the command as it is.
set -eu

RUN_UID=${PROMPTSERVE_RUN_UID:-10001}
SECRETS_DIR=${PROMPTSERVE_SECRETS_DIR:-/dev/shm/promptserve-secrets}

if [ "$(id -u)" = 0 ]; then
  if [ -n "${PROMPTSERVE_ADMIN_TOKEN_FILE:-}" ]; then
    if [ ! -f "$PROMPTSERVE_ADMIN_TOKEN_FILE" ]; then
      echo "promptserve: PROMPTSERVE_ADMIN_TOKEN_FILE=$PROMPTSERVE_ADMIN_TOKEN_FILE: no such file" >&2
      exit 2
    fi
    mkdir -p "$SECRETS_DIR"
    chown "$RUN_UID:$RUN_UID" "$SECRETS_DIR" && chmod 0500 "$SECRETS_DIR"
    copy="$SECRETS_DIR/admin_token"
    rm -f "$copy"
    (umask 0277 && cat "$PROMPTSERVE_ADMIN_TOKEN_FILE" > "$copy")
    chown "$RUN_UID:$RUN_UID" "$copy"
    export PROMPTSERVE_ADMIN_TOKEN_FILE="$copy"
  fi
  store=${PROMPTSERVE_STORE_DIR:-/data/prompt-store}
  mkdir -p "$store"
  if [ "$(stat -c %u "$store")" != "$RUN_UID" ]; then
    chown -R "$RUN_UID:$RUN_UID" "$store"
  fi
  exec setpriv --reuid="$RUN_UID" --regid="$RUN_UID" --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs promptserve "$@"
fi
exec promptserve "$@"
