// Soak: holds a running rapidin-server (or router) at saturation with mixed traffic for a fixed time and reports
// latency percentiles, throughput and errors per method, plus the server process's resident memory, open file
// descriptors and threads sampled every few seconds (with the memory slope after warm-up).
//
// Traffic per worker thread, chosen at random: QueryByVector (a stored record's vector plus noise), Query by text
// (when --text), GetRecord, and, in 15% of the calls, Ingest of 8 fresh records while the worker holds fewer than
// 64 of its own, else DeleteRecords of the 8 oldest (so the store's size stays bounded), and --deadline-share of QueryByVector calls with a 1 ms deadline (DEADLINE_EXCEEDED is then expected and
// counted apart). Any other non-OK status is an error.
//
// Usage: soak --server HOST:PORT --pid PID (--ids-from FILE.jsonl | --id-prefix P --id-count N) [--seconds 600]
//             [--threads 8] [--text] [--ingest-server HOST:PORT] [--token-file F] [--json OUT.json]
//   FILE.jsonl: records whose ids and vectors are in the store; or ids P0..P(N-1), whose vectors are fetched
//   with GetRecord first. Ingest goes to --ingest-server (a router does not take ingests; default --server),
//   DeleteRecords to --server.
#include <dirent.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/proc_stats.h"
#include "client/client.h"
#include "client/credentials.h"

namespace {

using rapidin::client::Client;
using rapidin::client::Credentials;
namespace v1 = rapidin::v1;
using Clock = std::chrono::steady_clock;

// The server's /proc figures at time t (seconds into the run), and the SST files in its store directory.
struct ProcSample : rapidin::bench::ProcState {
  double t = 0;
  int sst_files = 0;  // RocksDB keeps each one open
};

ProcSample Sample(int pid, double t, const std::string& store) {
  ProcSample s;
  static_cast<rapidin::bench::ProcState&>(s) = rapidin::bench::ReadProc(pid);
  s.t = t;
  if (!store.empty()) {
    if (DIR* d = opendir(store.c_str())) {
      while (dirent* e = readdir(d)) {
        const std::string n = e->d_name;
        s.sst_files += n.size() > 4 && n.compare(n.size() - 4, 4, ".sst") == 0;
      }
      closedir(d);
    }
  }
  return s;
}

struct Stats {
  std::vector<double> ms;
  std::map<std::string, int64_t> codes;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"soak: mixed traffic against a running rapidin-server"};
  std::string server, ingest_server, ids_from, id_prefix, token_file, json_out, store_dir;
  int pid = 0, threads = 8, id_count = 0;
  double seconds = 600, deadline_share = 0.02;
  bool text = false;
  app.add_option("--server", server)->required();
  app.add_option("--pid", pid, "the server's process id (for memory, fds, threads)")->required();
  app.add_option("--ids-from", ids_from, "JSONL records that are in the store (id and vector)");
  app.add_option("--id-prefix", id_prefix, "or: ids PREFIX0 .. PREFIX(N-1) in the store");
  app.add_option("--id-count", id_count);
  app.add_option("--seconds", seconds)->capture_default_str();
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--deadline-share", deadline_share, "share of vector queries sent with a 1 ms deadline");
  app.add_flag("--text", text, "include text queries (the server needs --model)");
  app.add_option("--ingest-server", ingest_server, "where Ingest/DeleteRecords go (default --server)");
  app.add_option("--token-file", token_file);
  app.add_option("--json", json_out);
  app.add_option("--store", store_dir, "the server's store directory (its SST files are counted)");
  CLI11_PARSE(app, argc, argv);
  if (ingest_server.empty()) ingest_server = server;

