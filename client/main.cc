// rapidin: the command-line client. Exit codes: 0 success, 1 the server or a file refused the request,
// 2 bad usage. Errors are one line on stderr.
#include <malloc.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/cache.h"
#include "cache/finetune.h"
#include "client/client.h"
#include "model/training.h"

namespace {

using rapidin::client::Client;

int Fail(const absl::Status& st) {
  std::string msg(st.message());
  for (char& c : msg) {
    if (c == '\n') c = ' ';
  }
  std::fprintf(stderr, "rapidin: %s: %s\n", absl::StatusCodeToString(st.code()).c_str(), msg.c_str());
  return 1;
}

// TLS and token settings of the gRPC subcommands (--tls-ca, --tls-cert, --tls-key, --token-file, RAPIDIN_TOKEN).
rapidin::client::Credentials g_credentials;
std::string g_token_file;

absl::StatusOr<std::unique_ptr<Client>> Dial(const std::string& server, double deadline) {
  rapidin::client::Credentials c = g_credentials;
  auto token = rapidin::client::TokenFromFileOrEnv(g_token_file, "RAPIDIN_TOKEN");
  if (!token.ok()) return token.status();
  c.token = *token;
  return Client::Connect(server, c, deadline);
}

int Ingest(const std::string& server, const std::string& file, int batch_size, double deadline) {
  // Parse the whole file first so that a bad line is reported before anything is sent.
  std::vector<rapidin::v1::IngestRecord> records;
  absl::Status st = rapidin::client::ForEachLine(file, [&](int64_t, const std::string& line) -> absl::Status {
    auto r = rapidin::client::ParseRecordLine(line);
    if (!r.ok()) return r.status();
    records.push_back(std::move(*r));
    return absl::OkStatus();
  });
  if (!st.ok()) return Fail(st);
  auto dialed = Dial(server, deadline);
  if (!dialed.ok()) return Fail(dialed.status());
  auto& client = *dialed;
  size_t next = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const bool tty = isatty(STDERR_FILENO);
  auto resp = client->Ingest(
      [&](rapidin::v1::IngestRequest* b) {
        if (next >= records.size()) return false;
        for (int i = 0; i < batch_size && next < records.size(); ++i) *b->add_records() = std::move(records[next++]);
        return true;
      },
      [&](uint64_t sent) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (tty || sent == records.size()) {
          std::fprintf(stderr, "%ssent %llu/%zu records (%.0f records/s)%s", tty ? "\r" : "",
                       static_cast<unsigned long long>(sent), records.size(), s > 0 ? sent / s : 0.0,
                       tty && sent < records.size() ? "" : "\n");
        }
      });
  if (!resp.ok()) return Fail(resp.status());
  std::printf("%llu batches applied: %llu inserted, %llu replaced; store holds %llu records\n",
              static_cast<unsigned long long>(resp->batches_applied()),
              static_cast<unsigned long long>(resp->records_inserted()),
              static_cast<unsigned long long>(resp->records_replaced()),
              static_cast<unsigned long long>(resp->record_count()));
  return 0;
}

int QueryVectors(const std::string& server, const std::string& file, uint32_t top_k, uint32_t harmful_k,
                 bool aggregate, const std::string& psid, bool json, bool omit_text, double deadline) {
  rapidin::v1::QueryByVectorRequest req;
  absl::Status st = rapidin::client::ForEachLine(file, [&](int64_t, const std::string& line) -> absl::Status {
    auto q = rapidin::client::ParseQueryLine(line);
    if (!q.ok()) return q.status();
    *req.add_queries() = std::move(*q);
    return absl::OkStatus();
  });
  if (!st.ok()) return Fail(st);
  req.set_top_k(top_k);
  req.set_harmful_k(harmful_k);
  req.set_aggregate(aggregate);
  req.set_projection_state_id(psid);
  req.set_omit_text(omit_text);
  auto client = Dial(server, deadline);
  if (!client.ok()) return Fail(client.status());
  auto resp = (*client)->QueryByVector(req);
  if (!resp.ok()) return Fail(resp.status());
  std::cout << (json ? rapidin::client::ToJson(*resp) + "\n" : rapidin::client::QueryTable(*resp));
  return 0;
}

// A chat query's messages: a JSON array of {role, content}, or an object with "messages".
absl::Status ReadChat(const std::string& path, rapidin::v1::QueryRequest* req) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("chat file not found: ", path));
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_object() && j.contains("messages")) j = j["messages"];
  if (j.is_discarded() || !j.is_array() || j.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON array of {role, content} messages"));
  }
  for (size_t i = 0; i < j.size(); ++i) {
    const auto& m = j[i];
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": messages[", i, "] needs string role and content"));
    }
    auto* pm = req->add_messages();
    pm->set_role(m["role"].get<std::string>());
    pm->set_content(m["content"].get<std::string>());
  }
  return absl::OkStatus();
}

