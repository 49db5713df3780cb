#!/bin/sh
set -eu
# As the real image does: the *.envsh scripts in /docker-entrypoint.d/ are sourced first.
for script in /docker-entrypoint.d/*.envsh; do
  if [ -x "$script" ]; then . "$script"; fi
done
defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
  [ -e "$template" ] || continue
  name=$(basename "$template" .template)
  envsubst "$defined" < "$template" > "/etc/nginx/conf.d/$name"
done
exec "$@"
