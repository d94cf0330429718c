// rapidin-server: serves a gradient store over gRPC until SIGTERM/SIGINT; with --shard-servers, routes queries to
// several such servers and merges their answers.
#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <thread>

#include "client/credentials.h"
#include "server/server.h"

int main(int argc, char** argv) {
  // Buffers of 1 MiB and more (large requests, query matrices) are mapped and unmapped rather than carved from
  // the heap: glibc's default threshold rises with the largest buffer freed (up to 32 MiB), after which such
  // buffers fragment the heap. Measured with bench/faults storm (4 MiB messages, no data growth): 25-s rounds
  // after the first grew RSS by 5-9 MB each; with this setting by -0.2 to +4.7 MB. MALLOC_MMAP_THRESHOLD_ in the
  // environment overrides it.
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr) mallopt(M_MMAP_THRESHOLD, 1 << 20);
  CLI::App app{"rapidin-server: influence queries over a RapidIn gradient store"};
  rapidin::server::ServerOptions o;
  std::string impl = "auto";
  double grace_s = 5;
  std::string log_level = "info";
  app.add_option("--store", o.store.path, "store directory (a shard server)");
  app.add_option("--shard-servers", o.router.shard_servers,
                 "router mode, instead of --store: HOST:PORT of every shard server (comma-separated), in merge order")
      ->delimiter(',');
  double connect_s = 60;
  app.add_option("--shard-connect-timeout", connect_s, "router: seconds start-up waits for every shard server")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--listen", o.net.listen, "gRPC HOST:PORT")->capture_default_str();
  app.add_option("--http-listen", o.net.http_listen,
                 "HTTP/JSON API (/v1/...) and the audit page (/) on HOST:PORT, with the gRPC port's TLS and tokens");
  app.add_option("--metrics-listen", o.net.metrics_listen, "Prometheus /metrics HOST:PORT ('' disables)")
      ->capture_default_str();
  app.add_option("--shards", o.store.shards, "host-tier shards = scan workers (0: one per hardware thread)");
  double host_budget_mb = 0;
  app.add_option("--host-budget-mb", host_budget_mb,
                 "MB of vectors kept in host memory (0: all); the rest is the cold tier, read from disk per scan")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--k", o.store.create_k, "create the store with this K if it does not exist");
  app.add_option("--backend", o.scan.backend, "auto (CUDA when a GPU is usable) | cpu | cuda")->capture_default_str();
  app.add_option("--gpu-devices", o.scan.gpu.devices, "CUDA device ordinals (default: all visible)");
  app.add_option("--gpu-memory-fraction", o.scan.gpu.memory_fraction, "share of free GPU memory for the hot tier")
      ->check(CLI::Range(0.01, 1.0))
      ->capture_default_str();
  uint64_t hot_limit_mb = ~uint64_t{0} >> 20, chunk_mb = 128;
  app.add_option("--gpu-hot-limit-mb", hot_limit_mb, "per-GPU cap on the hot tier; 0 streams every shard");
  app.add_option("--gpu-chunk-mb", chunk_mb, "chunk size when streaming from host memory")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  app.add_option("--kernels", impl, "auto|avx2|portable")->capture_default_str();
  app.add_option("--index", o.scan.index,
                 "none (scan every row: exact, the reference) | pca (scan short PCA codes, score the best "
                 "candidates exactly) | ivf (score the rows of the nearest IVF lists exactly); CPU; kept in the "
                 "store's directory")
      ->capture_default_str();
  app.add_option("--index-dim", o.scan.index_dim, "pca: code length")->capture_default_str();
  app.add_option("--index-candidates", o.scan.index_candidates_per_k,
                 "pca: rows scored exactly per end and worker, per requested record (at least --index-min-candidates)")
      ->capture_default_str();
  app.add_option("--index-min-candidates", o.scan.index_min_candidates, "pca: see --index-candidates")
      ->capture_default_str();
  app.add_option("--index-nlist", o.scan.index_nlist, "IVF lists (0: about sqrt(records))")->capture_default_str();
  app.add_option("--index-nprobe", o.scan.index_nprobe, "IVF lists probed at each end (0: nlist / 16)")
      ->capture_default_str();
  app.add_flag("--index-rebuild", o.scan.index_rebuild, "train the IVF index anew even if a saved one fits");
  app.add_option("--max-top-k", o.limits.max_top_k, "largest top_k / harmful_k accepted")->capture_default_str();
  app.add_option("--handler-threads", o.limits.handler_threads,
                 "threads for requests' blocking work (0: max(4, hardware threads))")->capture_default_str();
  app.add_option("--max-queued-requests", o.limits.max_queued_requests,
                 "requests waiting for a handler thread before new ones get RESOURCE_EXHAUSTED")->capture_default_str();
  app.add_option("--max-query-vectors", o.limits.max_query_vectors, "query vectors per request")->capture_default_str();
  app.add_option("--max-message-mb", o.net.max_message_bytes, "largest gRPC message, MiB")
      ->transform([](std::string s) { return std::to_string(std::stoll(s) << 20); });
  app.add_option("--max-attributed-records", o.limits.max_attributed_records,
                 "records per query that may get token attributions")->capture_default_str();
  app.add_option("--max-batch-vectors", o.scan.max_batch_vectors, "query vectors that may share one scan")
      ->capture_default_str();
  app.add_option("--shutdown-grace", grace_s, "seconds in-flight RPCs get at shutdown")->capture_default_str();
  app.add_option("--model", o.model.path, "model for query by text (the one the store was cached with)");
  app.add_option("--adapter", o.model.adapter_path, "PEFT LoRA adapter the store was cached with");
  app.add_option("--tokenizer", o.model.tokenizer_path, "its tokenizer (default: next to the model)");
  app.add_option("--template", o.model.chat_template,
                 "chat template for chat queries and records: a JSON file or chatml|llama3|llama2|mistral|gemma "
                 "(default: tokenizer_config.json's chat_template)");
  app.add_option("--params", o.model.param_pattern, "parameter regex used by `rapidin cache --params`");
  app.add_option("--preconditioner", o.model.preconditioner_path,
                 "Adam second moments used by `rapidin cache --preconditioner` (the store's state says when)");
  app.add_option("--checkpoints", o.model.checkpoints_path,
                 "TracIn-CP: the `rapidin finetune` summary used by `rapidin cache --checkpoints` (the store's state "
                 "says when)");
  app.add_option("--model-device", o.model.device,
                 "where gradients run: cpu | cuda | cuda:N | auto (CUDA when this LibTorch has it and sees a GPU)")
      ->capture_default_str();
  app.add_option("--grad-path", o.model.grad_path,
                 "query gradients: direct (hand-written CPU pass where it applies, else autograd) | autograd")
      ->capture_default_str()
      ->check(CLI::IsMember({"direct", "autograd"}));
  const std::map<std::string, rapidin::model::TokenGradMethod> token_methods = {
      {"shared", rapidin::model::TokenGradMethod::kShared},
      {"copies", rapidin::model::TokenGradMethod::kCopies},
      {"loop", rapidin::model::TokenGradMethod::kLoop}};
  std::string token_method = "shared";
  app.add_option("--token-method", token_method,
                 "per-token gradients for attributions, all exact: shared (one forward pass, batched backward) | "
                 "copies | loop (one backward pass per token: the slow reference)")
      ->check(CLI::IsMember(token_methods))
      ->capture_default_str();
  app.add_option("--tls-cert", o.net.tls_cert, "PEM: the server's certificate (TLS only; plaintext is refused)");
  app.add_option("--tls-key", o.net.tls_key, "PEM: its private key");
  app.add_option("--tls-client-ca", o.net.tls_client_ca, "PEM: require client certificates signed by this CA (mTLS)");
  app.add_option("--auth-tokens", o.net.auth_tokens,
                 "file of \"TOKEN ROLE\" lines (roles: query, ingest, admin); every RPC then needs "
                 "\"authorization: Bearer TOKEN\". Re-read on SIGHUP");
  app.add_option("--shard-tls-ca", o.router.shard_credentials.tls_ca, "router: PEM CA of the shard servers (TLS)");
  app.add_option("--shard-tls-cert", o.router.shard_credentials.tls_cert, "router: its client certificate (mTLS)");
  app.add_option("--shard-tls-key", o.router.shard_credentials.tls_key, "router: that certificate's key");
  std::string shard_token_file;
  app.add_option("--shard-token-file", shard_token_file,
                 "router: bearer token for the shard servers, first line of the file (default: "
                 "$RAPIDIN_SHARD_TOKEN); needs the admin role there to forward every method");
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (auto t = rapidin::client::TokenFromFileOrEnv(shard_token_file, "RAPIDIN_SHARD_TOKEN"); t.ok()) {
    o.router.shard_credentials.token = *t;
  } else {
    std::fprintf(stderr, "rapidin-server: %s\n", t.status().ToString().c_str());
    return 1;
  }
  o.model.token_method = token_methods.at(token_method);
  o.router.connect_timeout = absl::Seconds(connect_s);
  o.store.host_budget_bytes = static_cast<uint64_t>(host_budget_mb * 1048576.0);
  spdlog::set_level(spdlog::level::from_str(log_level));
  o.scan.gpu.hot_limit_bytes = hot_limit_mb >= (~uint64_t{0} >> 20) ? ~uint64_t{0} : hot_limit_mb << 20;
  o.scan.gpu.chunk_bytes = chunk_mb << 20;
  if (impl == "avx2") {
    o.scan.impl = rapidin::kernels::ScoreImpl::kAvx2;
  } else if (impl == "portable") {
    o.scan.impl = rapidin::kernels::ScoreImpl::kPortable;
  } else if (impl != "auto") {
    std::fprintf(stderr, "rapidin-server: --kernels must be auto, avx2 or portable\n");
    return 2;
  }

  // Signals: a handler that only writes to a pipe, and a thread that reads it and shuts down. (Blocking the
  // signals and sigwait-ing is not enough: libraries such as OpenBLAS start threads before main, and a signal
  // delivered to one of those would kill the process.)
  static int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    std::fprintf(stderr, "rapidin-server: cannot create the signal pipe\n");
    return 1;
  }
  struct sigaction sa {};
  sa.sa_handler = [](int sig) {
    const char c = static_cast<char>(sig);
    ssize_t n = write(pipe_fds[1], &c, 1);
    (void)n;
  };
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);

  o.store.load_progress = [](uint64_t done, uint64_t total) {
    if (total >= 10000) spdlog::info("loading vectors: {}/{} ({:.0f}%)", done, total, 100.0 * done / total);
  };
  auto server = rapidin::server::Server::Create(o);
  if (!server.ok()) {
    std::fprintf(stderr, "rapidin-server: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::thread signals([&] {
    for (;;) {
      char sig = 0;
      while (read(pipe_fds[0], &sig, 1) < 0 && errno == EINTR) {
      }
      if (sig == 0) return;  // woken by main after a shutdown for another reason
      if (sig == SIGHUP) {   // re-read the token file; the old tokens stay in force on an error
        absl::Status st = (*server)->ReloadTokens();
        if (!st.ok()) spdlog::error("SIGHUP: tokens not reloaded: {}", st.ToString());
        continue;
      }
      spdlog::info("received {}", sig == SIGTERM ? "SIGTERM" : "SIGINT");
      (*server)->Shutdown(absl::Seconds(grace_s));
      return;
    }
  });
  (*server)->Wait();
  const char zero = 0;
  ssize_t n = write(pipe_fds[1], &zero, 1);  // wake the signal thread if no signal came
  (void)n;
  signals.join();
  return 0;
}
