#!/usr/bin/env bash
# Transport security through the binaries: rapidin-server with TLS and a token file, driven by the rapidin CLI
# (--tls-ca, --token-file, RAPIDIN_TOKEN) and by Python's grpc.ssl_channel_credentials; token reload on SIGHUP;
# no token in the server's log; nothing about records on the metrics port. Exit 77 (skip) without openssl.
set -u
SERVER_BIN=$1
CLI=$2
PY=${3:-python3}
command -v openssl >/dev/null || { echo "security_e2e: no openssl command here: skipped"; exit 77; }
work=$(mktemp -d)
spid=
trap 'kill -9 $spid 2>/dev/null; rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; [ -f "$work/server.log" ] && tail -20 "$work/server.log"; exit 1; }

bash "$(dirname "$0")/make-test-certs.sh" "$work" || fail "test certificates (tests/make-test-certs.sh)"
cd "$work"
printf 'qtok-5e1d0a\n' > query.token
printf 'itok-93bc47\n' > ingest.token
printf '# TOKEN ROLE\nqtok-5e1d0a query\nitok-93bc47 ingest\natok-d2f6e8 admin\n' > tokens

port=$((20000 + RANDOM % 20000)); mport=$((port + 1))
"$CLI" make-demo --n 50 --k 16 --queries 1 --seed 3 --out rec.jsonl --out-queries q.jsonl >/dev/null || fail "make-demo"
"$SERVER_BIN" --store store --k 16 --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$mport --shards 2 \
  --tls-cert server.pem --tls-key server.key --auth-tokens tokens >server.log 2>&1 &
spid=$!
for _ in $(seq 100); do grep -q "serving" server.log 2>/dev/null && break; sleep 0.1; done
grep -q "TLS, 3 bearer tokens" server.log || fail "start-up line: $(cat server.log)"
S="--server 127.0.0.1:$port"

"$CLI" stats $S --timeout 5 >out 2>&1 && fail "plaintext against TLS answered"
grep -q "UNAVAILABLE" out || fail "plaintext: $(cat out)"
"$CLI" stats $S --tls-ca ca.pem >out 2>&1 && fail "no token answered"
grep -q "UNAUTHENTICATED" out || fail "no token: $(cat out)"
RAPIDIN_TOKEN=qtok-5e1d0a "$CLI" stats $S --tls-ca ca.pem --json >out 2>&1 || fail "RAPIDIN_TOKEN: $(cat out)"
"$CLI" ingest $S --tls-ca ca.pem --token-file query.token --file rec.jsonl >out 2>&1 && fail "query token ingested"
grep -q "PERMISSION_DENIED" out || fail "query token ingest: $(cat out)"
"$CLI" ingest $S --tls-ca ca.pem --token-file ingest.token --file rec.jsonl >out 2>&1 || fail "ingest: $(cat out)"
grep -q "50 inserted" out || fail "ingest output: $(cat out)"
"$CLI" query $S --tls-ca ca.pem --token-file query.token --vector-file q.jsonl --top-k 2 --json >out 2>&1 \
  || fail "query: $(cat out)"
"$CLI" get $S --tls-ca ca.pem --token-file query.token --id alpaca-1 >out 2>&1 || fail "get: $(cat out)"

# Python's standard TLS credentials and metadata (Debian's python3-grpcio), without generated stubs.
if "$PY" -c 'import grpc' 2>/dev/null; then
  "$PY" - "$port" <<'PY' || fail "python TLS client"
import sys, grpc
port = sys.argv[1]
creds = grpc.ssl_channel_credentials(root_certificates=open("ca.pem", "rb").read())
with grpc.secure_channel(f"localhost:{port}", creds) as ch:
    stats = ch.unary_unary("/rapidin.v1.InfluenceService/Stats", request_serializer=lambda b: b,
                           response_deserializer=lambda b: b)
    reply = stats(b"", metadata=[("authorization", "Bearer qtok-5e1d0a")], timeout=5)
    assert len(reply) > 0, reply
    try:
        stats(b"", timeout=5)
        raise SystemExit("a call without a token was answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
print("python: TLS + token OK")
PY
else
  echo "security_e2e: python3 has no grpc; the Python TLS client check is skipped"
fi

# Nothing about records on the metrics port.
"$PY" - "$mport" <<'PY' || fail "metrics leak record content"
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
assert "rapidin_" in text, text[:200]
assert "alpaca-" not in text and "Instruction" not in text, "record ids or text in /metrics"
PY

# SIGHUP: the query token is replaced; the old one stops working, the new one works.
printf 'qtok-new-77aa01 query\natok-d2f6e8 admin\n' > tokens
kill -HUP $spid
for _ in $(seq 50); do grep -q "reloaded" server.log && break; sleep 0.1; done
grep -q "reloaded tokens: 2 bearer tokens" server.log || fail "reload line: $(tail -3 server.log)"
RAPIDIN_TOKEN=qtok-5e1d0a "$CLI" stats $S --tls-ca ca.pem >out 2>&1 && fail "the replaced token still works"
grep -q "UNAUTHENTICATED" out || fail "replaced token: $(cat out)"
RAPIDIN_TOKEN=qtok-new-77aa01 "$CLI" stats $S --tls-ca ca.pem >out 2>&1 || fail "new token: $(cat out)"
kill -0 $spid || fail "the server died on SIGHUP"

for t in qtok-5e1d0a itok-93bc47 atok-d2f6e8 qtok-new-77aa01; do
  grep -q "$t" server.log && fail "token $t in the server log"
done
kill -TERM $spid && wait $spid || fail "shutdown"
spid=
echo "security_e2e: all checks passed"