  Credentials creds;
  auto token = rapidin::client::TokenFromFileOrEnv(token_file, nullptr);
  if (!token.ok()) {
    std::fprintf(stderr, "soak: %s\n", token.status().ToString().c_str());
    return 2;
  }
  creds.token = *token;
  std::vector<std::string> ids;
  std::vector<std::vector<float>> vecs;
  if (ids_from.empty()) {
    auto c = Client::Connect(server, creds, 30);
    for (int i = 0; i < id_count && c.ok(); ++i) {
      auto r = (*c)->GetRecord(id_prefix + std::to_string(i), true);
      if (absl::IsNotFound(r.status())) continue;  // a record the caching stage skipped (e.g. an empty output)
      if (!r.ok()) {
        std::fprintf(stderr, "soak: %s\n", r.status().ToString().c_str());
        return 2;
      }
      ids.push_back(r->record().id());
      vecs.emplace_back(r->vector().begin(), r->vector().end());
    }
    if (ids.empty()) {
      std::fprintf(stderr, "soak: give --ids-from or --id-prefix/--id-count\n");
      return 2;
    }
  } else {
    absl::Status st = rapidin::client::ForEachLine(ids_from, [&](int64_t, const std::string& line) {
      auto r = rapidin::client::ParseRecordLine(line);
      if (!r.ok()) return r.status();
      ids.push_back(r->record().id());
      vecs.emplace_back(r->vector().begin(), r->vector().end());
      return absl::OkStatus();
    });
    if (!st.ok() || ids.empty()) {
      std::fprintf(stderr, "soak: %s\n", st.ok() ? "no records" : st.ToString().c_str());
      return 2;
    }
  }

