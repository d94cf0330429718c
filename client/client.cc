#include "client/client.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace rapidin::client {
namespace {

using nlohmann::json;

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::Status ReadFloats(const json& arr, const char* field, google::protobuf::RepeatedField<float>* out) {
  if (!arr.is_array()) return absl::InvalidArgumentError(absl::StrCat("\"", field, "\" must be an array of numbers"));
  out->Reserve(static_cast<int>(arr.size()));
  for (size_t i = 0; i < arr.size(); ++i) {
    if (!arr[i].is_number()) {
      return absl::InvalidArgumentError(absl::StrCat("\"", field, "\"[", i, "] is not a number"));
    }
    out->Add(arr[i].get<float>());
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(const std::string& line) {
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("malformed JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("expected a JSON object");
  return j;
}

// Shortens to at most n display characters without splitting a UTF-8 sequence; newlines become spaces.
std::string Clip(const std::string& s, size_t n) {
  std::string out;
  size_t chars = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = s[i];
    if ((c & 0xC0) != 0x80) {
      if (chars == n) {
        out += "...";
        break;
      }
      ++chars;
    }
    out += (c == '\n' || c == '\t' || c == '\r') ? ' ' : static_cast<char>(c);
  }
  return out;
}

std::string RecordSummary(const rapidin::v1::Record& r) {
  if (r.messages_size() > 0) {  // a chat: "role: content" turns
    std::string s;
    for (const auto& m : r.messages()) absl::StrAppend(&s, s.empty() ? "" : " | ", m.role(), ": ", m.content());
    return s;
  }
  if (!r.text().empty()) return r.text();
  std::string s = r.instruction();
  if (!r.input().empty()) s += " | " + r.input();
  if (!r.output().empty()) s += " -> " + r.output();
  return s;
}

}  // namespace

absl::StatusOr<rapidin::v1::IngestRecord> ParseRecordLine(const std::string& line) {
  auto j = ParseObject(line);
  if (!j.ok()) return j.status();
  rapidin::v1::IngestRecord out;
  auto* rec = out.mutable_record();
  auto str = [&](const char* key, std::string* dst) -> absl::Status {
    auto it = j->find(key);
    if (it == j->end() || it->is_null()) return absl::OkStatus();
    if (!it->is_string()) return absl::InvalidArgumentError(absl::StrCat("\"", key, "\" must be a string"));
    *dst = it->get<std::string>();
    return absl::OkStatus();
  };
  auto id = j->find("id");
  if (id == j->end()) return absl::InvalidArgumentError("missing \"id\"");
  if (id->is_number_integer()) {
    rec->set_id(std::to_string(id->get<int64_t>()));
  } else if (id->is_string()) {
    rec->set_id(id->get<std::string>());
  } else {
    return absl::InvalidArgumentError("\"id\" must be a string or an integer");
  }
  for (auto [k, dst] : {std::pair<const char*, std::string*>{"instruction", rec->mutable_instruction()},
                        {"input", rec->mutable_input()},
                        {"output", rec->mutable_output()},
                        {"text", rec->mutable_text()}}) {
    absl::Status st = str(k, dst);
    if (!st.ok()) return st;
  }
  auto md = j->find("metadata");
  if (md != j->end() && !md->is_null()) {
    if (!md->is_object()) return absl::InvalidArgumentError("\"metadata\" must be an object of strings");
    for (auto it = md->begin(); it != md->end(); ++it) {
      (*rec->mutable_metadata())[it.key()] = it->is_string() ? it->get<std::string>() : it->dump();
    }
  }
  auto vec = j->find("vector");
  if (vec == j->end()) return absl::InvalidArgumentError("missing \"vector\"");
  absl::Status st = ReadFloats(*vec, "vector", out.mutable_vector());
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<rapidin::v1::QueryVector> ParseQueryLine(const std::string& line) {
  auto j = ParseObject(line);
  if (!j.ok()) return j.status();
  rapidin::v1::QueryVector out;
  auto vec = j->find("vector");
  if (vec == j->end()) return absl::InvalidArgumentError("missing \"vector\"");
  absl::Status st = ReadFloats(*vec, "vector", out.mutable_values());
  if (!st.ok()) return st;
  auto w = j->find("weight");
  if (w != j->end()) {
    if (!w->is_number()) return absl::InvalidArgumentError("\"weight\" must be a number");
    out.set_weight(w->get<float>());
  }
  return out;
}

absl::Status ForEachLine(const std::string& path,
                         const std::function<absl::Status(int64_t, const std::string&)>& fn) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string line;
  int64_t no = 0;
  while (std::getline(in, line)) {
    ++no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    absl::Status st = fn(no, line);
    if (!st.ok()) return absl::Status(st.code(), absl::StrCat(path, ":", no, ": ", st.message()));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return absl::OkStatus();
}

size_t InvalidUtf8At(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n;  // continuation bytes
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07;
    } else {
      return i;
    }
    if (s.size() - i <= n) return i;
    for (size_t j = 1; j <= n; ++j) {
      const auto b = static_cast<unsigned char>(s[i + j]);
      if ((b & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (b & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};  // shortest form of each length
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += n + 1;
  }
  return std::string_view::npos;
}

namespace {

absl::Status CheckUtf8In(const google::protobuf::Message& m, const std::string& prefix) {
  using FD = google::protobuf::FieldDescriptor;
  const auto* refl = m.GetReflection();
  std::vector<const FD*> fields;
  refl->ListFields(m, &fields);
  for (const FD* f : fields) {
    if (f->type() != FD::TYPE_STRING && f->cpp_type() != FD::CPPTYPE_MESSAGE) continue;  // e.g. the vectors
    const int n = f->is_repeated() ? refl->FieldSize(m, f) : 1;
    for (int i = 0; i < n; ++i) {
      const std::string name = absl::StrCat(prefix, f->name(), f->is_repeated() ? absl::StrCat("[", i, "]") : "");
      if (f->type() == FD::TYPE_STRING) {
        std::string scratch;
        const std::string& v = f->is_repeated() ? refl->GetRepeatedStringReference(m, f, i, &scratch)
                                                : refl->GetStringReference(m, f, &scratch);
        if (const size_t at = InvalidUtf8At(v); at != std::string_view::npos) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, " is not valid UTF-8 (byte ", at, "); rapidin's API takes UTF-8 text"));
        }
      } else if (f->cpp_type() == FD::CPPTYPE_MESSAGE) {
        const auto& sub = f->is_repeated() ? refl->GetRepeatedMessage(m, f, i) : refl->GetMessage(m, f);
        if (absl::Status st = CheckUtf8In(sub, name + "."); !st.ok()) return st;
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckUtf8(const google::protobuf::Message& m) { return CheckUtf8In(m, ""); }

std::unique_ptr<Client> Client::Connect(const std::string& address, double deadline_s, int max_message_bytes) {
  return std::move(*Connect(address, Credentials(), deadline_s, max_message_bytes));  // plaintext cannot fail
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& address, const Credentials& credentials,
                                                        double deadline_s, int max_message_bytes) {
  auto creds = ChannelCredentials(credentials);
  if (!creds.ok()) return creds.status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  auto channel = grpc::CreateCustomChannel(address, *creds, args);
  std::unique_ptr<Client> c(new Client());
  c->stub_ = rapidin::v1::InfluenceService::NewStub(channel);
  c->deadline_s_ = deadline_s;
  c->credentials_ = credentials;
  return c;
}

void Client::Prepare(grpc::ClientContext* ctx, bool stream) const {
  AddToken(credentials_, ctx);
  if (!stream && deadline_s_ > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::microseconds(static_cast<int64_t>(deadline_s_ * 1e6)));
  }
}

absl::StatusOr<rapidin::v1::IngestResponse> Client::Ingest(
    const std::function<bool(rapidin::v1::IngestRequest*)>& next_batch,
    const std::function<void(uint64_t)>& progress) {
  grpc::ClientContext ctx;
  Prepare(&ctx, /*stream=*/true);
  rapidin::v1::IngestResponse resp;
  auto writer = stub_->Ingest(&ctx, &resp);
  rapidin::v1::IngestRequest batch;
  uint64_t sent = 0;
  absl::Status bad;
  for (int b = 1; next_batch(&batch); ++b) {
    if (bad = CheckUtf8(batch); !bad.ok()) {  // not sent; the batches before it are applied
      bad = absl::InvalidArgumentError(absl::StrCat("batch ", b, " not sent: ", bad.message(), " (", b - 1,
                                                    " earlier batches were applied)"));
      break;
    }
    if (!writer->Write(batch)) break;  // the server ended the stream: Finish says why
    sent += batch.records_size();
    if (progress) progress(sent);
    batch.Clear();
  }
  writer->WritesDone();
  grpc::Status st = writer->Finish();
  if (!st.ok()) return FromGrpc(st);
  if (!bad.ok()) return bad;
  return resp;
}

absl::StatusOr<rapidin::v1::QueryByVectorResponse> Client::QueryByVector(
    const rapidin::v1::QueryByVectorRequest& req) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  if (absl::Status bad = CheckUtf8(req); !bad.ok()) return bad;
  rapidin::v1::QueryByVectorResponse resp;
  absl::Status st = FromGrpc(stub_->QueryByVector(&ctx, req, &resp));
  if (!st.ok()) return st;
  return resp;
}

absl::StatusOr<rapidin::v1::QueryResponse> Client::Query(const rapidin::v1::QueryRequest& req) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  if (absl::Status bad = CheckUtf8(req); !bad.ok()) return bad;
  rapidin::v1::QueryResponse resp;
  absl::Status st = FromGrpc(stub_->Query(&ctx, req, &resp));
  if (!st.ok()) return st;
  return resp;
}

absl::StatusOr<rapidin::v1::StatsResponse> Client::Stats() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  rapidin::v1::StatsResponse resp;
  absl::Status st = FromGrpc(stub_->Stats(&ctx, rapidin::v1::StatsRequest(), &resp));
  if (!st.ok()) return st;
  return resp;
}

absl::StatusOr<rapidin::v1::GetRecordResponse> Client::GetRecord(const std::string& id, bool include_vector) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  rapidin::v1::GetRecordRequest req;
  req.set_id(id);
  req.set_include_vector(include_vector);
  if (absl::Status bad = CheckUtf8(req); !bad.ok()) return bad;
  rapidin::v1::GetRecordResponse resp;
  absl::Status st = FromGrpc(stub_->GetRecord(&ctx, req, &resp));
  if (!st.ok()) return st;
  return resp;
}

absl::StatusOr<rapidin::v1::DeleteRecordsResponse> Client::DeleteRecords(const std::vector<std::string>& ids,
                                                                          bool compact) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  rapidin::v1::DeleteRecordsRequest req;
  for (const auto& id : ids) req.add_ids(id);
  req.set_compact(compact);
  if (absl::Status bad = CheckUtf8(req); !bad.ok()) return bad;
  rapidin::v1::DeleteRecordsResponse resp;
  absl::Status st = FromGrpc(stub_->DeleteRecords(&ctx, req, &resp));
  if (!st.ok()) return st;
  return resp;
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

std::string ResultTable(const rapidin::v1::QueryResult& r, const std::string& title) {
  std::string out;
  auto section = [&](const char* name, const auto& list) {
    if (list.empty()) return;
    absl::StrAppend(&out, title, name, "\n");
    // Through a router, the shard server that holds each record.
    const bool routed = std::any_of(list.begin(), list.end(), [](const auto& s) { return !s.source().empty(); });
    absl::StrAppendFormat(&out, "  %4s  %12s  %-20s  %s%s\n", "rank", "score", "id", routed ? "shard server          " : "",
                          "record");
    for (const auto& s : list) {
      absl::StrAppendFormat(&out, "  %4d  %12.6g  %-20s  %s%s\n", s.rank(), s.score(), Clip(s.id(), 20),
                            routed ? absl::StrFormat("%-20s  ", Clip(s.source(), 20)) : std::string(),
                            Clip(RecordSummary(s.record()), 70));
    }
  };
  section(" helpful (largest influence)", r.helpful());
  section(" harmful (most negative influence)", r.harmful());
  return out;
}

std::string QueryTable(const rapidin::v1::QueryByVectorResponse& r) {
  std::string out;
  for (int i = 0; i < r.results_size(); ++i) {
    absl::StrAppend(&out, ResultTable(r.results(i), r.results_size() > 1 ? absl::StrCat("query ", i + 1, ":")
                                                                        : std::string("query:")));
  }
  double max_ms = 0;
  uint64_t bytes = 0;
  for (const auto& t : r.shard_timings()) {
    max_ms = std::max(max_ms, t.scan_ms());
    bytes += t.bytes_scanned();
  }
  absl::StrAppendFormat(&out, "%d shards (%s), %.1f MB scanned, slowest shard %.2f ms, total %.2f ms, %d vectors in scan\n",
                        r.shard_timings_size(),
                        r.shard_timings_size() ? r.shard_timings(0).backend() : std::string("-"), bytes / 1e6,
                        max_ms, r.total_ms(), r.vectors_in_scan());
  return out;
}

std::string TextQueryTable(const rapidin::v1::QueryResponse& r) {
  std::string out = ResultTable(r.result(), "query:");
  double max_ms = 0;
  for (const auto& t : r.shard_timings()) max_ms = std::max(max_ms, t.scan_ms());
  absl::StrAppendFormat(&out,
                        "generation: %d tokens%s, loss %.3f nats/token; gradient %.1f ms, scan %.2f ms (%d shards), "
                        "total %.1f ms\n",
                        r.generation_tokens(), r.truncated() ? " (truncated)" : "", r.generation_loss(),
                        r.gradient_ms(), max_ms, r.shard_timings_size(), r.total_ms());
  return out;
}

namespace {

// One token rendered by influence: a background shade (terminal) or a marker (plain text).
std::string Shade(const std::string& text, double score, double max_abs, bool color) {
  std::string t;
  for (char c : text) t += c == '\n' ? std::string("\\n") : std::string(1, c);
  const double r = max_abs > 0 ? score / max_abs : 0;
  if (color) {
    static const int kPos[] = {0, 22, 28, 34, 40, 46}, kNeg[] = {0, 52, 88, 124, 160, 196};
    const int level = std::min(5, static_cast<int>(std::fabs(r) * 5.999));
    if (level == 0) return t;
    return absl::StrCat("\x1b[48;5;", r > 0 ? kPos[level] : kNeg[level], "m", t, "\x1b[0m");
  }
  if (r >= 0.5) return absl::StrCat("[+", t, "]");
  if (r <= -0.5) return absl::StrCat("[-", t, "]");
  return t;
}

std::string TokenLine(const google::protobuf::RepeatedPtrField<rapidin::v1::TokenScore>& toks, bool color) {
  double max_abs = 0;
  for (const auto& t : toks) max_abs = std::max(max_abs, std::fabs(static_cast<double>(t.score())));
  std::string out;
  for (const auto& t : toks) out += Shade(t.text(), t.score(), max_abs, color);
  return out;
}

}  // namespace

std::string AttributionText(const rapidin::v1::QueryResponse& r, bool color) {
  std::string out = color ? "legend: \x1b[48;5;40m helps \x1b[0m \x1b[48;5;160m hurts \x1b[0m (shade ~ |score| / "
                            "largest |score| in the line)\n"
                          : "legend: [+token] helps, [-token] hurts (|score| >= half the largest in the line)\n";
  auto section = [&](const char* name, const auto& list) {
    for (const auto& s : list) {
      absl::StrAppendFormat(&out, "\n%s #%d  %s  score %.6g\n", name, s.rank(), s.id(), s.score());
      absl::StrAppend(&out, "  generation: ", TokenLine(s.generation_tokens(), color), "\n");
      absl::StrAppend(&out, "  influence:  ", TokenLine(s.record_influence_tokens(), color), "\n");
      absl::StrAppend(&out, "  token-loss: ", TokenLine(s.record_tokens(), color), "\n");
    }
  };
  section("helpful", r.result().helpful());
  section("harmful", r.result().harmful());
  absl::StrAppendFormat(&out, "\nattributions took %.0f ms\n", r.attribution_ms());
  return out;
}

namespace {

std::string HtmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\n': out += "&#9166;<br>"; break;
      default: out += c;
    }
  }
  return out;
}

