#!/usr/bin/env bash
# The TLS material of the compose stack's Kafka (infra/docker-compose.yml): a private CA, the
# broker's certificate and two client certificates. The broker requires a client certificate
# (mutual TLS), so a certificate of this CA is what lets a client in. Needs openssl >= 1.1.1.
#
#   infra/tls/make-certs.sh            # writes infra/tls/certs/; refuses to overwrite it
#   infra/tls/make-certs.sh --force    # a new CA and certificates; then restart the stack
#   sudo infra/tls/make-certs.sh       # see "Who reads what" below
#
# Written to infra/tls/certs/ (git-ignored: never commit it), keys readable by their owner only:
#   ca/ca.key, ca/ca.crt        the CA; its key is mounted nowhere
#   kafka/                      the broker (/etc/kafka/secrets): kafka.pem (key and chain),
#                               ca.crt, client.properties (its healthcheck, as a TLS client)
#   client/                     the mmops containers (/etc/mmops/tls): client.crt, client.key, ca.crt
#   host/                       your shell, for `mmops stream-demo` against localhost:9094:
#                               host.crt, host.key, ca.crt
#
# Who reads what: the containers run as other users than you (kafka: uid 1000, mmops: uid 10001)
# and see these files through bind mounts. As root (sudo) the script hands kafka/ and client/ to
# those users and host/ to you; otherwise it grants them read access with ACLs (setfacl), or, if
# that fails, makes kafka/ and client/ readable by every local user, and says so.
#
# Environment: CERT_DAYS (default 825), KAFKA_UID (1000), MMOPS_UID (10001), KAFKA_EXTRA_SANS
# (more names of the broker, e.g. "DNS:kafka.example.com,IP:10.0.0.5", when clients reach it by
# another name than kafka or localhost), TLS_OUT (default: certs/ beside this script).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${TLS_OUT:-$here/certs}"
days="${CERT_DAYS:-825}"
kafka_uid="${KAFKA_UID:-1000}"
mmops_uid="${MMOPS_UID:-10001}"
sans="DNS:kafka,DNS:localhost,IP:127.0.0.1${KAFKA_EXTRA_SANS:+,$KAFKA_EXTRA_SANS}"

if [ -e "$out/ca/ca.key" ] && [ "${1:-}" != "--force" ]; then
  echo "$out already holds a CA; --force makes a new one (and new certificates)" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "make-certs.sh needs openssl" >&2; exit 1; }

umask 077
rm -rf "$out/ca" "$out/kafka" "$out/client" "$out/host"
mkdir -p "$out/ca" "$out/kafka" "$out/client" "$out/host"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# quiet CMD...: run openssl without its chatter, but show it when it fails.
quiet() {
  "$@" > "$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
}

# EC P-256: small, fast, and read by both Java (the broker) and Python's ssl (kafka-python).
quiet openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 3650 \
  -subj "/CN=mmops compose Kafka CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$out/ca/ca.key" -out "$out/ca/ca.crt"

# issue NAME CN USAGES SANS: NAME.key (PKCS#8, unencrypted) and NAME.crt signed by the CA.
issue() {
  local name=$1 cn=$2 usages=$3 san=${4:-}
  quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/$name.key"
  quiet openssl req -new -key "$work/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$usages"
    if [ -n "$san" ]; then echo "subjectAltName=$san"; fi
  } > "$work/$name.ext"
  quiet openssl x509 -req -in "$work/$name.csr" -CA "$out/ca/ca.crt" -CAkey "$out/ca/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/$name.ext" \
    -out "$work/$name.crt"
}

# The broker presents its certificate to clients and, on the inter-broker listener, to itself.
issue kafka kafka serverAuth,clientAuth "$sans"
cat "$work/kafka.key" "$work/kafka.crt" "$out/ca/ca.crt" > "$out/kafka/kafka.pem"
cp "$out/ca/ca.crt" "$out/kafka/ca.crt"
cat > "$out/kafka/client.properties" <<'PROPERTIES'
# The broker's healthcheck (kafka-broker-api-versions.sh --command-config) as a TLS client.
security.protocol=SSL
ssl.truststore.type=PEM
ssl.truststore.location=/etc/kafka/secrets/ca.crt
ssl.keystore.type=PEM
ssl.keystore.location=/etc/kafka/secrets/kafka.pem
PROPERTIES

issue client mmops clientAuth
cp "$work/client.key" "$work/client.crt" "$out/client/"
cp "$out/ca/ca.crt" "$out/client/ca.crt"

issue host "mmops-host-${SUDO_USER:-${USER:-user}}" clientAuth
cp "$work/host.key" "$out/host/host.key"
cp "$work/host.crt" "$out/host/host.crt"
cp "$out/ca/ca.crt" "$out/host/ca.crt"

# share UID DIR: let the container user UID read DIR's files.
share() {
  local uid=$1 dir=$2
  if [ "$(id -u)" = 0 ]; then
    chown -R "$uid" "$dir"
  elif command -v setfacl >/dev/null && setfacl -R -m "u:$uid:rX" "$dir" 2>/dev/null; then
    :
  else
    chmod -R a+rX "$dir"
    echo "warning: $dir is readable by every local user (no root, no setfacl); run with sudo" >&2
  fi
}
share "$kafka_uid" "$out/kafka"
share "$mmops_uid" "$out/client"
if [ "$(id -u)" = 0 ] && [ -n "${SUDO_UID:-}" ]; then
  chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$out/host"
fi

echo "wrote $out (broker names: $sans; valid $days days)"
echo "from the host: KAFKA_BOOTSTRAP_SERVERS=localhost:9094 KAFKA_SECURITY_PROTOCOL=SSL" \
  "KAFKA_SSL_CAFILE=$out/host/ca.crt KAFKA_SSL_CERTFILE=$out/host/host.crt" \
  "KAFKA_SSL_KEYFILE=$out/host/host.key mmops stream-demo --data data/demo"