int QueryText(const std::string& server, const std::string& instruction, const std::string& input,
              const std::string& generation, const std::string& chat, uint32_t top_k, uint32_t harmful_k, bool json,
              bool tokens, const std::string& html, const std::vector<std::string>& hotwords, bool omit_text,
              double deadline) {
  rapidin::v1::QueryRequest req;
  if (!chat.empty()) {
    if (absl::Status st = ReadChat(chat, &req); !st.ok()) return Fail(st);
  }
  req.set_omit_text(omit_text);
  req.set_instruction(instruction);
  req.set_input(input);
  req.set_generation(generation);
  req.set_top_k(top_k);
  req.set_harmful_k(harmful_k);
  req.set_attributions(tokens || !html.empty());
  for (const auto& h : hotwords) req.add_hotwords(h);
  auto client = Dial(server, deadline);
  if (!client.ok()) return Fail(client.status());
  auto resp = (*client)->Query(req);
  if (!resp.ok()) return Fail(resp.status());
  if (!html.empty()) {
    std::ofstream f(html);
    f << rapidin::client::AttributionHtml(req, *resp);
    if (!f) return Fail(absl::PermissionDeniedError(absl::StrCat("cannot write ", html)));
    std::fprintf(stderr, "wrote %s\n", html.c_str());
  }
  if (json) {
    std::cout << rapidin::client::ToJson(*resp) << "\n";
    return 0;
  }
  std::cout << rapidin::client::TextQueryTable(*resp);
  if (tokens) std::cout << "\n" << rapidin::client::AttributionText(*resp, isatty(STDOUT_FILENO));
  return 0;
}

// Writes a demo data set: records (Alpaca text when available) with random unit vectors, and query vectors
// made from chosen records' vectors plus noise, so the expected top hit of each query is known.
int MakeDemo(const std::string& alpaca, int n, int k, uint32_t seed, int queries, const std::string& out_records,
             const std::string& out_queries) {
  nlohmann::json texts = nlohmann::json::array();
  if (!alpaca.empty()) {
    std::ifstream in(alpaca);
    if (!in) return Fail(absl::NotFoundError(absl::StrCat("cannot open ", alpaca)));
    texts = nlohmann::json::parse(in, nullptr, false);
    if (texts.is_discarded() || !texts.is_array()) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(alpaca, ": not a JSON array")));
    }
  }
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::ofstream rec(out_records), qf(out_queries);
  if (!rec || !qf) return Fail(absl::PermissionDeniedError("cannot write the output files"));
  std::vector<std::vector<float>> kept;
  const float inv = 1.0f / std::sqrt(static_cast<float>(k));
  for (int i = 0; i < n; ++i) {
    nlohmann::json j;
    j["id"] = absl::StrCat("alpaca-", i);
    if (!texts.empty()) {
      const auto& t = texts[i % texts.size()];
      j["instruction"] = t.value("instruction", "");
      j["input"] = t.value("input", "");
      j["output"] = t.value("output", "");
    } else {
      j["text"] = absl::StrCat("synthetic record ", i);
    }
    std::vector<float> v(k);
    for (auto& x : v) x = g(rng) * inv;
    j["vector"] = v;
    rec << j.dump() << "\n";
    if (static_cast<int>(kept.size()) < queries && i % std::max(1, n / std::max(1, queries)) == 0) {
      kept.push_back(v);
    }
  }
  for (auto& v : kept) {
    for (auto& x : v) x += 0.5f * g(rng) * inv;
    qf << nlohmann::json{{"vector", v}}.dump() << "\n";
  }
  std::printf("wrote %d records to %s and %zu queries to %s\n", n, out_records.c_str(), kept.size(),
              out_queries.c_str());
  return 0;
}

