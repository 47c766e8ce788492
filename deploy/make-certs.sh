#!/bin/sh
# Certificates and a token for deploy/docker-compose.secure.yml (mutual TLS + token):
#
#   deploy/make-certs.sh [DIR] [PSERVER_NAME...]
#
# DIR (default deploy/certs) gets:
#   ca.pem                  the job's own CA (ca.key, its private key, stays next to it:
#                           keep it off the machines that run the job)
#   server.pem, server.key  the pservers' certificate, valid for every PSERVER_NAME
#                           (default pserver-0 pserver-1), localhost and 127.0.0.1; pservers
#                           also present it as clients (coordinator calls, SaveShard)
#   client.pem, client.key  the trainers' client certificate (mtls)
#   token                   the shared token (64 hex digits)
# Private keys and the token are readable by the image's user only (uid 10001) when this
# runs as root; otherwise by the user who ran it (PSRT_CERT_UID/PSRT_CERT_GID change the
# owner, given root). Nothing is overwritten: remove DIR to make new ones.
set -eu
dir=${1:-deploy/certs}
[ $# -gt 0 ] && shift
names=${*:-pserver-0 pserver-1}
days=${PSRT_CERT_DAYS:-825}

if [ -e "$dir/ca.pem" ]; then
    echo "make-certs: $dir/ca.pem exists; remove $dir to make new certificates" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077
san="DNS:localhost,IP:127.0.0.1"
for n in $names; do san="$san,DNS:$n"; done

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days "$days" \
    -subj "/CN=psrt job CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null

leaf() {  # leaf NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=$2" \
        -keyout "$dir/$1.key" -out "$dir/$1.csr" 2>/dev/null
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        [ -n "${4:-}" ] && echo "subjectAltName=$4"
    } > "$dir/$1.ext"
    openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days "$days" -extfile "$dir/$1.ext" -out "$dir/$1.pem" 2>/dev/null
    rm -f "$dir/$1.csr" "$dir/$1.ext"
}
leaf server "psrt pserver" "serverAuth,clientAuth" "$san"
leaf client "psrt trainer" "clientAuth"
rm -f "$dir/ca.srl"
openssl rand -hex 32 > "$dir/token"

chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
chmod 600 "$dir/ca.key" "$dir/server.key" "$dir/client.key" "$dir/token"
chmod 755 "$dir"
if [ "$(id -u)" = 0 ]; then
    chown "${PSRT_CERT_UID:-10001}:${PSRT_CERT_GID:-10001}" \
        "$dir/server.key" "$dir/client.key" "$dir/token"
else
    echo "make-certs: not root, so the keys and token belong to $(id -un); the image's user" \
         "(uid 10001) cannot read them: run this with sudo" >&2
fi
echo "make-certs: CA, pserver certificate ($san), trainer certificate and token in $dir"
