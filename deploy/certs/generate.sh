#!/usr/bin/env bash
# Generate a CA and a SuperLink server certificate for TLS between the SuperLink, the
# SuperNodes and the flwr CLI.
#
#   deploy/certs/generate.sh [OUT_DIR] [EXTRA_SAN ...]
#
# OUT_DIR defaults to this script's folder. The server certificate is valid for the names
# `superlink` and `localhost`, the address 127.0.0.1, and every EXTRA_SAN given (a host name,
# or an address written IP:x.x.x.x), e.g. the SuperLink's public name for multi-machine use.
# Private keys are mode 600. server.key is read by the SuperLink (the image's user, uid 49999)
# and the proxy: it is given to KEY_OWNER (default 49999) when this runs as root, and the
# script says what to run otherwise. ca.key stays with you and is mounted nowhere.
# A CA that OUT_DIR already holds is kept (node hosts keep trusting it); the server
# certificate is made again, for the names given this time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$(dirname "$0")}"
shift || true
mkdir -p "$out"
san="DNS:superlink,DNS:proxy,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do
  case "$extra" in IP:*) san="$san,$extra" ;; *) san="$san,DNS:$extra" ;; esac
done

if [ -f "$out/ca.key" ] && [ -f "$out/ca.crt" ]; then
  echo "keeping the CA in $out (ca.crt, ca.key)"
else
  openssl genrsa -out "$out/ca.key" 4096 2>/dev/null
  openssl req -x509 -new -nodes -key "$out/ca.key" -sha256 -days 365 \
    -subj "/CN=wash-fed CA" -out "$out/ca.crt"
fi

openssl genrsa -out "$out/server.key" 4096 2>/dev/null
openssl req -new -key "$out/server.key" -subj "/CN=superlink" -out "$out/server.csr"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days 365 -sha256 -out "$out/server.pem" \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "$san") 2>/dev/null
rm -f "$out/server.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
chmod 600 "$out/ca.key" "$out/server.key"
"$here/own-keys.sh" "$out/server.key"
echo "CA: $out/ca.crt; SuperLink: $out/server.pem, $out/server.key (SAN $san)"
