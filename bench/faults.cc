// Faults while serving (bench/faults/run.sh drives it; figures in bench/results/reliability.md). Subcommands:
//
//   timeline --server A --id-prefix P --id-count N --seconds S [--threads T] --out CALLS.tsv
//       QueryByVector at saturation; one line per call: start and end (Unix seconds), status code, message. The
//       driver kills and restarts a shard server meanwhile and reads the timeline.
//   writer --server A --log F [--k K] [--seed S] [--until-error] [--verify-only]
//       First checks the store against the log of earlier runs (through the server: GetRecord of every record
//       ever written, Stats), then ingests and deletes batches of 8 records, logging each intent before sending
//       it and each acknowledgement after it, until a call fails (the server was killed). Acknowledged batches
//       must be present (or absent once their delete is acknowledged); an unacknowledged one whole or absent.
//       --max-ops N: stop after N ingests and deletes. --until-error: stop at the first error that is not UNAVAILABLE, print it, and check that queries are still
//       answered (the full-disk run). Exit 1 on any lost, torn or resurrected record.
//   storm --server A --id-prefix P --id-count N --seconds S [--threads T] [--max-message-mb M] [--pid PID]
//       Hostile clients (deadlines of 0-5 ms, cancels mid-call and mid-ingest-stream, oversized messages, bytes
//       that are not a protobuf, wrong dimensions, NaN, bad k, a foreign projection state, unknown methods) beside
//       well-behaved ones. Every hostile call must get its expected status class; every well-behaved call must
//       succeed; cancelled ingest batches must be whole or absent; the server must keep answering.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/client.h"
#include "bench/proc_stats.h"
#include "kernels/half.h"
#include "rapidin/v1/rapidin.grpc.pb.h"