std::string HtmlTokens(const google::protobuf::RepeatedPtrField<rapidin::v1::TokenScore>& toks) {
  double max_abs = 0;
  for (const auto& t : toks) max_abs = std::max(max_abs, std::fabs(static_cast<double>(t.score())));
  std::string out;
  for (const auto& t : toks) {
    const double r = max_abs > 0 ? t.score() / max_abs : 0;
    const std::string rgb = r >= 0 ? "22,163,74" : "220,38,38";
    absl::StrAppendFormat(&out, "<span class=\"t\" style=\"background:rgba(%s,%.3f)\" title=\"%s [%d,%d) score %.6g\">%s</span>",
                          rgb, std::fabs(r) * 0.85, HtmlEscape(t.field()), t.begin(), t.end(), t.score(),
                          HtmlEscape(t.text()));
  }
  return out;
}

}  // namespace

std::string AttributionHtml(const rapidin::v1::QueryRequest& q, const rapidin::v1::QueryResponse& r) {
  std::string out =
      "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>rapidin influence report</title><style>"
      "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#111}"
      ".t{border-radius:3px;padding:0 1px;white-space:pre-wrap}.box{border:1px solid #ddd;border-radius:6px;"
      "padding:.8em;margin:.6em 0;font-family:ui-monospace,monospace;font-size:.9em;line-height:1.7}"
      "h2{margin-top:1.6em}.meta{color:#555;font-size:.9em}.legend span{padding:0 .4em;border-radius:3px}"
      "</style></head><body><h1>Which training records explain this generation?</h1>";
  absl::StrAppend(&out, "<p class=\"meta\">Instruction: <b>", HtmlEscape(q.instruction()), "</b>");
  if (!q.input().empty()) absl::StrAppend(&out, "<br>Input: <b>", HtmlEscape(q.input()), "</b>");
  absl::StrAppendFormat(&out, "<br>Generation: %d tokens, loss %.3f nats/token. Gradient and scan %.1f ms, attributions %.0f ms.</p>",
                        r.generation_tokens(), r.generation_loss(), r.total_ms() - r.attribution_ms(),
                        r.attribution_ms());
  absl::StrAppend(&out, "<p class=\"legend\">Token shading: <span style=\"background:rgba(22,163,74,.85)\">",
                  "helps</span> <span style=\"background:rgba(220,38,38,.85)\">hurts</span>, relative to the largest ",
                  "|score| in the same box. Hover a token for its field, byte offsets and score.</p>");
  auto section = [&](const char* title, const auto& list) {
    if (list.empty()) return;
    absl::StrAppend(&out, "<h2>", title, "</h2>");
    for (const auto& s : list) {
      absl::StrAppendFormat(&out, "<h3>#%d %s <span class=\"meta\">score %.6g</span></h3>", s.rank(),
                            HtmlEscape(s.id()), s.score());
      absl::StrAppend(&out, "<div class=\"meta\">generation, per generated token</div><div class=\"box\">",
                      HtmlTokens(s.generation_tokens()), "</div>");
      absl::StrAppend(&out, "<div class=\"meta\">training record: each token's effect on the score ",
                      "(gradient x input)</div><div class=\"box\">", HtmlTokens(s.record_influence_tokens()),
                      "</div>");
      absl::StrAppend(&out, "<div class=\"meta\">training record: each token's own loss gradient vs the ",
                      "generation (token-loss view)</div><div class=\"box\">", HtmlTokens(s.record_tokens()),
                      "</div>");
    }
  };
  section("Most helpful records", r.result().helpful());
  section("Most harmful records", r.result().harmful());
  out += "</body></html>\n";
  return out;
}