  const char* kMethods[] = {"QueryByVector", "Query", "GetRecord", "Ingest", "DeleteRecords", "deadline"};
  std::mutex mu;
  std::map<std::string, Stats> stats;
  std::atomic<bool> stop{false};
  const auto t0 = Clock::now();
  auto since = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };

  std::vector<ProcSample> samples;
  std::thread sampler([&] {
    while (!stop) {
      samples.push_back(Sample(pid, since(), store_dir));
      for (int i = 0; i < 50 && !stop; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    samples.push_back(Sample(pid, since(), store_dir));
  });

  std::vector<std::thread> workers;
  for (int w = 0; w < threads; ++w) {
    workers.emplace_back([&, w] {
      auto c = std::move(*Client::Connect(server, creds, 30));
      auto ci = std::move(*Client::Connect(ingest_server, creds, 30));
      auto fast = std::move(*Client::Connect(server, creds, 0.001));
      std::mt19937_64 rng(1000 + w);
      std::normal_distribution<float> noise(0, 0.01f);
      std::vector<std::string> mine;  // ingested by this worker, not yet deleted
      int64_t next_id = 0;
      std::map<std::string, Stats> local;
      while (!stop) {
        const double u = std::uniform_real_distribution<double>(0, 1)(rng);
        const size_t r = rng() % ids.size();
        const auto t = Clock::now();
        absl::Status st;
        std::string method;
        if (u < deadline_share) {
          method = "deadline";
          v1::QueryByVectorRequest q;
          auto* v = q.add_queries();
          for (float x : vecs[r]) v->add_values(x + noise(rng));
          q.set_top_k(10);
          st = fast->QueryByVector(q).status();
        } else if (u < 0.55) {
          method = "QueryByVector";
          v1::QueryByVectorRequest q;
          auto* v = q.add_queries();
          for (float x : vecs[r]) v->add_values(x + noise(rng));
          q.set_top_k(10);
          q.set_harmful_k(5);
          q.set_omit_text(true);
          st = c->QueryByVector(q).status();
        } else if (u < 0.65 && text) {
          method = "Query";
          v1::QueryRequest q;
          q.set_instruction("Give three tips for staying healthy.");
          q.set_generation("Eat well, sleep enough and exercise every day.");
          q.set_top_k(5);
          q.set_omit_text(true);
          st = c->Query(q).status();
        } else if (u < 0.85) {
          method = "GetRecord";
          st = c->GetRecord(ids[r], false).status();
        } else if (mine.size() < 64) {  // each worker keeps up to 64 records of its own: ingests and deletes balance
          method = "Ingest";
          std::vector<std::string> batch_ids;
          auto res = ci->Ingest([&, sent = false](v1::IngestRequest* b) mutable {
            if (sent) return false;
            sent = true;
            for (int i = 0; i < 8; ++i) {
              auto* rec = b->add_records();
              batch_ids.push_back(absl::StrCat("soak-", w, "-", next_id++));
              rec->mutable_record()->set_id(batch_ids.back());
              rec->mutable_record()->set_text("soak record");
              for (float x : vecs[(r + i) % vecs.size()]) rec->add_vector(x + noise(rng));
            }
            return true;
          });
          st = res.status();
          if (st.ok()) mine.insert(mine.end(), batch_ids.begin(), batch_ids.end());
        } else {
          method = "DeleteRecords";
          std::vector<std::string> del(mine.begin(), mine.begin() + 8);
          auto res = c->DeleteRecords(del);  // through a router: forwarded to the shard servers
          st = res.status();
          if (st.ok()) {
            mine.erase(mine.begin(), mine.begin() + 8);
            if (res->deleted() != 8) st = absl::InternalError("deleted fewer than 8 records it had ingested");
          }
        }
        auto& s = local[method];
        s.ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t).count());
        ++s.codes[absl::StatusCodeToString(st.code())];
      }
      std::lock_guard<std::mutex> l(mu);
      for (auto& [m, s] : local) {
        auto& g = stats[m];
        g.ms.insert(g.ms.end(), s.ms.begin(), s.ms.end());
        for (auto& [code, n] : s.codes) g.codes[code] += n;
      }
    });
  }
  while (since() < seconds) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  stop = true;
  for (auto& t : workers) t.join();
  sampler.join();
  const double wall = since();

  int64_t errors = 0, total = 0;
  std::printf("| method | calls | calls/s | p50 ms | p99 ms | status codes |\n|---|---|---|---|---|---|\n");
  for (const char* m : kMethods) {
    auto it = stats.find(m);
    if (it == stats.end()) continue;
    const Stats& s = it->second;
    std::string codes;
    for (const auto& [code, n] : s.codes) {
      absl::StrAppend(&codes, codes.empty() ? "" : ", ", code, " ", n);
      const bool expected = code == "OK" || (std::string(m) == "deadline" && code == "DEADLINE_EXCEEDED");
      if (!expected) errors += n;
    }
    total += static_cast<int64_t>(s.ms.size());
    std::printf("| %s | %zu | %.1f | %.2f | %.2f | %s |\n", m, s.ms.size(), s.ms.size() / wall,
                Percentile(s.ms, 0.5), Percentile(s.ms, 0.99), codes.c_str());
  }
  // Memory slope after warm-up (the first fifth of the run): least squares over the samples, in % per minute of
  // the post-warm-up mean.
  std::vector<ProcSample> late;
  for (const auto& s : samples) {
    if (s.t >= wall / 5) late.push_back(s);
  }
  double slope_pct = 0;
  if (late.size() >= 2) {
    double mt = 0, mr = 0;
    for (const auto& s : late) mt += s.t, mr += s.rss_mb;
    mt /= late.size();
    mr /= late.size();
    double num = 0, den = 0;
    for (const auto& s : late) num += (s.t - mt) * (s.rss_mb - mr), den += (s.t - mt) * (s.t - mt);
    slope_pct = den > 0 ? num / den * 60.0 / mr * 100.0 : 0;
  }
  const ProcSample& a = samples.front();
  const ProcSample& w = late.empty() ? samples.front() : late.front();
  const ProcSample& b = samples.back();
  std::printf("\n%.0f s, %d client threads: %lld calls (%.1f/s), %lld errors (deadline errors asked for are not "
              "errors)\n",
              wall, threads, static_cast<long long>(total), total / wall, static_cast<long long>(errors));
  std::printf("server RSS %.1f MB at start, %.1f MB after warm-up, %.1f MB at the end (slope after warm-up %+.3f%%/min); "
              "fds %d -> %d; threads %d -> %d\n",
              a.rss_mb, w.rss_mb, b.rss_mb, slope_pct, w.fds, b.fds, w.threads, b.threads);
  // fds and SST files over time (ten points), so a count that grows can be told from one that levels off.
  std::string series;
  for (size_t i = 0; i < 10 && !samples.empty(); ++i) {
    const ProcSample& s = samples[i * (samples.size() - 1) / 9];
    absl::StrAppendFormat(&series, "%s%.0fs: %d fds, %d threads%s", i ? "; " : "", s.t, s.fds, s.threads,
                          store_dir.empty() ? "" : absl::StrFormat(", %d SST files", s.sst_files));
  }
  std::printf("over time: %s\n", series.c_str());
  if (!json_out.empty()) {
    std::ofstream f(json_out);
    f << absl::StrFormat(
        "{\"seconds\": %.1f, \"threads\": %d, \"calls\": %lld, \"errors\": %lld, \"rss_mb_start\": %.1f, "
        "\"rss_mb_warm\": %.1f, \"rss_mb_end\": %.1f, \"rss_slope_pct_per_min\": %.4f, \"fds_warm\": %d, "
        "\"fds_end\": %d, \"threads_warm\": %d, \"threads_end\": %d}\n",
        wall, threads, static_cast<long long>(total), static_cast<long long>(errors), a.rss_mb, w.rss_mb, b.rss_mb,
        slope_pct, w.fds, b.fds, w.threads, b.threads);
  }
  return errors == 0 ? 0 : 1;
}
