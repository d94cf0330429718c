#!/usr/bin/env python3
"""The HTTP/JSON API (server/http.h) with a plain client (urllib), against live servers on loopback:
every route, every error code the gateway maps, bearer tokens and roles, a deadline, TLS and mutual TLS, a
router, and the OpenAPI description checked against the answers of the server that serves it.

Usage: http_test.py RAPIDIN_SERVER RAPIDIN_CLI
The store is project-made: ten records (Alpaca, chat, text) cached with tests/fixtures/qwen2_chat.
"""
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from e2e_util import free_port, wait_healthy

SERVER, CLI = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "fixtures", "qwen2_chat")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def call(base, method, path, body=None, headers=None, raw=None, ctx=None):
    """(status, parsed JSON or text, headers)"""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            text, status, hdrs = r.read().decode(), r.status, r.headers
    except urllib.error.HTTPError as e:
        text, status, hdrs = e.read().decode(), e.code, e.headers
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def start(args, http_port, scheme="http", ctx=None):
    log = tempfile.NamedTemporaryFile(delete=False, suffix=".log")
    if "--metrics-listen" not in args:
        args = args + ["--metrics-listen", ""]
    p = subprocess.Popen([SERVER] + args + ["--http-listen", f"127.0.0.1:{http_port}"],
                         stdout=log, stderr=subprocess.STDOUT)
    base = f"{scheme}://127.0.0.1:{http_port}"
    if wait_healthy(base, p, ctx):
        return p, base
    p.kill()
    print(open(log.name).read())
    raise SystemExit(f"server did not start: {args}")


def stop(p):
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()


def error_of(status, body, want_status, want_code, words=""):
    ok = (status == want_status and isinstance(body, dict) and "error" in body and
          body["error"].get("code") == want_status and body["error"].get("status") == want_code and
          words in body["error"].get("message", ""))
    check(ok, f"want {want_status} {want_code} '{words}', got {status} {body}")