std::string StatsTable(const rapidin::v1::StatsResponse& s) {
  std::string out;
  absl::StrAppendFormat(&out, "%-20s %s\n", "store", s.store_path());
  if (s.shard_servers_size() > 0) {
    absl::StrAppendFormat(&out, "%-20s %s\n", "shard servers", absl::StrJoin(s.shard_servers(), ", "));
  }
  absl::StrAppendFormat(&out, "%-20s %d\n", "records", s.num_records());
  absl::StrAppendFormat(&out, "%-20s %d\n", "K", s.k());
  absl::StrAppendFormat(&out, "%-20s %s\n", "dtype", rapidin::v1::VectorDType_Name(s.dtype()));
  absl::StrAppendFormat(&out, "%-20s %s\n", "projection state", s.projection_state_id());
  absl::StrAppendFormat(&out, "%-20s %d (format)\n", "version", s.format_version());
  absl::StrAppendFormat(&out, "%-20s %d shards, %d workers, %s\n", "scan", s.num_shards(), s.num_workers(),
                        s.backend());
  absl::StrAppendFormat(&out, "%-20s %s\n", "model",
                        s.model_loaded() ? absl::StrCat("loaded, gradients on ", s.model_device())
                                         : std::string("none (QueryByVector only)"));
  for (const auto& t : s.tiers()) {
    absl::StrAppendFormat(&out, "%-20s %d records, %.2f MB\n", "tier " + t.tier(), t.records(), t.bytes() / 1e6);
  }
  return out;
}

