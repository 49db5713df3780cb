#!/usr/bin/env bash
# SuperNode authentication keys: one ECDSA P-384 key pair per SuperNode.
#
#   deploy/certs/node-keys.sh [OUT_DIR] [COUNT]
#
# writes OUT_DIR/node-<i>.key (private, mode 600, mounted into SuperNode i alone) and
# OUT_DIR/node-<i>.key.pub, which the SuperLink's operator registers before the node joins:
#   flwr supernode register OUT_DIR/node-<i>.key.pub <connection>
# OUT_DIR defaults to this script's folder's nodes/, COUNT to 4. Keys that exist are kept: a
# new key would need registering again. On several machines, each one runs this with COUNT 1
# and sends only its .pub file to the operator.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/nodes}"
count="${2:-4}"
mkdir -p "$out"
for ((i = 0; i < count; i++)); do
  key="$out/node-$i.key"
  if [ ! -f "$key" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "wash-fed node $i" -f "$key"
  fi
  chmod 600 "$key"
  "$here/own-keys.sh" "$key"
  echo "SuperNode $i: $key (register $key.pub)"
done
