#!/usr/bin/env bash
# SuperNode authentication keys: one ECDSA P-384 key pair per SuperNode.
#
#   deploy/certs/node-keys.sh [OUT_DIR] [COUNT | FIRST-LAST]
#
# writes OUT_DIR/node-<i>.key (private, mode 600, mounted into SuperNode i alone) and
# OUT_DIR/node-<i>.key.pub, which the SuperLink's operator registers before the node joins:
#   flwr supernode register OUT_DIR/node-<i>.key.pub <connection>
# OUT_DIR defaults to this script's folder's nodes/, COUNT to 4 (members 0 to COUNT-1);
# FIRST-LAST makes the keys of members FIRST to LAST (a node host's). Keys that exist are kept:
# a new key would need registering again. Each machine makes its own and sends only the .pub
# files to the operator.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/nodes}"
members="${2:-4}"
case "$members" in
  *-*) first="${members%-*}" last="${members#*-}" ;;
  *) first=0 last=$((members - 1)) ;;
esac
mkdir -p "$out"
for ((i = first; i <= last; i++)); do
  key="$out/node-$i.key"
  if [ ! -f "$key" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "wash-fed node $i" -f "$key"
  fi
  chmod 600 "$key"
  "$here/own-keys.sh" "$key"
  echo "SuperNode $i: $key (register $key.pub)"
done
