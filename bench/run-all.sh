#!/usr/bin/env bash
# The performance figures of issue 18 in one run: writes bench/results/perf.json (and the .md tables it draws on).
#   bash bench/run-all.sh            (about 40 minutes on 2 cores; needs the shared data)
# Measured here, "before" figures included (an option selecting the earlier path, in the same run):
#   scan_bench --kernel-only   scan_ms_1, scan_ms_8 (+ _before, 16 and 32), read_gbps   -> scan-kernel.md
#   scan_bench --faiss-python  faiss_pypi_flat_ms_1/8 and the other peers on the same data -> scan.md
#   text_query_bench.py        text_query_p50_ms (server total), its gradient and wall     -> text-query.md
#   ann_bench                  ann_recall_at_10, ann_speedup at 1M (IVF and PCA indexes)  -> ann.md
#                              (its stores, ~11 GB, are written once to ~/.cache/rapidin/ann and reused)
#   cache_bench.sh             cache_records_per_s (direct pass) and _before (autograd), same records, 2 threads,
#                              the two stores compared record by record                    -> cache.md
#   attribution_bench.sh       attribution_s_per_record (direct) and _before (autograd), token scores against the
#                              one-pass-per-token reference                                -> attribution.md
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/venv.sh
BUILD_DIR="${BUILD_DIR:-build}"
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
OUT=bench/results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --build "$BUILD_DIR" -j 2 --target scan_bench ann_bench rapidin rapidin-server store_diff sketch_bench \
  attribution_views >/dev/null
FAISS_PY=$(bench_venv "${RAPIDIN_BENCH_VENV:-$HOME/.cache/rapidin/faiss-venv}" faiss-cpu numpy)
echo "== scan kernel (1/8/16/32 query vectors, now and before)"
"$BUILD_DIR/bench/scan_bench" --kernel-only --threads 2 --json "$tmp/kernel.json" | tail -9
echo "== scan against the peers (PyPI faiss-cpu, Debian libfaiss, LibTorch)"
"$BUILD_DIR/bench/scan_bench" --threads 2 --faiss-python "$FAISS_PY" --json "$tmp/scan.json" | tail -3
echo "== the demo's text query"
STORE="${RAPIDIN_PERF_STORE:-$tmp/store}"
if [ ! -d "$STORE" ]; then
  "$BUILD_DIR/client/rapidin" cache --model "$DATA/models/stories260K.bin" --data "$DATA/instructions/alpaca_5000.json" \
    --store "$STORE" --k 4096 --threads 2 2>&1 | tail -1
fi
python3 bench/text_query_bench.py "$BUILD_DIR/server/rapidin-server" "$STORE" "$DATA/models/stories260K.bin" 100 \
  "$OUT/text-query.md" | sed -n 1p > "$tmp/text.json"
echo "== caching throughput (direct pass against autograd)"
bash bench/cache_bench.sh 400 "$tmp/cache.json" | grep -E "^2 threads|min_cosine"
echo "== token attributions (direct pass against autograd, scores against the per-token reference)"
bash bench/attribution_bench.sh "$STORE" 3 "$tmp/attribution.json" | tail -3
echo "== indexes against the exact scan (100k, 300k, 1M x 4096; basis: the demo store's real gradients)"
"$BUILD_DIR/bench/ann_bench" --basis "$STORE" --sizes 100000,300000,1000000 --gaussian 100000 --nprobe 16,64 \
  --md "$OUT/ann.md" --json "$tmp/ann.json" >/dev/null
python3 - "$tmp" "$OUT/perf.json" <<'PY'
import json, os, sys
tmp, out = sys.argv[1], sys.argv[2]
k, s, t, a, c, at = (json.load(open(os.path.join(tmp, f)))
                     for f in ("kernel.json", "scan.json", "text.json", "ann.json", "cache.json", "attribution.json"))
perf = {
    "scan_ms_1": k["scan_ms_1"], "scan_ms_8": k["scan_ms_8"],
    "scan_ms_8_before": k["scan_ms_8_before"], "scan_ms_16": k["scan_ms_16"], "scan_ms_32": k["scan_ms_32"],
    "scan_ms_1_k65536": k.get("scan_ms_1_k65536"), "scan_ms_8_k65536": k.get("scan_ms_8_k65536"),
    "scan_ms_8_k65536_before": k.get("scan_ms_8_k65536_before"),
    "read_gbps": k["read_gbps"], "kernel_peak_gflops": k["kernel_peak_gflops"], "fma_peak_gflops": k.get("fma_peak_gflops"),
    "faiss_pypi_flat_ms_1": s.get("faiss_pypi_flat_ms_1"), "faiss_pypi_flat_ms_8": s.get("faiss_pypi_flat_ms_8"),
    "faiss_pypi_sqfp16_ms_1": s.get("faiss_pypi_sqfp16_ms_1"), "faiss_pypi_sqfp16_ms_8": s.get("faiss_pypi_sqfp16_ms_8"),
    "rapidin_scan_ms_1_peers_run": s.get("rapidin_ms_1"), "rapidin_scan_ms_8_peers_run": s.get("rapidin_ms_8"),
    "text_query_p50_ms": t["text_query_p50_ms"], "text_query_p50_ms_before": t["text_query_p50_ms_before"],
    "text_query_gradient_p50_ms": t["text_query_gradient_p50_ms"],
    "text_query_wall_p50_ms": t["text_query_wall_p50_ms"],
    "cache_records_per_s": c["cache_records_per_s"], "cache_records_per_s_before": c["cache_records_per_s_before"],
    "attribution_s_per_record": at["attribution_s_per_record"],
    "attribution_s_per_record_before": at["attribution_s_per_record_before"],
    "attribution_record_tokens_rel_diff": at.get("attribution_direct_record_tokens_rel_diff"),
    "ann_recall_at_10": a.get("ann_recall_at_10"), "ann_speedup": a.get("ann_speedup"),
    "ann_n": a.get("ann_n"), "ann_setting": a.get("ann_setting"),
}
json.dump(perf, open(out, "w"), indent=1)
print(json.dumps(perf, indent=1))
PY
