// rapidin-server's options, grouped by role: every server listens (net) and enforces request limits; a shard
// server opens a store and scans it (store, scan); a router forwards to shard servers (router); either answers
// queries by text when given the model (model). Server::Create checks that exactly one of store.path and
// router.shard_servers is set. Plain values: thread-compatible.
#ifndef RAPIDIN_SERVER_OPTIONS_H_
#define RAPIDIN_SERVER_OPTIONS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "client/credentials.h"
#include "kernels/gpu_types.h"
#include "kernels/score.h"
#include "model/engine.h"  // TokenGradMethod

namespace rapidin::server {

struct ServerOptions {
  struct Net {
    std::string listen = "127.0.0.1:50051";         // port 0 picks a free port (see Server::port)
    std::string metrics_listen = "127.0.0.1:9464";  // empty disables /metrics
    std::string http_listen;                         // HTTP/JSON API and the page (server/http.h); empty: none
    int max_message_bytes = 64 << 20;               // larger requests get RESOURCE_EXHAUSTED
    // TLS (PEM files): with a certificate and key the gRPC port speaks TLS only (plaintext is refused); with a
    // client CA too, clients must present a certificate it signed (mutual TLS).
    std::string tls_cert, tls_key, tls_client_ca;
    // "TOKEN ROLE" lines (server/internal/auth.h): every RPC then needs a bearer token of its role. Re-read by
    // Server::ReloadTokens (SIGHUP in rapidin-server).
    std::string auth_tokens;
  };
  // What one request may ask for.
  struct Limits {
    uint32_t max_top_k = 1000;              // limit on top_k and harmful_k
    int max_query_vectors = 64;             // per request
    uint32_t max_attributed_records = 10;   // top_k + harmful_k allowed with token attributions
    // Requests run on gRPC's callback API; their blocking work (gradients, record reads, synced writes) on a fixed
    // pool of handler threads. New requests beyond max_queued_requests waiting for a thread get RESOURCE_EXHAUSTED.
    int handler_threads = 0;                // 0: max(4, hardware threads)
    int max_queued_requests = 1024;
  };
  // Shard server: the store it serves.
  struct Store {
    std::string path;
    int shards = 0;                         // 0: one per hardware thread
    uint32_t create_k = 0;                  // create the store with this K when it does not exist
    uint64_t host_budget_bytes = 0;         // vectors kept in host memory; 0: all; the rest is the cold tier
    std::function<void(uint64_t, uint64_t)> load_progress;
  };
  // Shard server: how the store is scanned (query::QueryEngine).
  struct Scan {
    std::string backend = "auto";           // auto (CUDA when a GPU is usable) | cpu | cuda
    kernels::GpuOptions gpu;                // CUDA backend: devices, hot-tier budget, chunk size
    kernels::ScoreImpl impl = kernels::ScoreImpl::kAuto;
    int max_batch_vectors = 64;             // query vectors that may share one scan
    uint64_t cold_chunk_bytes = 32u << 20;  // cold rows are read from disk and scored in chunks this large
    // "none": every query scans every row (exact; the default and the reference). "pca" (query/pca_index.h): short
    // codes of every row are scanned and the best candidates at both ends scored exactly. "ivf"
    // (query/ivf_index.h): the rows of the lists nearest the query are scored exactly. CPU backend only. The index
    // is kept in the store's directory, built or brought up to date at start-up, updated by ingest and delete,
    // saved at shutdown.
    std::string index = "none";
    int index_dim = 256;                    // pca: code length
    int index_candidates_per_k = 10;        // pca: rows scored exactly per end and worker: max(min, this * k)
    int index_min_candidates = 1024;
    int index_nlist = 0;                    // ivf: 0: about sqrt(records)
    int index_nprobe = 0;                   // ivf: lists probed at each end; 0: nlist / 16
    bool index_rebuild = false;             // train the index anew even if a saved one fits
  };
  // Query by text (either role): the model whose gradients the store holds. The sketch parameters come from the
  // store's projection state; a model, parameter selection or max_length that differs is refused at start-up.
  struct Model {
    std::string path;
    std::string adapter_path;
    std::string tokenizer_path;
    std::string chat_template;     // a template file or a family name (model/engine.h EngineOptions)
    std::string param_pattern;
    std::string preconditioner_path;  // Adam second moments the store was cached with (`cache --preconditioner`)
    std::string checkpoints_path;     // TracIn-CP: the fine-tuning summary the store was cached with
    std::string device = "auto";      // model::EngineOptions::device
    std::string grad_path = "direct";  // model::EngineOptions::grad_path
    model::TokenGradMethod token_method = model::TokenGradMethod::kShared;  // token attributions' gradients
  };
  // Router: the shard servers' HOST:PORT. Their stores must share one projection state; start-up waits up to
  // connect_timeout for all of them to answer.
  struct Router {
    std::vector<std::string> shard_servers;
    absl::Duration connect_timeout = absl::Seconds(60);
    client::Credentials shard_credentials;  // TLS and token for the connections to the shard servers
  };

  Net net;
  Limits limits;
  Store store;
  Scan scan;
  Model model;
  Router router;
};

}  // namespace rapidin::server

#endif  // RAPIDIN_SERVER_OPTIONS_H_