namespace {

namespace v1 = rapidin::v1;
using rapidin::client::Client;
using Clock = std::chrono::steady_clock;

double UnixNow() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string OneLine(std::string s) {
  for (char& c : s) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return s.substr(0, 300);
}

std::unique_ptr<v1::InfluenceService::Stub> Stub(const std::string& address, int max_message_bytes = 64 << 20) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetMaxReceiveMessageSize(max_message_bytes);
  return v1::InfluenceService::NewStub(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

// Ids PREFIX0..PREFIX(N-1) that are in the store, with their vectors (records the caching stage skipped are
// left out).
bool LoadStored(const std::string& server, const std::string& prefix, int count, std::vector<std::string>* ids,
                std::vector<std::vector<float>>* vecs) {
  auto c = Client::Connect(server, 30);
  for (int i = 0; i < count; ++i) {
    auto r = c->GetRecord(prefix + std::to_string(i), true);
    if (absl::IsNotFound(r.status())) continue;
    if (!r.ok()) {
      std::fprintf(stderr, "faults: %s\n", r.status().ToString().c_str());
      return false;
    }
    ids->push_back(r->record().id());
    vecs->emplace_back(r->vector().begin(), r->vector().end());
  }
  if (ids->empty()) std::fprintf(stderr, "faults: no records %s0..%s%d in the store\n", prefix.c_str(), prefix.c_str(), count - 1);
  return !ids->empty();
}

// ---------------------------------------------------------------------------------------------------------------
// timeline

int Timeline(const std::string& server, const std::string& prefix, int count, double seconds, int threads,
             const std::string& out) {
  std::vector<std::string> ids;
  std::vector<std::vector<float>> vecs;
  if (!LoadStored(server, prefix, count, &ids, &vecs)) return 2;
  std::mutex mu;
  std::FILE* f = std::fopen(out.c_str(), "w");
  if (!f) return 2;
  std::atomic<bool> stop{false};
  std::vector<std::thread> ws;
  for (int w = 0; w < threads; ++w) {
    ws.emplace_back([&, w] {
      auto stub = Stub(server);
      std::mt19937_64 rng(77 + w);
      std::string lines;
      while (!stop) {
        v1::QueryByVectorRequest q;
        auto* v = q.add_queries();
        const auto& src = vecs[rng() % vecs.size()];
        v->mutable_values()->Add(src.begin(), src.end());
        q.set_top_k(10);
        q.set_omit_text(true);
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
        v1::QueryByVectorResponse resp;
        const double t0 = UnixNow();
        grpc::Status st = stub->QueryByVector(&ctx, q, &resp);
        const double t1 = UnixNow();
        absl::StrAppendFormat(&lines, "%.4f\t%.4f\t%d\t%s\n", t0, t1, static_cast<int>(st.error_code()),
                              OneLine(st.error_message()));
        if (!st.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // no busy loop while down
        if (lines.size() > 1 << 16) {
          std::lock_guard<std::mutex> l(mu);
          std::fputs(lines.c_str(), f);
          lines.clear();
        }
      }
      std::lock_guard<std::mutex> l(mu);
      std::fputs(lines.c_str(), f);
    });
  }
  const auto t0 = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - t0).count() < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  stop = true;
  for (auto& t : ws) t.join();
  std::fclose(f);
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// writer

constexpr int kBatch = 8;

std::string& last_refusal() {
  static std::string s;
  return s;
}

std::string RecordId(int64_t batch, int i) { return absl::StrCat("w-", batch, "-", i); }

std::vector<float> RecordVector(int64_t batch, int i, int k) {
  std::mt19937_64 rng(static_cast<uint64_t>(batch) * 131 + static_cast<uint64_t>(i));
  std::normal_distribution<float> g;
  std::vector<float> v(k);
  for (auto& x : v) x = g(rng);
  return v;
}

// What the log says about one batch.
struct BatchState {
  bool ingest_sent = false, ingest_acked = false, delete_sent = false, delete_acked = false;
  int resolved = -1;  // after a check: 1 present, 0 absent
};

// The batch's records in the store: 1 all present with their vectors, 0 all absent, -1 torn (or wrong vectors),
// -2 the server did not answer.
int Probe(Client* c, int64_t batch, int k, std::string* why) {
  int present = 0;
  for (int i = 0; i < kBatch; ++i) {
    auto r = c->GetRecord(RecordId(batch, i), true);
    if (absl::IsNotFound(r.status())) continue;
    if (!r.ok()) {
      *why = r.status().ToString();
      return -2;
    }
    const auto want = RecordVector(batch, i, k);
    if (r->vector_size() != k) {
      *why = absl::StrCat(RecordId(batch, i), ": ", r->vector_size(), " values");
      return -1;
    }
    for (int c2 = 0; c2 < k; ++c2) {
      const float stored = rapidin::kernels::HalfToFloat(rapidin::kernels::FloatToHalf(want[c2]));
      if (r->vector(c2) != stored) {
        *why = absl::StrCat(RecordId(batch, i), ": value ", c2, " is ", r->vector(c2), ", wrote ", stored);
        return -1;
      }
    }
    ++present;
  }
  if (present == 0) return 0;
  if (present == kBatch) return 1;
  *why = absl::StrCat("batch ", batch, ": ", present, " of ", kBatch, " records present");
  return -1;
}

// call() until it succeeds or fails with other than RESOURCE_EXHAUSTED / UNAVAILABLE, for up to `seconds`
// (0: once); prints how long the first success took when it needed retries.
template <typename F>
auto Retrying(double seconds, F call) -> decltype(call()) {
  const auto t0 = Clock::now();
  int tries = 0;
  for (;;) {
    auto r = call();
    ++tries;
    const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
    const bool retry = !r.ok() && (absl::IsResourceExhausted(r.status()) || absl::IsUnavailable(r.status()));
    if (!retry || waited >= seconds) {
      if (r.ok() && tries > 1) {
        std::printf("writes accepted again after %.1f s (%d tries); the last refusal: %s\n", waited, tries - 1,
                    last_refusal().c_str());
      }
      return r;
    }
    last_refusal() = r.status().ToString();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

int Writer(const std::string& server, const std::string& log_path, int k, uint64_t seed, bool until_error,
           bool verify_only, int64_t max_ops, double retry_seconds) {
  std::map<int64_t, BatchState> batches;
  {
    std::ifstream in(log_path);
    std::string op;
    int64_t b;
    while (in >> op >> b) {
      BatchState& s = batches[b];
      if (op == "I") s.ingest_sent = true;
      if (op == "IA") s.ingest_acked = true;
      if (op == "D") {
        s.delete_sent = true;
        s.resolved = -1;  // what an earlier check found no longer holds
      }
      if (op == "DA") s.delete_acked = true;
      if (op == "R1") s.resolved = 1;
      if (op == "R0") s.resolved = 0;
    }
  }
  std::ofstream log(log_path, std::ios::app);
  auto note = [&](const char* op, int64_t b) { log << op << ' ' << b << '\n' << std::flush; };
  auto c = Client::Connect(server, 30);

  // 1. The store against the log.
  int64_t lost = 0, torn = 0, resurrected = 0, present = 0, absent = 0, unacked_present = 0, unacked_absent = 0;
  std::string why;
  // Batches deleted (acknowledged) and since found absent are settled: a sample of 50 is re-checked each time
  // (every one with --verify-only), so the check stays short as the log grows.
  std::vector<int64_t> settled;
  for (const auto& [b, s] : batches) {
    if (s.delete_sent && s.resolved == 0) settled.push_back(b);
  }
  std::set<int64_t> sample;
  std::mt19937_64 pick(seed * 7 + 1);
  for (int i = 0; i < 50 && !settled.empty() && !verify_only; ++i) sample.insert(settled[pick() % settled.size()]);
  int64_t skipped = 0;
  for (auto& [b, s] : batches) {
    if (!verify_only && s.delete_sent && s.resolved == 0 && !sample.count(b)) {
      ++absent;
      ++skipped;
      continue;
    }
    const int got = Probe(c.get(), b, k, &why);
    if (got == -2) {
      std::fprintf(stderr, "writer: the server does not answer: %s\n", why.c_str());
      return 2;
    }
    if (got == -1) {
      ++torn;
      std::fprintf(stderr, "writer: TORN %s\n", why.c_str());
      continue;
    }
    // What is certain: the last acknowledged operation, or the state a previous check resolved.
    int certain = -1;
    if (s.delete_acked) {
      certain = 0;
    } else if (s.delete_sent) {
      certain = s.resolved;  // an unacknowledged delete: either, until a check after it found which
    } else if (s.ingest_acked || s.resolved == 1) {
      certain = 1;
    } else if (s.resolved == 0) {
      certain = 0;
    }
    if (certain == 1 && got == 0) {
      ++lost;
      std::fprintf(stderr, "writer: LOST batch %lld (acknowledged)\n", static_cast<long long>(b));
    } else if (certain == 0 && got == 1) {
      ++resurrected;
      std::fprintf(stderr, "writer: RESURRECTED batch %lld (deleted)\n", static_cast<long long>(b));
    } else if (certain == -1) {
      (got == 1 ? unacked_present : unacked_absent)++;
    }
    if (s.resolved != got) {
      note(got == 1 ? "R1" : "R0", b);
      s.resolved = got;
    }
    (got == 1 ? present : absent)++;
  }
  auto stats = c->Stats();
  if (!stats.ok()) {
    std::fprintf(stderr, "writer: %s\n", stats.status().ToString().c_str());
    return 2;
  }
  const bool count_ok = stats->num_records() == static_cast<uint64_t>(present * kBatch);
  std::printf("check: %lld batches in the log (%lld settled deletions not re-read): %lld present, %lld absent "
              "(unacknowledged: %lld present, %lld absent); lost %lld, torn %lld, resurrected %lld; store holds %llu "
              "records (%s)\n",
              static_cast<long long>(batches.size()), static_cast<long long>(skipped), static_cast<long long>(present),
              static_cast<long long>(absent), static_cast<long long>(unacked_present),
              static_cast<long long>(unacked_absent), static_cast<long long>(lost), static_cast<long long>(torn),
              static_cast<long long>(resurrected), static_cast<unsigned long long>(stats->num_records()),
              count_ok ? "as expected" : "NOT the expected count");
  std::fflush(stdout);  // the driver starts its kill timer when this line is out
  const int check_rc = (lost || torn || resurrected || !count_ok) ? 1 : 0;
  if (verify_only) return check_rc;

  // 2. Write until the server goes away.
  std::mt19937_64 rng(seed);
  int64_t next = batches.empty() ? 0 : batches.rbegin()->first + 1;
  std::vector<int64_t> live;
  for (const auto& [b, s] : batches) {
    if (s.resolved == 1) live.push_back(b);
  }
  int64_t ingests = 0, deletes = 0, streams = 0;
  absl::Status last = absl::OkStatus();
  for (int64_t op = 0; max_ops <= 0 || op < max_ops; ++op) {
    const bool ingest = live.size() < 40 || rng() % 10 < 4;  // 0.4 x 1.5 batches in, 0.6 out: about 40 live
    if (ingest) {
      const int n = rng() % 4 == 0 ? 3 : 1;  // sometimes a stream of three batches
      std::vector<int64_t> bs;
      for (int j = 0; j < n; ++j) {
        bs.push_back(next++);
        note("I", bs.back());
      }
      size_t sent = 0;
      auto ingest_once = [&] { sent = 0; return c->Ingest([&](v1::IngestRequest* req) {
        if (sent == bs.size()) return false;
        const int64_t b = bs[sent++];
        for (int i = 0; i < kBatch; ++i) {
          auto* rec = req->add_records();
          rec->mutable_record()->set_id(RecordId(b, i));
          rec->mutable_record()->set_text(absl::StrCat("fault record ", b, "/", i));
          const auto v = RecordVector(b, i, k);
          rec->mutable_vector()->Add(v.begin(), v.end());
        }
        return true;
      }); };
      auto r = Retrying(retry_seconds, ingest_once);
      if (!r.ok()) {
        last = r.status();
        break;
      }
      for (int64_t b : bs) {
        note("IA", b);
        live.push_back(b);
      }
      ingests += n;
      streams += n > 1;
    } else {
      const size_t pick = rng() % live.size();
      const int64_t b = live[pick];
      note("D", b);
      std::vector<std::string> ids;
      for (int i = 0; i < kBatch; ++i) ids.push_back(RecordId(b, i));
      auto r = Retrying(retry_seconds, [&] { return c->DeleteRecords(ids); });
      if (!r.ok()) {
        last = r.status();
        break;
      }
      if (r->deleted() != kBatch) {
        std::fprintf(stderr, "writer: deleting batch %lld removed %llu records, not %d\n", static_cast<long long>(b),
                     static_cast<unsigned long long>(r->deleted()), kBatch);
        return 1;
      }
      note("DA", b);
      live.erase(live.begin() + static_cast<long>(pick));
      ++deletes;
    }
  }
  std::printf("wrote: %lld batches ingested (%lld in streams of three), %lld deleted, until: %s\n",
              static_cast<long long>(ingests), static_cast<long long>(streams), static_cast<long long>(deletes),
              last.ToString().c_str());
  if (until_error && !last.ok()) {
    if (absl::IsUnavailable(last)) return 3;
    // The store refused a write (a full disk): reads and queries must go on.
    auto q = c->GetRecord(RecordId(live.empty() ? 0 : live.front(), 0), true);
    absl::StatusOr<v1::QueryByVectorResponse> s = absl::UnknownError("no record to query with");
    if (q.ok()) {
      v1::QueryByVectorRequest req;
      req.add_queries()->mutable_values()->Add(q->vector().begin(), q->vector().end());
      req.set_top_k(5);
      s = c->QueryByVector(req);
    }
    std::printf("after the refused write: GetRecord %s, QueryByVector %s (top record %s)\n",
                q.status().ToString().c_str(), s.status().ToString().c_str(),
                s.ok() && s->results_size() && s->results(0).helpful_size() ? s->results(0).helpful(0).id().c_str()
                                                                            : "-");
    if (!q.ok() || !s.ok()) return 1;
  }
  return check_rc;
}

// ---------------------------------------------------------------------------------------------------------------
// storm

// start(callback) begins an asynchronous call that reports to callback; meanwhile() runs once it is under way.
// Returns the call's status.
template <typename Start, typename Meanwhile>
grpc::Status Await(Start start, Meanwhile meanwhile) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  grpc::Status st;
  start([&](grpc::Status s) {
    std::lock_guard<std::mutex> l(m);
    st = std::move(s);
    done = true;
    cv.notify_one();
  });
  meanwhile();
  std::unique_lock<std::mutex> l(m);
  cv.wait(l, [&] { return done; });
  return st;
}

// `bytes` sent as the request of `method` (a full path), whatever they are.
grpc::Status RawCall(grpc::GenericStub* stub, grpc::ClientContext* ctx, const std::string& method,
                     const std::string& bytes) {
  grpc::Slice slice(bytes);
  grpc::ByteBuffer req(&slice, 1), resp;
  grpc::StubOptions opts;
  return Await([&](auto cb) { stub->UnaryCall(ctx, method, opts, &req, &resp, std::move(cb)); }, [] {});
}

struct Tally {
  std::map<std::string, std::map<std::string, int64_t>> codes;  // kind -> code -> calls
  int64_t unexpected = 0;
  std::vector<std::string> examples;
};

const char* Code(grpc::StatusCode c) {
  static const char* const kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                       "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i <= 16 ? kNames[i] : "UNKNOWN";
}

int Storm(const std::string& server, const std::string& prefix, int count, double seconds, int threads,
          int max_message_mb, int pid, bool no_ingest) {
  std::vector<std::string> ids;
  std::vector<std::vector<float>> vecs;
  if (!LoadStored(server, prefix, count, &ids, &vecs)) return 2;
  auto stats = Client::Connect(server, 30)->Stats();
  if (!stats.ok()) return 2;
  const int k = static_cast<int>(stats->k());
  const rapidin::bench::ProcState before = rapidin::bench::ReadProc(pid);
  std::mutex mu;
  Tally tally;
  std::vector<std::vector<std::string>> cancelled_batches;  // ids of each batch sent in a cancelled stream
  std::atomic<bool> stop{false};
  auto record = [&](Tally* t, const std::string& kind, grpc::StatusCode code, const std::string& msg,
                    std::initializer_list<grpc::StatusCode> expected) {
    ++t->codes[kind][Code(code)];
    bool ok = false;
    for (auto e : expected) ok = ok || e == code;
    if (!ok) {
      ++t->unexpected;
      if (t->examples.size() < 10) t->examples.push_back(absl::StrCat(kind, ": ", Code(code), " ", msg));
    }
  };
  using C = grpc::StatusCode;
  std::vector<std::thread> ws;
  for (int w = 0; w < threads; ++w) {
    ws.emplace_back([&, w] {
      const bool hostile = w % 2 == 1;
      auto stub = Stub(server, (max_message_mb + 8) << 20);
      grpc::GenericStub generic(grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
      std::mt19937_64 rng(4242 + w);
      Tally local;
      std::vector<std::vector<std::string>> my_cancelled;
      int64_t n = 0;
      auto vector_request = [&](int top_k) {
        v1::QueryByVectorRequest q;
        const auto& src = vecs[rng() % vecs.size()];
        q.add_queries()->mutable_values()->Add(src.begin(), src.end());
        q.set_top_k(top_k);
        q.set_omit_text(true);
        return q;
      };
      while (!stop) {
        ++n;
        if (!hostile) {  // well-behaved: every call must succeed
          grpc::ClientContext ctx;
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
          grpc::Status st;
          if (n % 3 == 0) {
            v1::GetRecordRequest g;
            g.set_id(ids[rng() % ids.size()]);
            v1::GetRecordResponse r;
            st = stub->GetRecord(&ctx, g, &r);
            record(&local, "well-behaved GetRecord", st.error_code(), st.error_message(), {C::OK});
          } else {
            v1::QueryByVectorResponse r;
            st = stub->QueryByVector(&ctx, vector_request(10), &r);
            record(&local, "well-behaved QueryByVector", st.error_code(), st.error_message(), {C::OK});
          }
          continue;
        }
        int kind = static_cast<int>(rng() % 9);
        if (no_ingest && kind == 2) kind = 1;  // keeps the store's size fixed, so memory is the server's own
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
        if (kind == 0) {  // a deadline of 0-5 ms
          grpc::ClientContext short_ctx;
          short_ctx.set_deadline(std::chrono::system_clock::now() +
                                 std::chrono::microseconds(rng() % 5000));
          v1::QueryByVectorResponse r;
          grpc::Status st = stub->QueryByVector(&short_ctx, vector_request(10), &r);
          record(&local, "deadline 0-5 ms", st.error_code(), st.error_message(), {C::OK, C::DEADLINE_EXCEEDED});
        } else if (kind == 1) {  // cancelled after 0-3 ms
          v1::QueryByVectorRequest q = vector_request(10);
          v1::QueryByVectorResponse r;
          grpc::Status st = Await([&](auto cb) { stub->async()->QueryByVector(&ctx, &q, &r, std::move(cb)); },
                                  [&] {
                                    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
                                    ctx.TryCancel();
                                  });
          record(&local, "cancelled query", st.error_code(), st.error_message(), {C::OK, C::CANCELLED});
        } else if (kind == 2) {  // an ingest stream cancelled after 1-3 batches
          v1::IngestResponse r;
          auto writer = stub->Ingest(&ctx, &r);
          const int nb = 1 + static_cast<int>(rng() % 3);
          for (int b = 0; b < nb; ++b) {
            v1::IngestRequest req;
            std::vector<std::string> batch;
            for (int i = 0; i < kBatch; ++i) {
              auto* rec = req.add_records();
              batch.push_back(absl::StrCat("storm-", w, "-", n, "-", b, "-", i));
              rec->mutable_record()->set_id(batch.back());
              const auto& src = vecs[rng() % vecs.size()];
              rec->mutable_vector()->Add(src.begin(), src.end());
            }
            my_cancelled.push_back(batch);
            if (!writer->Write(req)) break;
          }
          ctx.TryCancel();
          grpc::Status st = writer->Finish();
          record(&local, "cancelled ingest stream", st.error_code(), st.error_message(), {C::OK, C::CANCELLED});
        } else if (kind == 3) {  // larger than the server's message limit
          v1::QueryByVectorRequest q;
          auto* v = q.add_queries();
          v->mutable_values()->Resize((max_message_mb << 20) / 4 + 1024, 0.5f);
          q.set_top_k(5);
          v1::QueryByVectorResponse r;
          grpc::Status st = stub->QueryByVector(&ctx, q, &r);
          record(&local, "oversized message", st.error_code(), st.error_message(), {C::RESOURCE_EXHAUSTED});
        } else if (kind == 4) {  // bytes that are not a protobuf: gRPC's callback handlers (1.51) answer
                                 // UNIMPLEMENTED with no message when the request does not parse, before any
                                 // server code runs; bytes that happen to parse fail validation instead
          std::string junk(1 + rng() % 4096, '\0');
          for (char& ch : junk) ch = static_cast<char>(rng());
          grpc::Status st = RawCall(&generic, &ctx, "/rapidin.v1.InfluenceService/QueryByVector", junk);
          record(&local, "random bytes as a request", st.error_code(), st.error_message(),
                 {C::UNIMPLEMENTED, C::INTERNAL, C::INVALID_ARGUMENT, C::FAILED_PRECONDITION});
        } else if (kind == 5) {  // an unknown method
          grpc::Status st = RawCall(&generic, &ctx, "/rapidin.v1.InfluenceService/NoSuchMethod", "x");
          record(&local, "unknown method", st.error_code(), st.error_message(), {C::UNIMPLEMENTED});
        } else {  // well-formed but invalid
          v1::QueryByVectorRequest q = vector_request(10);
          const char* what = "";
          C want = C::INVALID_ARGUMENT;
          switch (kind) {
            case 6:
              what = "wrong dimension";
              q.mutable_queries(0)->mutable_values()->RemoveLast();
              break;
            case 7:
              what = "NaN value";
              q.mutable_queries(0)->set_values(static_cast<int>(rng() % k), std::nanf(""));
              break;
            default:
              if (rng() % 2) {
                what = "top_k 0 or too large";
                q.set_top_k(rng() % 2 ? 0 : 1u << 30);
              } else {
                what = "another projection state";
                q.set_projection_state_id("not-this-store");
                want = C::FAILED_PRECONDITION;
              }
          }
          v1::QueryByVectorResponse r;
          grpc::Status st = stub->QueryByVector(&ctx, q, &r);
          record(&local, absl::StrCat("invalid: ", what), st.error_code(), st.error_message(), {want});
        }
      }
      std::lock_guard<std::mutex> l(mu);
      for (const auto& [kind, codes] : local.codes) {
        for (const auto& [code, c] : codes) tally.codes[kind][code] += c;
      }
      tally.unexpected += local.unexpected;
      for (auto& e : local.examples) tally.examples.push_back(e);
      for (auto& b : my_cancelled) cancelled_batches.push_back(std::move(b));
    });
  }
  const auto t0 = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - t0).count() < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  stop = true;
  for (auto& t : ws) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();

  // Cancelled ingest streams: each batch whole or absent.
  auto c = Client::Connect(server, 30);
  int64_t whole = 0, gone = 0, torn = 0;
  for (const auto& batch : cancelled_batches) {
    int present = 0;
    for (const auto& id : batch) present += c->GetRecord(id, false).ok();
    if (present == 0) {
      ++gone;
    } else if (present == kBatch) {
      ++whole;
    } else {
      ++torn;
    }
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));  // let the server settle before reading its state
  const rapidin::bench::ProcState after = rapidin::bench::ReadProc(pid);
  auto alive = c->Stats();

  int64_t total = 0;
  std::printf("| calls | kind | status codes |\n|---|---|---|\n");
  for (const auto& [kind, codes] : tally.codes) {
    int64_t n = 0;
    std::string s;
    for (const auto& [code, c2] : codes) {
      n += c2;
      absl::StrAppend(&s, s.empty() ? "" : ", ", code, " ", c2);
    }
    total += n;
    std::printf("| %lld | %s | %s |\n", static_cast<long long>(n), kind.c_str(), s.c_str());
  }
  std::printf("\n%.0f s, %d client threads (half hostile): %lld calls (%.0f/s), %lld with an unexpected status\n",
              wall, threads, static_cast<long long>(total), total / wall, static_cast<long long>(tally.unexpected));
  for (const auto& e : tally.examples) std::printf("  unexpected: %s\n", e.c_str());
  std::printf("batches sent in cancelled ingest streams: %lld whole, %lld absent, %lld torn\n",
              static_cast<long long>(whole), static_cast<long long>(gone), static_cast<long long>(torn));
  if (pid > 0) {
    std::printf("server: RSS %.1f -> %.1f MB, fds %d -> %d, threads %d -> %d; Stats after: %s\n", before.rss_mb,
                after.rss_mb, before.fds, after.fds, before.threads, after.threads,
                alive.ok() ? "OK" : alive.status().ToString().c_str());
  }
  if (alive.ok()) {  // batches of cancelled streams that were applied stay in the store: memory the data holds
    const uint64_t added = alive->num_records() - stats->num_records();
    std::printf("store: %llu -> %llu records (+%.1f MB of fp16 vectors in host memory)\n",
                static_cast<unsigned long long>(stats->num_records()),
                static_cast<unsigned long long>(alive->num_records()), added * k * 2.0 / 1e6);
  }
  return (tally.unexpected == 0 && torn == 0 && alive.ok()) ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"faults: traffic for the fault runs of bench/faults/run.sh"};
  app.require_subcommand(1);
  std::string server, prefix, out, log_path;
  int count = 0, threads = 4, k = 64, max_message_mb = 4, pid = 0;
  double seconds = 10;
  uint64_t seed = 1;
  int64_t max_ops = 0;
  double retry_seconds = 0;
  bool until_error = false, verify_only = false, no_ingest = false;
  auto* tl = app.add_subcommand("timeline", "QueryByVector at saturation, one line per call");
  auto* wr = app.add_subcommand("writer", "check the store against the log, then ingest and delete until killed");
  auto* st = app.add_subcommand("storm", "hostile and well-behaved clients together");
  for (auto* s : {tl, wr, st}) s->add_option("--server", server)->required();
  for (auto* s : {tl, st}) {
    s->add_option("--id-prefix", prefix)->required();
    s->add_option("--id-count", count)->required();
    s->add_option("--seconds", seconds);
    s->add_option("--threads", threads);
  }
  tl->add_option("--out", out)->required();
  wr->add_option("--log", log_path)->required();
  wr->add_option("--k", k, "the store's K");
  wr->add_option("--seed", seed);
  wr->add_flag("--until-error", until_error);
  wr->add_flag("--verify-only", verify_only);
  wr->add_option("--retry-seconds", retry_seconds, "retry refused writes (full disk) for this long");
  wr->add_option("--max-ops", max_ops, "stop after this many ingests and deletes (0: until a call fails)");
  st->add_option("--max-message-mb", max_message_mb, "the server's --max-message-mb");
  st->add_flag("--no-ingest", no_ingest, "no cancelled ingest streams (the store keeps its size)");
  st->add_option("--pid", pid, "the server's process id (memory, fds, threads before and after)");
  CLI11_PARSE(app, argc, argv);
  if (tl->parsed()) return Timeline(server, prefix, count, seconds, threads, out);
  if (wr->parsed()) return Writer(server, log_path, k, seed, until_error, verify_only, max_ops, retry_seconds);
  return Storm(server, prefix, count, seconds, threads, max_message_mb, pid, no_ingest);
}
