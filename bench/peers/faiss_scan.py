#!/usr/bin/env python3
"""FAISS as users install it (PyPI's faiss-cpu) on the scan benchmark's own data: bench/scan_bench writes its fp16
store and query vectors to files and runs this with the same shape, query counts and threads. Prints one JSON line
per method and query count: {"method", "nq", "ms" (median), "top1", "version", "simd"}.

Usage: faiss_scan.py STORE.f16 QUERIES.f32 N K NQ[,NQ...] THREADS REPS
"""
import json
import sys
import time

import faiss
import numpy as np


def main():
    store_path, query_path = sys.argv[1], sys.argv[2]
    n, k = int(sys.argv[3]), int(sys.argv[4])
    nqs = [int(x) for x in sys.argv[5].split(",")]
    threads, reps = int(sys.argv[6]), int(sys.argv[7])
    faiss.omp_set_num_threads(threads)
    x = np.fromfile(store_path, dtype=np.float16).reshape(n, k).astype(np.float32)
    queries = np.fromfile(query_path, dtype=np.float32).reshape(-1, k)
    opts = faiss.get_compile_options()
    # The SIMD level the wheel's dynamic dispatch chose on this CPU (an older wheel: what it was compiled for).
    simd = faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig") else opts
    flat = faiss.IndexFlatIP(k)
    flat.add(x)
    sq = faiss.IndexScalarQuantizer(k, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq.train(x[: min(n, 1000)])
    sq.add(x)
    del x
    for name, index in (("IndexFlatIP (fp32, helpful only)", flat), ("IndexScalarQuantizer fp16", sq)):
        for nq in nqs:
            q = np.ascontiguousarray(queries[:nq])
            times = []
            ids = None
            for _ in range(reps):
                t0 = time.perf_counter()
                _, ids = index.search(q, 10)
                times.append(time.perf_counter() - t0)
            print(json.dumps({"method": name, "nq": nq, "ms": float(np.median(times)) * 1e3, "top1": int(ids[0][0]),
                              "version": faiss.__version__, "simd": simd, "compile_options": opts}), flush=True)


if __name__ == "__main__":
    main()
