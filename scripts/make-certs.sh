#!/usr/bin/env bash
# Make a local certificate authority and the aggregator's TLS certificate (for TLS=true).
#
#   scripts/make-certs.sh [--name HOST_OR_IPV4]... [DIR]
#
# DIR (default: ./certs in the project, which Compose mounts at /certs) receives:
#   ca.pem           the CA's certificate: workers verify the proxy with it (TLS_CA)
#   ca-key.pem       the CA's private key (0600): only this script uses it
#   server.pem       the proxy's certificate, signed by the CA, for the names
#                    proxy, aggregator, localhost, 127.0.0.1 and every --name
#   server-key.pem   the proxy's private key (0600)
#
# Idempotent: an existing CA is kept, and so is a server certificate that the CA
# signed, that names every name asked for and that is valid for 30 more days;
# anything else is made (again). Keys are ECDSA P-256; the CA lasts 10 years, the
# server certificate 825 days. Needs only the openssl command.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/certs
names=(proxy aggregator localhost 127.0.0.1)

usage() {
  sed -n '4p' "$0" | sed 's/^#   /usage: /' >&2
  exit 2
}

while (($#)); do
  case $1 in
    --name)
      [ $# -ge 2 ] && [ -n "$2" ] || usage
      [[ $2 =~ ^[A-Za-z0-9.-]+$ ]] || { echo "make-certs: --name '$2': a host name or an IPv4 address" >&2; exit 2; }
      names+=("$2")
      shift 2
      ;;
    -h | --help) usage ;;
    -*) echo "make-certs: unknown option $1" >&2; usage ;;
    *) dir=$1; shift ;;
  esac
done

command -v openssl >/dev/null || { echo "make-certs: openssl not found (Debian: apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
umask 077  # keys are readable by their owner only; certificates are made 0644 below

ca=$dir/ca.pem
ca_key=$dir/ca-key.pem
cert=$dir/server.pem
key=$dir/server-key.pem

# subjectAltName: DNS names and IP addresses told apart.
san=""
for name in "${names[@]}"; do
  if [[ $name =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}$ ]]; then
    san+="${san:+,}IP:$name"
  else
    san+="${san:+,}DNS:$name"
  fi
done

if [ -s "$ca" ] && [ -s "$ca_key" ]; then
  echo "CA: kept $ca"
else
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca_key" 2>/dev/null
  openssl req -x509 -new -key "$ca_key" -sha256 -days 3650 \
    -subj "/CN=fedsim local CA $(date -u +%Y-%m-%d)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$ca"
  chmod 0644 "$ca"
  rm -f "$cert"  # a new CA: the old server certificate no longer verifies
  echo "CA: made $ca (key $ca_key, valid 10 years)"
fi

# Why the current server certificate cannot stay, or nothing when it can.
stale() {
  [ -s "$cert" ] && [ -s "$key" ] || { echo "none yet"; return; }
  openssl verify -CAfile "$ca" "$cert" >/dev/null 2>&1 || { echo "not signed by $ca"; return; }
  openssl x509 -in "$cert" -noout -checkend $((30 * 86400)) >/dev/null || { echo "expires within 30 days"; return; }
  local have want
  have=$(openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
  for want in ${san//,/ }; do
    want=${want/IP:/IPAddress:}
    [[ ,$have, == *,$want,* ]] || { echo "does not name ${want#*:}"; return; }
  done
  [ "$(openssl pkey -in "$key" -pubout 2>/dev/null)" = "$(openssl x509 -in "$cert" -noout -pubkey)" ] \
    || { echo "does not match $key"; return; }
}

why=$(stale)
if [ -z "$why" ]; then
  echo "server: kept $cert (valid until $(openssl x509 -in "$cert" -noout -enddate | cut -d= -f2))"
else
  csr=$(mktemp)
  trap 'rm -f "$csr"' EXIT
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key" 2>/dev/null
  openssl req -new -key "$key" -subj "/CN=${names[0]}" -out "$csr"
  # -copy_extensions is not needed: the extensions are given here, not taken from the request.
  openssl x509 -req -in "$csr" -CA "$ca" -CAkey "$ca_key" -CAcreateserial -sha256 -days 825 \
    -extfile <(printf '%s\n' \
      "basicConstraints=critical,CA:FALSE" \
      "keyUsage=critical,digitalSignature" \
      "extendedKeyUsage=serverAuth" \
      "subjectKeyIdentifier=hash" \
      "authorityKeyIdentifier=keyid" \
      "subjectAltName=$san") \
    -out "$cert" 2>/dev/null
  chmod 0644 "$cert"
  rm -f "$dir/ca.srl"
  echo "server: made $cert (was: $why) for ${names[*]}, valid 825 days"
fi

echo "TLS=true in .env uses them: the proxy serves $cert, workers verify it with $ca"
