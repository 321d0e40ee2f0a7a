#!/bin/sh
# Entry point of the proxy image: render nginx.conf.template from the settings,
# then run nginx in the foreground (arguments go to nginx; `-t` only checks).
#
#   TLS               false | true: HTTPS with $CERT_DIR/server.pem and server-key.pem
#   MAX_UPDATE_BYTES  largest request body (16777216), the aggregator's own limit
#   UPSTREAM          the aggregator, host:port (aggregator:8080)
#   LISTEN_PORT       where nginx listens (8080)
#   CERT_DIR          the certificates from scripts/make-certs.sh (/certs)
#   NGINX_PREFIX      the rendered config, pid file and temporary files (/var/lib/nginx)
#   NGINX_USER        the worker processes' user when started as root (www-data)
#   RESOLVER          DNS server for UPSTREAM (the first nameserver in /etc/resolv.conf)
#
# As root (the image), only nginx's master process keeps root, to read the key
# and open the port; connections are served by worker processes as NGINX_USER.
# As any other user (the tests), everything runs as that user.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
template=${TEMPLATE:-$here/nginx.conf.template}
[ -f "$template" ] || template=/etc/nginx/fedsim/nginx.conf.template

fail() {
  echo "fedsim proxy: error: $*" >&2
  exit 2
}

invalid() {  # KEY VALUE EXPECTED
  fail "invalid setting $1='$2': $3"
}

tls=$(printf '%s' "${TLS:-false}" | tr 'A-Z' 'a-z' | tr -d ' ')
case $tls in
  1 | true | yes | on) tls=true ;;
  0 | false | no | off) tls=false ;;
  *) invalid TLS "${TLS:-}" "true or false" ;;
esac

max_body=$(printf '%s' "${MAX_UPDATE_BYTES:-16777216}" | tr -d ' ')
case $max_body in  # as fedsim.config checks it; 19 digits at most, so the shell can compare
  '' | *[!0-9]* | 0?* | ????????????????????*) invalid MAX_UPDATE_BYTES "${MAX_UPDATE_BYTES:-}" "an integer >= 1024" ;;
esac
[ "$max_body" -ge 1024 ] || invalid MAX_UPDATE_BYTES "$max_body" "an integer >= 1024"

port=${LISTEN_PORT:-8080}
case $port in
  '' | *[!0-9]* | 0*) invalid LISTEN_PORT "$port" "a port number from 1 to 65535" ;;
esac
[ "$port" -le 65535 ] || invalid LISTEN_PORT "$port" "a port number from 1 to 65535"

upstream=${UPSTREAM:-aggregator:8080}
printf '%s' "$upstream" | grep -Eq '^[A-Za-z0-9.-]+:[0-9]{1,5}$' \
  || invalid UPSTREAM "$upstream" "host:port, e.g. aggregator:8080"

cert_dir=${CERT_DIR:-/certs}
prefix=${NGINX_PREFIX:-/var/lib/nginx}
for pair in "CERT_DIR=$cert_dir" "NGINX_PREFIX=$prefix"; do
  value=${pair#*=}
  printf '%s' "$value" | grep -Eq '^/[A-Za-z0-9_./-]*$' \
    || invalid "${pair%%=*}" "$value" "an absolute path of letters, digits and _ . / -"
done

resolver=${RESOLVER:-$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf 2>/dev/null || true)}
resolver=${resolver:-127.0.0.1}  # glibc's own default when resolv.conf names none
case $resolver in
  *:*) resolver="[$resolver]" ;;  # an IPv6 address
esac

listen_tls=""
uncomment_tls=""
if [ "$tls" = true ]; then
  for file in server.pem server-key.pem; do
    [ -r "$cert_dir/$file" ] \
      || fail "TLS=true but $cert_dir/$file is missing or unreadable: run scripts/make-certs.sh (it writes ./certs, which Compose mounts at /certs)"
  done
  listen_tls=" ssl"
  uncomment_tls='s/^#tls#//'
fi

user_line=""
if [ "$(id -u)" = 0 ]; then
  user_line="user ${NGINX_USER:-www-data};"
fi

mkdir -p "$prefix"
sed -e "s|@USER@|$user_line|" \
    -e "s|@LISTEN_PORT@|$port|" \
    -e "s|@LISTEN_TLS@|$listen_tls|" \
    -e "s|@UPSTREAM@|$upstream|" \
    -e "s|@RESOLVER@|$resolver|" \
    -e "s|@MAX_BODY@|$max_body|g" \
    -e "s|@CERT_DIR@|$cert_dir|g" \
    -e "${uncomment_tls:-s/^\$//}" \
    "$template" > "$prefix/nginx.conf"

scheme=http
[ "$tls" = true ] && scheme=https
echo "fedsim proxy: $scheme on port $port -> http://$upstream, bodies up to $max_body bytes" >&2

nginx=$(command -v nginx || echo /usr/sbin/nginx)
exec "$nginx" -p "$prefix/" -c "$prefix/nginx.conf" -g 'daemon off;' "$@"
