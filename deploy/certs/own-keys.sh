#!/usr/bin/env bash
# Give private keys to the user that reads them in its container (KEY_OWNER, default 49999:
# the image's `app` user), so that a key stays mode 600 and its service can still read it.
# For processes started by hand on a plain machine, use KEY_OWNER=$(id -u).
#
#   deploy/certs/own-keys.sh KEY...
set -euo pipefail
owner="${KEY_OWNER:-49999}"
if [ "$(id -u)" -eq 0 ]; then
  chown "$owner" "$@"
elif [ "$(id -u)" -ne "$owner" ]; then
  echo "The containers run as uid $owner and cannot read these mode-600 keys yet; run:" >&2
  echo "  sudo chown $owner $*" >&2
fi