std::string RecordTable(const rapidin::v1::GetRecordResponse& r) {
  std::string out;
  const auto& rec = r.record();
  absl::StrAppendFormat(&out, "%-12s %s\n%-12s %d\n", "id", rec.id(), "row", r.index());
  if (!r.source().empty()) absl::StrAppendFormat(&out, "%-12s %s\n", "shard server", r.source());
  if (!rec.instruction().empty()) absl::StrAppendFormat(&out, "%-12s %s\n", "instruction", rec.instruction());
  if (!rec.input().empty()) absl::StrAppendFormat(&out, "%-12s %s\n", "input", rec.input());
  if (!rec.output().empty()) absl::StrAppendFormat(&out, "%-12s %s\n", "output", rec.output());
  if (!rec.text().empty()) absl::StrAppendFormat(&out, "%-12s %s\n", "text", rec.text());
  for (int i = 0; i < rec.messages_size(); ++i) {
    absl::StrAppendFormat(&out, "%-12s %s: %s\n", absl::StrCat("messages[", i, "]"), rec.messages(i).role(),
                          rec.messages(i).content());
  }
  for (const auto& [k, v] : rec.metadata()) absl::StrAppendFormat(&out, "%-12s %s=%s\n", "metadata", k, v);
  if (r.vector_size() > 0) {
    double n2 = 0;
    for (float v : r.vector()) n2 += static_cast<double>(v) * v;
    absl::StrAppendFormat(&out, "%-12s %d values, L2 norm %.6g\n", "vector", r.vector_size(), std::sqrt(n2));
  }
  return out;
}

}  // namespace rapidin::client
