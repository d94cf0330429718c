"""A Python gRPC client against rapidin-server, as an audit dashboard would use the API.

Stubs are generated from proto/ at test time with protoc and grpc_python_plugin (Debian: protobuf-compiler-grpc);
the runtime is Debian's python3-grpcio and python3-protobuf, so run it with /usr/bin/python3.
Checks ingest (client streaming), QueryByVector against a pure-Python reference on the fp16-rounded store, GetRecord,
Stats, the standard gRPC health service, status codes for bad input (and that a refused batch stores nothing), and
a clean shutdown on SIGTERM.

Usage: python_client_test.py RAPIDIN_SERVER PROTO_DIR   (exit 77: skipped, with the reason)
"""
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

SKIP = 77


def skip(why):
    print(f"SKIP: {why}")
    sys.exit(SKIP)


try:
    import grpc
except ImportError as e:  # the C++ build does not need it; scripts/setup.sh installs it
    skip(f"python3-grpcio is not importable by {sys.executable} ({e})")

server_bin, proto_dir = sys.argv[1], sys.argv[2]
plugin = shutil.which("grpc_python_plugin")
if plugin is None or shutil.which("protoc") is None:
    skip("protoc or grpc_python_plugin not found")

K = 24
work = tempfile.mkdtemp()
proc = None


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def half(x):  # the store keeps fp16
    return struct.unpack("e", struct.pack("e", x))[0]


def main():
    global proc
    gen = os.path.join(work, "gen")
    os.makedirs(gen)
    subprocess.run(["protoc", "-I", proto_dir, f"--python_out={gen}", f"--grpc_python_out={gen}",
                    f"--plugin=protoc-gen-grpc_python={plugin}", "rapidin/v1/rapidin.proto"], check=True)
    sys.path.insert(0, gen)
    from rapidin.v1 import rapidin_pb2 as pb
    from rapidin.v1 import rapidin_pb2_grpc as pb_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([server_bin, "--store", os.path.join(work, "store"), "--k", str(K), "--listen",
                             f"127.0.0.1:{port}", "--metrics-listen", "", "--shards", "2"], stdout=log,
                            stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.InfluenceServiceStub(channel)

    # Ingest 150 records in 3 streamed batches.
    rng = random.Random(11)
    vecs = [[rng.gauss(0, 1) for _ in range(K)] for _ in range(150)]

    def batches():
        for b in range(3):
            req = pb.IngestRequest()
            for i in range(50 * b, 50 * b + 50):
                r = req.records.add()
                r.record.id = f"rec-{i}"
                r.record.instruction = f"instruction {i}"
                r.record.output = "output \u00e9"  # UTF-8 survives the round trip
                r.record.metadata["source"] = "python"
                r.vector.extend(vecs[i])
            yield req

    resp = stub.Ingest(batches(), timeout=30)
    check(resp.batches_applied == 3 and resp.records_inserted == 150 and resp.record_count == 150, str(resp))

    # QueryByVector: two vectors, against the reference on the fp16-rounded store.
    qs = [[rng.gauss(0, 1) for _ in range(K)] for _ in range(2)]
    req = pb.QueryByVectorRequest(top_k=5, harmful_k=3)
    for q in qs:
        req.queries.add().values.extend(q)
    resp = stub.QueryByVector(req, timeout=30)
    check(len(resp.results) == 2, "one result per query vector")
    for q, res in zip(qs, resp.results):
        ref = sorted(((sum(half(a) * b for a, b in zip(v, q)), i) for i, v in enumerate(vecs)), reverse=True)
        check([r.index for r in res.helpful] == [i for _, i in ref[:5]], f"helpful {res.helpful}")
        check([r.index for r in res.harmful] == [i for _, i in ref[::-1][:3]], "harmful order")
        for r, (score, i) in zip(res.helpful, ref):
            check(abs(r.score - score) < 1e-3 and r.id == f"rec-{i}" and r.record.metadata["source"] == "python",
                  f"record {r.id}: {r.score} vs {score}")
        check([r.rank for r in res.helpful] == [1, 2, 3, 4, 5], "ranks")

    g = stub.GetRecord(pb.GetRecordRequest(id="rec-7", include_vector=True), timeout=10)
    check(g.index == 7 and g.record.output == "output \u00e9" and len(g.vector) == K, str(g.record))
    check(all(abs(a - half(b)) == 0 for a, b in zip(g.vector, vecs[7])), "stored vector is the fp16 rounding")

    st = stub.Stats(pb.StatsRequest(), timeout=10)
    check(st.num_records == 150 and st.k == K and st.dtype == pb.VECTOR_DTYPE_FP16, str(st))
    check(any(t.tier == "host" and t.records == 150 for t in st.tiers), "host tier")

    # The standard health service, called by its method path (no extra package needed).
    health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                 request_serializer=lambda _: b"", response_deserializer=lambda b: b)
    raw = health(None, timeout=10)
    check(raw == b"\x08\x01", f"health: SERVING expected, got {raw!r}")  # field 1 (status) = 1 (SERVING)

    # Bad input: clear status codes, and a refused batch stores nothing.
    def code_of(fn):
        try:
            fn()
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""

    bad = pb.QueryByVectorRequest(top_k=3)
    bad.queries.add().values.extend([1.0] * (K + 1))
    code, details = code_of(lambda: stub.QueryByVector(bad, timeout=10))
    check(code == grpc.StatusCode.INVALID_ARGUMENT and str(K) in details, f"wrong dimension: {code} {details}")
    code, _ = code_of(lambda: stub.GetRecord(pb.GetRecordRequest(id="nope"), timeout=10))
    check(code == grpc.StatusCode.NOT_FOUND, f"unknown id: {code}")
    wrong_state = pb.QueryByVectorRequest(top_k=3, projection_state_id="0123456789abcdef")
    wrong_state.queries.add().values.extend(qs[0])
    code, _ = code_of(lambda: stub.QueryByVector(wrong_state, timeout=10))
    check(code == grpc.StatusCode.FAILED_PRECONDITION, f"other projection state: {code}")

    def bad_batch():
        req = pb.IngestRequest()
        ok = req.records.add()
        ok.record.id = "new-ok"
        ok.vector.extend([0.5] * K)
        short = req.records.add()
        short.record.id = "new-short"
        short.vector.extend([0.5] * (K - 1))
        yield req

    code, details = code_of(lambda: stub.Ingest(bad_batch(), timeout=10))
    check(code == grpc.StatusCode.INVALID_ARGUMENT, f"bad ingest batch: {code} {details}")
    check(stub.Stats(pb.StatsRequest(), timeout=10).num_records == 150, "a refused batch stores nothing")
    code, _ = code_of(lambda: stub.GetRecord(pb.GetRecordRequest(id="new-ok"), timeout=10))
    check(code == grpc.StatusCode.NOT_FOUND, "the valid record of a refused batch is not stored")

    channel.close()
    proc.send_signal(signal.SIGTERM)
    check(proc.wait(timeout=30) == 0, "clean exit on SIGTERM")
    proc = None
    print("python_client_test: ok")


try:
    main()
except Exception:
    if os.path.exists(os.path.join(work, "server.log")):
        print(open(os.path.join(work, "server.log")).read()[-3000:])
    raise
finally:
    if proc is not None:
        proc.kill()
    shutil.rmtree(work, ignore_errors=True)