int Cache(const rapidin::cache::CacheOptions& o, bool json) {
  auto s = rapidin::cache::RunCache(o);
  if (!s.ok()) return Fail(s.status());
  if (json) {
    nlohmann::json j = {{"total", s->total}, {"cached", s->cached}, {"skipped_existing", s->skipped_existing},
                        {"bad", s->bad}, {"truncated", s->truncated}, {"seconds", s->seconds},
                        {"records_per_second", s->seconds > 0 ? s->cached / s->seconds : 0},
                        {"grad_seconds", s->grad_s}, {"normalize_seconds", s->normalize_s},
                        {"sketch_seconds", s->sketch_s}, {"write_seconds", s->write_s},
                        {"mean_response_loss", s->mean_loss}, {"store_records", s->store_records},
                        {"projection_state_id", s->projection_state_id}, {"device", s->device},
                        {"grad_path", s->grad_path},
                        {"shard_index", o.shard_index}, {"shard_count", o.shard_count},
                        {"range_begin", s->range_begin}, {"range_end", s->range_end}};
    nlohmann::json bad = nlohmann::json::array();
    for (const auto& b : s->bad_records) bad.push_back({{"where", b.where}, {"reason", b.reason}});
    j["bad_records"] = bad;
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("cache summary\n");
  std::printf("  %-22s %lld (%lld cached now, %lld already in the store, %lld bad, %lld truncated)\n", "records",
              static_cast<long long>(s->total), static_cast<long long>(s->cached),
              static_cast<long long>(s->skipped_existing), static_cast<long long>(s->bad),
              static_cast<long long>(s->truncated));
  if (o.shard_count > 1) {
    std::printf("  %-22s %d of %d: positions %lld..%lld of the file\n", "shard", o.shard_index, o.shard_count,
                static_cast<long long>(s->range_begin), static_cast<long long>(s->range_end - 1));
  }
  std::printf("  %-22s %.1f s (%.1f records/s, gradients on %s)\n", "time", s->seconds,
              s->seconds > 0 ? s->cached / s->seconds : 0, s->device.c_str());
  std::printf("  %-22s fwd+bwd %.2f s, normalise %.2f s, sketch %.2f s, store write %.2f s\n", "breakdown",
              s->grad_s, s->normalize_s, s->sketch_s, s->write_s);
  std::printf("  %-22s %.4f nats/token\n", "mean response loss", s->mean_loss);
  std::printf("  %-22s %lld records, projection state %s\n", "store", static_cast<long long>(s->store_records),
              s->projection_state_id.c_str());
  return 0;
}

int Finetune(const rapidin::cache::FinetuneOptions& o, bool json) {
  auto s = rapidin::cache::RunFinetune(o);
  if (!s.ok()) return Fail(s.status());
  if (json) {
    nlohmann::json bad = nlohmann::json::array();
    for (const auto& b : s->bad_records) bad.push_back({{"where", b.where}, {"reason", b.reason}});
    nlohmann::json ckpts = nlohmann::json::array();
    for (const auto& c : s->checkpoints) {
      ckpts.push_back({{"epoch", c.epoch}, {"path", c.path}, {"optimizer_state", c.optimizer_path}, {"lr", c.lr}});
    }
    std::cout << nlohmann::json{{"records", s->records}, {"bad", s->bad}, {"truncated", s->truncated},
                                {"steps", s->steps}, {"epoch_loss", s->epoch_loss}, {"seconds", s->seconds},
                                {"trained_parameters", s->trained_parameters}, {"out", s->out_path}, {"optimizer_state", s->optimizer_path},
                                {"checkpoints", ckpts}, {"bad_records", bad}}
                     .dump()
              << "\n";
    return 0;
  }
  std::printf("finetune summary\n");
  std::printf("  %-20s %lld used, %lld bad, %lld truncated\n", "records", static_cast<long long>(s->records),
              static_cast<long long>(s->bad), static_cast<long long>(s->truncated));
  std::printf("  %-20s %lld parameters, %lld steps, %.1f s\n", "training", static_cast<long long>(s->trained_parameters),
              static_cast<long long>(s->steps), s->seconds);
  for (size_t i = 0; i < s->epoch_loss.size(); ++i) {
    std::printf("  %-20s %.4f nats/token\n", absl::StrCat("epoch ", i + 1, " loss").c_str(), s->epoch_loss[i]);
  }
  std::printf("  %-20s %s\n", "saved", s->out_path.c_str());
  std::printf("  %-20s %s\n", "optimizer state", s->optimizer_path.c_str());
  for (size_t i = 0; i + 1 < s->checkpoints.size(); ++i) {
    std::printf("  %-20s %s\n", absl::StrCat("checkpoint epoch ", s->checkpoints[i].epoch).c_str(),
                s->checkpoints[i].path.c_str());
  }
  return 0;
}

int Eval(const rapidin::model::EngineOptions& eo, const std::string& data, int max_new, bool json) {
  std::vector<rapidin::cache::BadRecord> bad;
  auto r = rapidin::cache::RunEval(eo, data, max_new, &bad);
  if (!r.ok()) return Fail(r.status());
  for (const auto& b : bad) std::fprintf(stderr, "rapidin: skipped %s: %s\n", b.where.c_str(), b.reason.c_str());
  double sum = 0;
  for (const auto& e : *r) {
    sum += e.loss;
    if (json) {
      std::cout << rapidin::cache::EvalJsonLine(e, max_new > 0) << "\n";
    } else {
      std::printf("%-24s loss %.4f (%d tokens)%s%s\n", e.id.c_str(), e.loss, e.response_tokens,
                  max_new > 0 ? "  -> " : "", e.generation.c_str());
    }
  }
  if (!json && !r->empty()) std::printf("mean loss %.4f over %zu records\n", sum / r->size(), r->size());
  return 0;
}

// `rapidin export-hf`: the model (an adapter merged in) as a Hugging Face directory for transformers and the peers.
int ExportHf(const rapidin::model::EngineOptions& eo, const std::string& out) {
  auto e = rapidin::model::GradientEngine::Load(eo);
  if (!e.ok()) return Fail(e.status());
  if (absl::Status st = rapidin::model::SaveHf(**e, out); !st.ok()) return Fail(st);
  std::fprintf(stderr, "rapidin: wrote %s (config.json, model.safetensors)\n", out.c_str());
  return 0;
}

// `rapidin grow`: a larger model of the base's architecture that starts out computing the base's function
// (GradientEngine::Grow), written as a llama2.c checkpoint (.bin) or, for another path, a Hugging Face directory.
int GrowModel(const rapidin::model::EngineOptions& eo, const rapidin::model::ModelConfig& target, uint64_t seed,
              double init_std, const std::string& out) {
  auto base = rapidin::model::GradientEngine::Load(eo);
  if (!base.ok()) return Fail(base.status());
  rapidin::model::ModelConfig t = target;
  const auto& c = (*base)->config();
  const int hd = c.dim / c.n_heads, group = c.n_heads / c.n_kv_heads;
  if (t.dim == 0) t.dim = c.dim;
  if (t.n_layers == 0) t.n_layers = c.n_layers;
  if (t.hidden_dim == 0) t.hidden_dim = c.hidden_dim * t.dim / c.dim;  // the base's FFN ratio
  t.n_heads = t.dim / hd;  // head size and grouping stay the base's
  t.n_kv_heads = std::max(1, t.n_heads / group);
  t.vocab_size = c.vocab_size;
  t.seq_len = c.seq_len;
  t.tied_output = c.tied_output;
  if (t.dim % hd != 0) {
    return Fail(absl::InvalidArgumentError(absl::StrFormat("grow: --dim must be a multiple of the head size %d", hd)));
  }
  rapidin::model::EngineOptions go = eo;
  go.adapter_path.clear();  // merged into the grown weights
  auto g = rapidin::model::GradientEngine::Grow(**base, t, seed, init_std, go);
  if (!g.ok()) return Fail(g.status());
  const bool bin = absl::EndsWith(out, ".bin");
  const absl::Status saved = bin ? rapidin::model::SaveLlama2c(**g, out) : rapidin::model::SaveHf(**g, out);
  if (!saved.ok()) return Fail(saved);
  int64_t params = 0;
  for (const auto& p : (*g)->params()) params += p.numel;
  std::fprintf(stderr, "rapidin: wrote %s: dim %d, hidden %d, layers %d, heads %d (kv %d), %lld matrix parameters\n",
               out.c_str(), t.dim, t.hidden_dim, t.n_layers, t.n_heads, t.n_kv_heads, static_cast<long long>(params));
  return 0;
}

// `rapidin tokenize`: the token ids rapidin trains and scores on (template, truncation), one JSON line per record,
// so that tools outside rapidin (bench/peers) see identical inputs.
int TokenizeData(const rapidin::model::EngineOptions& eo, const std::string& data) {
  std::vector<rapidin::cache::BadRecord> bad;
  auto records = rapidin::cache::ReadInstructionData(data, &bad);
  if (!records.ok()) return Fail(records.status());
  auto e = rapidin::model::GradientEngine::Load(eo);
  if (!e.ok()) return Fail(e.status());
  for (const auto& r : *records) {
    auto t = (*e)->Tokenize(r.example);
    if (!t.ok()) {
      std::fprintf(stderr, "rapidin: skipped %s: %s\n", r.where.c_str(), std::string(t.status().message()).c_str());
      continue;
    }
    nlohmann::json j = {{"id", r.id}, {"ids", t->ids}, {"response_begin", t->response_begin},
                        {"truncated", t->truncated}};
    // Which tokens from response_begin on the loss covers (a chat's template text between turns is not).
    if (!t->loss_weights.empty()) j["loss_weights"] = t->loss_weights;
    std::cout << j.dump() << "\n";
  }
  for (const auto& b : bad) std::fprintf(stderr, "rapidin: skipped %s: %s\n", b.where.c_str(), b.reason.c_str());
  return 0;
}

}  // namespace

