#!/usr/bin/env bash
# Test certificates for the TLS tests (tests/security_test.cc, tests/security_e2e.sh), made fresh in DIR with the
# openssl command: CA "ca" and a second CA "other"; "server" (localhost and 127.0.0.1) and "expired", both from ca;
# client certificates "client" (from ca) and "stranger" (from other). Each NAME gets NAME.pem and NAME.key.
# Usage: make-test-certs.sh DIR
set -eu
cd "$1"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
ca() { key "$1"; openssl req -x509 -new -key "$1.key" -out "$1.pem" -subj "/CN=$1" -days 2 2>/dev/null; }
leaf() {  # name ca days extfile
  key "$1"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" -days "$3" \
    -extfile "$4" 2>/dev/null
}
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
ca ca
ca other
leaf server ca 2 server.ext
leaf expired ca -1 server.ext
leaf client ca 2 client.ext
leaf stranger other 2 client.ext