def check_schema(spec, schema, value, where):
    """Every key of an answer is in its schema (recursively through objects and arrays)."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            check(k in schema["properties"], f"{where}: '{k}' is not in the OpenAPI schema")
            if k in schema["properties"]:
                check_schema(spec, schema["properties"][k], v, f"{where}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value[:3]):
            check_schema(spec, schema["items"], v, f"{where}[{i}]")


def main():
    work = tempfile.mkdtemp()
    recs = [{"id": f"r{i}", "instruction": f"Question number {i}?",
             "output": f"Answer {i} is about the store and the router."} for i in range(8)]
    recs.append({"id": "c0", "messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello there"}]})
    recs.append({"id": "t0", "text": "plain words about vectors"})
    with open(f"{work}/recs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    subprocess.run([CLI, "cache", "--model", MODEL, "--data", f"{work}/recs.jsonl", "--store", f"{work}/store",
                    "--k", "128"], check=True, capture_output=True)
    with open(f"{work}/tokens", "w") as f:
        f.write("qtok query\natok admin\n")

    # A shard server with a model and bearer tokens.
    grpc_port, metrics_port = free_port(), free_port()
    p, base = start(["--store", f"{work}/store", "--model", MODEL, "--listen", f"127.0.0.1:{grpc_port}",
                     "--auth-tokens", f"{work}/tokens", "--metrics-listen", f"127.0.0.1:{metrics_port}"], free_port())
    q = {"Authorization": "Bearer qtok"}
    a = {"Authorization": "Bearer atok"}
    try:
        status, spec, _ = call(base, "GET", "/openapi.json")
        check(status == 200 and spec.get("openapi", "").startswith("3."), "openapi.json")
        # Every route, answered.
        status, st, _ = call(base, "GET", "/v1/stats", headers=q)
        check(status == 200 and st["numRecords"] == "10" and st["k"] == 128 and st["modelLoaded"], f"stats {st}")
        query = {"instruction": "Question number 3?", "generation": "Answer 3 is about the store and the router.",
                 "topK": 3, "harmfulK": 1, "attributions": True}
        status, qr, _ = call(base, "POST", "/v1/query", query, headers=q)
        check(status == 200 and qr["result"]["helpful"][0]["id"] == "r3", f"query {str(qr)[:300]}")
        check(all(t["field"] == "generation" for t in qr["result"]["helpful"][0]["generationTokens"]),
              "generation tokens over HTTP")
        # snake_case field names are accepted too (protobuf's JSON parser).
        status, qr2, _ = call(base, "POST", "/v1/query", {"instruction": "Question number 3?",
                                                          "generation": "Answer 3 is about the store and the router.",
                                                          "top_k": 1}, headers=q)
        check(status == 200 and qr2["result"]["helpful"][0]["id"] == "r3", "snake_case request")
        status, chat, _ = call(base, "POST", "/v1/query", {"messages": recs[8]["messages"], "topK": 1}, headers=q)
        check(status == 200 and chat["result"]["helpful"][0]["id"] == "c0", f"chat query {chat}")
        status, rec, _ = call(base, "GET", "/v1/records/c0?include_vector=true", headers=q)
        check(status == 200 and rec["record"]["messages"][1]["content"] == "hello there" and len(rec["vector"]) == 128,
              f"record {str(rec)[:200]}")
        vec = rec["vector"]
        status, vr, _ = call(base, "POST", "/v1/query-by-vector",
                             {"queries": [{"values": vec}], "topK": 2, "projectionStateId": st["projectionStateId"]},
                             headers=q)
        check(status == 200 and vr["results"][0]["helpful"][0]["id"] == "c0", f"query-by-vector {str(vr)[:200]}")
        # The OpenAPI description matches what the server says.
        answers = {("/v1/stats", "get"): st, ("/v1/query", "post"): qr, ("/v1/records/{id}", "get"): rec,
                   ("/v1/query-by-vector", "post"): vr}
        for (path, method), body in answers.items():
            op = spec["paths"][path][method]
            check_schema(spec, op["responses"]["200"]["content"]["application/json"]["schema"], body, path)
        # Errors, each as documented.
        error_of(*call(base, "POST", "/v1/query", raw=b'{"instruction": 5', headers=q)[:2], 400, "INVALID_ARGUMENT",
                 "not a QueryRequest")
        error_of(*call(base, "POST", "/v1/query", {"instructionz": "x"}, headers=q)[:2], 400, "INVALID_ARGUMENT",
                 "instructionz")
        error_of(*call(base, "POST", "/v1/query", dict(query, topK=0), headers=q)[:2], 400, "INVALID_ARGUMENT",
                 "top_k")
        error_of(*call(base, "POST", "/v1/query", {"generation": "x", "topK": 1}, headers=q)[:2], 400,
                 "INVALID_ARGUMENT", "instruction is empty")
        error_of(*call(base, "POST", "/v1/query-by-vector", {"queries": [{"values": [1, 2]}], "topK": 1},
                       headers=q)[:2], 400, "INVALID_ARGUMENT", "K is 128")
        error_of(*call(base, "POST", "/v1/query-by-vector",
                       {"queries": [{"values": vec}], "topK": 1, "projectionStateId": "0123"}, headers=q)[:2], 400,
                 "FAILED_PRECONDITION", "projection")
        error_of(*call(base, "GET", "/v1/records/nope", headers=q)[:2], 404, "NOT_FOUND", "nope")
        error_of(*call(base, "GET", "/v1/no-such-route", headers=q)[:2], 404, "NOT_FOUND", "no route")
        error_of(*call(base, "GET", "/v1/stats")[:2], 401, "UNAUTHENTICATED")
        error_of(*call(base, "GET", "/v1/stats", headers={"Authorization": "Bearer wrong"})[:2], 401, "UNAUTHENTICATED")
        error_of(*call(base, "POST", "/v1/records:delete", {"ids": ["r1"]}, headers=q)[:2], 403, "PERMISSION_DENIED")
        error_of(*call(base, "POST", "/v1/query", query, headers=dict(q, **{"grpc-timeout": "1n"}))[:2], 504,
                 "DEADLINE_EXCEEDED")
        error_of(*call(base, "GET", "/v1/stats?timeout=abc", headers=q)[:2], 400, "INVALID_ARGUMENT", "timeout")
        status, _, _ = call(base, "GET", "/v1/stats?timeout=5", headers=q)
        check(status == 200, "a deadline that is long enough")
        error_of(*call(base, "GET", "/v1/records/r1?include_vector=maybe", headers=q)[:2], 400, "INVALID_ARGUMENT",
                 "include_vector")
        status, body, _ = call(base, "POST", "/v1/query", raw=b"[" * (65 << 20) + b"]", headers=q)
        check(status == 413, f"a body over --max-message-mb: {status}")
        # Delete (admin), then the record is gone.
        status, d, _ = call(base, "POST", "/v1/records:delete", {"ids": ["r1", "nope"]}, headers=a)
        check(status == 200 and d["deleted"] == "1" and d["notFound"] == "1" and d["recordCount"] == "9", f"delete {d}")
        error_of(*call(base, "GET", "/v1/records/r1", headers=q)[:2], 404, "NOT_FOUND")
        # The Grafana dashboard (deploy/grafana) names only metrics this server exports.
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        exported = set()
        for line in exposition.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()[:4]
                exported.add(name)
                if kind == "histogram":
                    exported |= {name + "_bucket", name + "_sum", name + "_count"}
        dash = json.load(open(os.path.join(HERE, "..", "deploy", "grafana", "rapidin-dashboard.json")))
        used = set()
        for panel in dash["panels"]:
            for t in panel["targets"]:
                used |= set(__import__("re").findall(r"rapidin_[a-z0-9_]+", t["expr"]))
        check(len(used) >= 6, f"dashboard metrics {used}")
        check(used <= exported, f"the dashboard uses metrics the server does not export: {used - exported}")
        # The page: served, self-contained.
        status, page, hdrs = call(base, "GET", "/")
        check(status == 200 and "<form id=\"qform\"" in page and "http://" not in page and "https://" not in page,
              "the page")
        check("default-src 'none'" in hdrs.get("Content-Security-Policy", ""), "the page's CSP")
    finally:
        stop(p)

    # A router over the shard server serves HTTP too.
    grpc2 = free_port()
    shard, _ = start(["--store", f"{work}/store", "--listen", f"127.0.0.1:{grpc2}"], free_port())
    router, rbase = start(["--shard-servers", f"127.0.0.1:{grpc2}", "--listen", "127.0.0.1:0", "--model", MODEL],
                          free_port())
    try:
        status, st, _ = call(rbase, "GET", "/v1/stats")
        check(status == 200 and st["shardServers"] == [f"127.0.0.1:{grpc2}"] and st["numRecords"] == "9",
              f"router stats {st}")
        status, qr, _ = call(rbase, "POST", "/v1/query", dict(query, attributions=False))
        check(status == 200 and qr["result"]["helpful"][0]["id"] == "r3", f"router query {str(qr)[:200]}")
        status, rec, _ = call(rbase, "GET", "/v1/records/t0")
        check(status == 200 and rec["record"]["text"] == "plain words about vectors" and rec["source"],
              f"router record {rec}")
        # The shard server gone: the router's UNAVAILABLE is HTTP 503.
        stop(shard)
        error_of(*call(rbase, "POST", "/v1/query-by-vector",
                       {"queries": [{"values": vec}], "topK": 1}, headers={"grpc-timeout": "5S"})[:2], 503,
                 "UNAVAILABLE")
    finally:
        stop(router)
        stop(shard)

    # A full handler queue: RESOURCE_EXHAUSTED is HTTP 429 (one handler thread, one waiting request, eight
    # concurrent text queries with token attributions).
    p, base = start(["--store", f"{work}/store", "--model", MODEL, "--listen", "127.0.0.1:0",
                     "--handler-threads", "1", "--max-queued-requests", "1"], free_port())
    try:
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: call(base, "POST", "/v1/query", dict(query, topK=5, harmfulK=5)),
                                  range(8)))
        statuses = sorted(c[0] for c in codes)
        check(200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, f"busy server: {statuses}")
        busy = next(c for c in codes if c[0] == 429)
        error_of(busy[0], busy[1], 429, "RESOURCE_EXHAUSTED")
    finally:
        stop(p)

    # TLS and mutual TLS: the HTTP port speaks HTTPS only, with the gRPC port's certificate and client CA.
    certs = f"{work}/certs"
    os.makedirs(certs)
    subprocess.run(["bash", os.path.join(HERE, "make-test-certs.sh"), certs], check=True)
    ctx = ssl.create_default_context(cafile=f"{certs}/ca.pem")
    ctx.load_cert_chain(f"{certs}/client.pem", f"{certs}/client.key")
    hp = free_port()
    p, tbase = start(["--store", f"{work}/store", "--listen", "127.0.0.1:0", "--tls-cert", f"{certs}/server.pem",
                      "--tls-key", f"{certs}/server.key", "--tls-client-ca", f"{certs}/ca.pem"], hp, "https", ctx)
    try:
        status, st, _ = call(tbase, "GET", "/v1/stats", ctx=ctx)
        check(status == 200 and st["numRecords"] == "9", f"HTTPS with a client certificate: {status}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{hp}/v1/stats", timeout=5).read()
            check(False, "plaintext HTTP accepted on a TLS port")
        except Exception:
            pass
        bare = ssl.create_default_context(cafile=f"{certs}/ca.pem")  # no client certificate
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{hp}/v1/stats", timeout=5, context=bare).read()
            check(False, "HTTPS without a client certificate accepted under mutual TLS")
        except Exception:
            pass
    finally:
        stop(p)
    if failures:
        print(f"http_test: {len(failures)} failure(s)")
        sys.exit(1)
    print("http_test: all checks passed")


if __name__ == "__main__":
    main()