constexpr char kModelDeviceHelp[] =
    "where gradients run: cpu | cuda | cuda:N | auto (CUDA when this LibTorch has it and sees a GPU)";

int main(int argc, char** argv) {
  CLI::App app{"rapidin: which training records led to this output?"};
  app.require_subcommand(1);
  std::string server = "127.0.0.1:50051";
  double deadline = 60;
  bool json = false;

  auto* ingest = app.add_subcommand("ingest", "stream records with compressed vectors into the store");
  std::string file;
  int batch_size = 256;
  ingest->add_option("--server", server)->capture_default_str();
  ingest->add_option("--file", file, "JSONL: {id, instruction, input, output | text, metadata, vector}")->required();
  ingest->add_option("--batch-size", batch_size, "records per atomic batch")->capture_default_str()->check(
      CLI::Range(1, 1 << 20));
  ingest->add_option("--timeout", deadline, "seconds (0: none)");

  auto* query = app.add_subcommand("query", "top-k helpful/harmful records for query vectors or a generation");
  std::string vector_file, instruction, input, generation, psid;
  uint32_t top_k = 10, harmful_k = 0;
  bool aggregate = false, omit_text = false, tokens = false;
  query->add_option("--server", server)->capture_default_str();
  query->add_option("--vector-file", vector_file, "JSONL: {vector, weight?}");
  query->add_option("--instruction", instruction, "prompt instruction (query by text, needs a model)");
  query->add_option("--input", input, "prompt input");
  query->add_option("--generation", generation, "the generation to explain");
  std::string chat;
  query->add_option("--chat", chat,
                    "a chat to explain instead (JSON array of {role, content}; the last, the assistant's, is the "
                    "generation)");
  query->add_option("--top-k", top_k)->capture_default_str();
  query->add_option("--harmful-k", harmful_k)->capture_default_str();
  query->add_flag("--aggregate", aggregate, "one ranking for the weighted sum of the query vectors");
  query->add_option("--projection-state", psid, "refuse unless the store uses this projection-state id");
  query->add_flag("--ids-only", omit_text, "omit record text");
  query->add_flag("--json", json, "JSON instead of a table");
  query->add_flag("--tokens", tokens, "token-level attributions for each returned record (query by text)");
  std::vector<std::string> hotwords;
  query->add_option("--hotword", hotwords, "restrict the generation's loss to this span of it (repeatable)");
  std::string html;
  query->add_option("--html", html, "also write a self-contained HTML report with token attributions");
  query->add_option("--timeout", deadline, "seconds (0: none)");

  auto* stats = app.add_subcommand("stats", "store and server statistics");
  stats->add_option("--server", server)->capture_default_str();
  stats->add_flag("--json", json);
  stats->add_option("--timeout", deadline, "seconds (0: none)");

  auto* get = app.add_subcommand("get", "one record by id");
  std::string id;
  bool with_vector = false;
  get->add_option("--server", server)->capture_default_str();
  get->add_option("--id", id)->required();
  get->add_flag("--vector", with_vector, "include the stored vector");
  get->add_flag("--json", json);
  get->add_option("--timeout", deadline, "seconds (0: none)");

  auto* del = app.add_subcommand("delete", "delete records by id (admin role); idempotent");
  std::vector<std::string> del_ids;
  std::string ids_file;
  bool compact = false;
  del->add_option("--server", server)->capture_default_str();
  del->add_option("--id", del_ids, "a record id (repeatable)");
  del->add_option("--ids-file", ids_file, "one id per line");
  del->add_flag("--compact", compact, "also compact the store now, reclaiming the space");
  del->add_flag("--json", json);
  del->add_option("--timeout", deadline, "seconds (0: none)");

  for (CLI::App* sub : {ingest, query, stats, get, del}) {
    sub->add_option("--tls-ca", g_credentials.tls_ca, "PEM: the CA of the server's certificate (default: plaintext)");
    sub->add_option("--tls-cert", g_credentials.tls_cert, "PEM: this client's certificate (mutual TLS)");
    sub->add_option("--tls-key", g_credentials.tls_key, "PEM: its private key");
    sub->add_option("--token-file", g_token_file, "bearer token, first line of the file (default: $RAPIDIN_TOKEN)");
  }

  auto* demo = app.add_subcommand("make-demo", "write demo records (Alpaca text, random vectors) and queries");
  std::string alpaca, out_records = "demo_records.jsonl", out_queries = "demo_queries.jsonl";
  int n = 5000, k = 4096, nq = 2;
  uint32_t seed = 1;
  demo->add_option("--alpaca", alpaca, "Alpaca JSON array for record text (optional)");
  demo->add_option("--n", n)->capture_default_str()->check(CLI::Range(1, 100000000));
  demo->add_option("--k", k)->capture_default_str()->check(CLI::Range(1, 1 << 20));
  demo->add_option("--queries", nq)->capture_default_str()->check(CLI::Range(1, 1000));
  demo->add_option("--seed", seed)->capture_default_str();
  demo->add_option("--out", out_records)->capture_default_str();
  demo->add_option("--out-queries", out_queries)->capture_default_str();

  auto* cache = app.add_subcommand("cache", "compute compressed gradients of a training set into a store");
  rapidin::cache::CacheOptions co;
  cache->add_option("--model", co.featurizer.engine.model_path,
                    "llama2.c checkpoint (.bin) or Hugging Face model directory")->required();
  cache->add_option("--tokenizer", co.featurizer.engine.tokenizer_path, "tokenizer (default: next to the model)");
  cache->add_option("--template", co.featurizer.engine.chat_template,
                  "chat template for chat records: a JSON file or chatml|llama3|llama2|mistral|gemma (default: "
                  "tokenizer_config.json's chat_template)");
  cache->add_option("--adapter", co.featurizer.engine.adapter_path, "PEFT LoRA adapter directory");
  cache->add_option("--data", co.data_path, "training data: JSON array or JSONL (.gz too) of Alpaca {instruction, input, output}, chat {messages} or {text} records")
      ->required();
  cache->add_option("--store", co.store_path, "store directory (created, or resumed)")->required();
  cache->add_option("--k", co.featurizer.k, "sketch dimension K")->capture_default_str()->check(CLI::Range(1, 1 << 24));
  cache->add_option("--lambda", co.featurizer.lambda, "RapidGrad shuffle rounds")->capture_default_str()->check(
      CLI::Range(0, 64));
  cache->add_option("--seed", co.featurizer.seed, "RapidGrad seed")->capture_default_str();
  cache->add_option("--max-length", co.featurizer.engine.max_length, "tokens per record")->capture_default_str();
  cache->add_option("--params", co.featurizer.engine.param_pattern, "regex over parameter names (default: matrices)");
  cache->add_option("--preconditioner", co.featurizer.engine.preconditioner_path,
                    "Adam second moments (the optimizer.safetensors of `rapidin finetune`): divide each gradient "
                    "element by sqrt(v)+eps before normalising (TrackStar/LESS)");
  std::string checkpoints;
  cache->add_option("--checkpoints", checkpoints,
                    "TracIn-CP: the JSON summary of `rapidin finetune --json --checkpoint-every N`; each record's "
                    "vector concatenates every checkpoint's, scaled by sqrt(lr), so scores sum over checkpoints");
  std::string score = "dot";
  cache->add_option("--score", score, "dot: RapidIn's inner product; cosine: unit-normalised vectors")
      ->capture_default_str()
      ->check(CLI::IsMember({"dot", "cosine"}));
  std::string normalize = "layer";
  cache->add_option("--normalize", normalize,
                    "layer: RapidIn's layer-wise unit norm of each gradient; none: keep the gradient's norm (plain "
                    "TracIn; with --preconditioner and --checkpoints it measured best on LDS, bench/results/lds.md)")
      ->capture_default_str()
      ->check(CLI::IsMember({"layer", "none"}));
  co.featurizer.engine.device = "auto";
  cache->add_option("--model-device", co.featurizer.engine.device, kModelDeviceHelp)->capture_default_str();
  cache->add_option("--grad-path", co.featurizer.engine.grad_path,
                    "direct: the hand-written CPU forward/backward where it applies (plain Llama, weight "
                    "matrices), else autograd; autograd: LibTorch autograd always (the reference)")
      ->capture_default_str()
      ->check(CLI::IsMember({"direct", "autograd"}));
  cache->add_option("--threads", co.threads, "records in parallel")->capture_default_str()->check(CLI::Range(1, 256));
  cache->add_option("--batch-size", co.batch_size, "records per atomic store batch")->capture_default_str();
  cache->add_option("--grad-batch", co.grad_batch, "records per forward/backward pass (1: one at a time)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cache->add_option("--limit", co.limit, "cache only the first N records (0: all)");
  int shard_index = -1;
  cache->add_option("--shard-count", co.shard_count,
                    "split the records into this many contiguous ranges, one store (shard server) each")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cache->add_option("--shard-index", shard_index,
                    "the range this run caches, 0-based (default: $JOB_COMPLETION_INDEX of a Kubernetes Indexed "
                    "Job, else 0)");
  cache->add_flag("--json", json, "summary as JSON");

  auto* ft = app.add_subcommand("finetune", "fine-tune a model (AdamW; LoRA or full) on instruction data");
  rapidin::cache::FinetuneOptions fo;
  std::vector<std::string> targets;
  ft->add_option("--model", fo.engine.model_path, "base model: llama2.c checkpoint or Hugging Face directory")
      ->required();
  ft->add_option("--tokenizer", fo.engine.tokenizer_path, "tokenizer (default: next to the model)");
  ft->add_option("--template", fo.engine.chat_template,
                  "chat template for chat records: a JSON file or chatml|llama3|llama2|mistral|gemma (default: "
                  "tokenizer_config.json's chat_template)");
  ft->add_option("--data", fo.data_path, "JSON array or JSONL of Alpaca, chat {messages} or {text} records")->required();
  ft->add_option("--out", fo.out_path, "LoRA: adapter directory (PEFT format); full: llama2.c checkpoint")
      ->required();
  ft->add_option("--mode", fo.mode, "lora | full")->capture_default_str();
  ft->add_option("--rank", fo.lora.rank, "LoRA rank")->capture_default_str()->check(CLI::Range(1, 4096));
  ft->add_option("--alpha", fo.lora.alpha, "LoRA alpha (scale alpha / rank)")->capture_default_str();
  ft->add_option("--targets", targets, "LoRA target modules (default: all seven projections)");
  ft->add_option("--params", fo.engine.param_pattern, "full: regex of the trained parameters (default: matrices)");
  ft->add_option("--epochs", fo.epochs, "passes over the data")->capture_default_str()->check(CLI::Range(1, 10000));
  ft->add_option("--batch", fo.batch_size, "records per step")->capture_default_str()->check(CLI::Range(1, 65536));
  ft->add_option("--lr", fo.adam.lr, "AdamW learning rate")->capture_default_str();
  ft->add_option("--lr-schedule", fo.lr_schedule, "constant, or linear (decays to 0 at the last step)")
      ->check(CLI::IsMember({"constant", "linear"}))
      ->capture_default_str();
  ft->add_option("--checkpoint-every", fo.checkpoint_every,
                 "also save the model and optimizer state every N epochs as <out>.epoch-<e> (TracIn-CP); 0: no")
      ->capture_default_str()
      ->check(CLI::Range(0, 10000));
  ft->add_option("--checkpoint-epochs", fo.checkpoint_epochs,
                 "also save after these epochs (comma-separated, e.g. 0,1,2,3: TracIn-CP gains most early; 0 is the model "
                 "before fine-tuning, full mode only)")
      ->delimiter(',');
  ft->add_option("--weight-decay", fo.adam.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  ft->add_option("--seed", fo.seed, "record order and LoRA initialisation")->capture_default_str();
  ft->add_option("--max-length", fo.engine.max_length, "tokens per record")->capture_default_str();
  fo.engine.device = "auto";
  ft->add_option("--model-device", fo.engine.device, kModelDeviceHelp)->capture_default_str();
  ft->add_option("--optimizer-out", fo.optimizer_out,
                 "where the Adam second moments go (default: next to --out)");
  ft->add_option("--threads", fo.threads, "LibTorch threads")->capture_default_str()->check(CLI::Range(1, 256));
  ft->add_flag("--json", json, "summary as JSON");

  auto* ev = app.add_subcommand("eval", "per-record response loss, and greedy generations, of a model");
  rapidin::model::EngineOptions eo;
  int max_new = 0;
  ev->add_option("--model", eo.model_path, "llama2.c checkpoint or Hugging Face directory")->required();
  ev->add_option("--tokenizer", eo.tokenizer_path, "tokenizer (default: next to the model)");
  ev->add_option("--template", eo.chat_template,
                  "chat template for chat records: a JSON file or chatml|llama3|llama2|mistral|gemma (default: "
                  "tokenizer_config.json's chat_template)");
  ev->add_option("--adapter", eo.adapter_path, "PEFT LoRA adapter directory");
  ev->add_option("--data", file, "JSON array or JSONL of Alpaca, chat {messages} or {text} records")->required();
  ev->add_option("--generate", max_new, "also generate up to N tokens greedily (0: no)")->capture_default_str();
  ev->add_option("--max-length", eo.max_length, "tokens per record")->capture_default_str();
  eo.device = "auto";
  ev->add_option("--model-device", eo.device, kModelDeviceHelp)->capture_default_str();
  ev->add_flag("--json", json, "JSON lines");

  auto* xh = app.add_subcommand("export-hf", "write the model (adapter merged) as a Hugging Face directory");
  rapidin::model::EngineOptions xo;
  std::string xout;
  xh->add_option("--model", xo.model_path, "llama2.c checkpoint or Hugging Face directory")->required();
  xh->add_option("--adapter", xo.adapter_path, "PEFT LoRA adapter directory (merged into the weights)");
  xh->add_option("--out", xout, "output directory (config.json + model.safetensors)")->required();

  auto* gr = app.add_subcommand("grow", "a larger model of the same architecture, starting from the base's function");
  rapidin::model::EngineOptions go;
  rapidin::model::ModelConfig gt;
  uint64_t grow_seed = 0;
  double init_std = 0.02;
  std::string gout;
  gr->add_option("--model", go.model_path, "base: llama2.c checkpoint or Hugging Face directory")->required();
  gr->add_option("--adapter", go.adapter_path, "PEFT LoRA adapter directory (merged into the base)");
  gr->add_option("--out", gout, "a .bin path: llama2.c checkpoint; else a Hugging Face directory")->required();
  gr->add_option("--dim", gt.dim, "model width (a multiple of the base's head size; default: the base's)")
      ->check(CLI::Range(1, 65536));
  gr->add_option("--hidden-dim", gt.hidden_dim, "FFN width (default: the base's ratio)")->check(CLI::Range(1, 1 << 20));
  gr->add_option("--layers", gt.n_layers, "layers (default: the base's)")->check(CLI::Range(1, 1024));
  gr->add_option("--seed", grow_seed, "seed of the new weights")->capture_default_str();
  gr->add_option("--init-std", init_std, "standard deviation of the new weights that read the residual stream")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 10.0));

  auto* tk = app.add_subcommand("tokenize", "the token ids of instruction data, as rapidin sees them (JSON lines)");
  rapidin::model::EngineOptions to;
  tk->add_option("--model", to.model_path, "llama2.c checkpoint or Hugging Face directory")->required();
  tk->add_option("--tokenizer", to.tokenizer_path, "tokenizer (default: next to the model)");
  tk->add_option("--template", to.chat_template,
                  "chat template for chat records: a JSON file or chatml|llama3|llama2|mistral|gemma (default: "
                  "tokenizer_config.json's chat_template)");
  tk->add_option("--data", file, "JSON array or JSONL of Alpaca, chat {messages} or {text} records")->required();
  tk->add_option("--max-length", to.max_length, "tokens per record")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "rapidin: %s (see --help)\n", e.what());
    return 2;
  }

  if (*ingest) return Ingest(server, file, batch_size, deadline);
  if (*query) {
    if (!vector_file.empty() + !generation.empty() + !chat.empty() != 1) {
      std::fprintf(stderr, "rapidin: query needs exactly one of --vector-file, --generation or --chat\n");
      return 2;
    }
    if (!vector_file.empty()) {
      return QueryVectors(server, vector_file, top_k, harmful_k, aggregate, psid, json, omit_text, deadline);
    }
    return QueryText(server, instruction, input, generation, chat, top_k, harmful_k, json, tokens, html, hotwords,
                     omit_text, deadline);
  }
  if (*stats) {
    auto client = Dial(server, deadline);
    if (!client.ok()) return Fail(client.status());
    auto r = (*client)->Stats();
    if (!r.ok()) return Fail(r.status());
    std::cout << (json ? rapidin::client::ToJson(*r) + "\n" : rapidin::client::StatsTable(*r));
    return 0;
  }
  if (*del) {
    if (!ids_file.empty()) {
      absl::Status st = rapidin::client::ForEachLine(ids_file, [&](int64_t, const std::string& line) {
        const std::string id(absl::StripAsciiWhitespace(line));
        if (!id.empty()) del_ids.push_back(id);
        return absl::OkStatus();
      });
      if (!st.ok()) return Fail(st);
    }
    if (del_ids.empty()) {
      std::fprintf(stderr, "rapidin: delete needs --id or --ids-file\n");
      return 2;
    }
    auto client = Dial(server, deadline);
    if (!client.ok()) return Fail(client.status());
    auto r = (*client)->DeleteRecords(del_ids, compact);
    if (!r.ok()) return Fail(r.status());
    if (json) {
      std::cout << rapidin::client::ToJson(*r) << "\n";
    } else {
      std::printf("%llu deleted, %llu not found; the store holds %llu records\n",
                  static_cast<unsigned long long>(r->deleted()), static_cast<unsigned long long>(r->not_found()),
                  static_cast<unsigned long long>(r->record_count()));
    }
    return 0;
  }
  if (*get) {
    auto client = Dial(server, deadline);
    if (!client.ok()) return Fail(client.status());
    auto r = (*client)->GetRecord(id, with_vector);
    if (!r.ok()) return Fail(r.status());
    std::cout << (json ? rapidin::client::ToJson(*r) + "\n" : rapidin::client::RecordTable(*r));
    return 0;
  }
  if (*cache || *ft || *ev) {
    // Autograd allocates and frees the same large buffers every pass: keep them in the heap instead of an
    // mmap/munmap (and page faults) per buffer. Measured: fine-tuning 400 records, 2 threads,
    // 31.7 s -> 26.0 s wall with the same settings given through the environment.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest accepted value
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_TOP_PAD, 1 << 30);
  }
  if (*cache) {
    co.featurizer.unit_norm = score == "cosine";
    co.featurizer.layer_norm = normalize == "layer";
    if (!checkpoints.empty()) {
      absl::Status st = rapidin::model::ReadFinetuneCheckpoints(
          checkpoints, !co.featurizer.engine.preconditioner_path.empty(), &co.featurizer);
      if (!st.ok()) return Fail(st);
    }
    if (shard_index < 0 && co.shard_count > 1) {
      const char* env = std::getenv("JOB_COMPLETION_INDEX");
      if (env == nullptr || !absl::SimpleAtoi(env, &shard_index)) {
        return Fail(absl::InvalidArgumentError(
            "--shard-count > 1 needs --shard-index (or JOB_COMPLETION_INDEX, set by a Kubernetes Indexed Job)"));
      }
    }
    co.shard_index = std::max(shard_index, 0);
    return Cache(co, json);
  }
  if (*ft) {
    if (!targets.empty()) fo.lora.target_modules = targets;
    if (absl::Status st = rapidin::model::ResolveTokenizer(&fo.engine); !st.ok()) return Fail(st);
    return Finetune(fo, json);
  }
  if (*ev) {
    if (absl::Status st = rapidin::model::ResolveTokenizer(&eo); !st.ok()) return Fail(st);
    return Eval(eo, file, max_new, json);
  }
  if (*xh) return ExportHf(xo, xout);
  if (*gr) return GrowModel(go, gt, grow_seed, init_std, gout);
  if (*tk) {
    if (absl::Status st = rapidin::model::ResolveTokenizer(&to); !st.ok()) return Fail(st);
    return TokenizeData(to, file);
  }
  if (*demo) return MakeDemo(alpaca, n, k, seed, nq, out_records, out_queries);
  return 2;
}
