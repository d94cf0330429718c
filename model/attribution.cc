#include "model/attribution.h"

#include <algorithm>
#include <thread>

#include "base/mutex.h"
#include "base/thread_pool.h"

#include "model/engine.h"
#include "model/prompt.h"

namespace rapidin::model {

std::string ValidUtf8(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xc0) == 0x80;
    if (ok && len == 2) ok = c >= 0xc2;                                        // overlong
    if (ok && len == 3) ok = !(c == 0xe0 && p[i + 1] < 0xa0) && !(c == 0xed && p[i + 1] >= 0xa0);  // overlong, surrogates
    if (ok && len == 4) ok = !(c == 0xf0 && p[i + 1] < 0x90) && !(c == 0xf4 && p[i + 1] >= 0x90) && c <= 0xf4;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++i;
    }
  }
  return out;
}

namespace {

// A token's sketch (k values) against the final checkpoint's part of a record or query vector.
double Dot(const std::vector<float>& a, const std::vector<float>& b, int64_t offset) {
  double s = 0;
  for (size_t i = 0; i < a.size() && offset + i < b.size(); ++i) s += static_cast<double>(a[i]) * b[offset + i];
  return s;
}

// The influence views' threads. They live as long as the process, so each keeps its buffers (the forward and
// tangent activations, tens of MB for a long record) from record to record: a thread per record faulted them in
// again every time (most of a demo query's ~100k page faults). Queries wait for their own view only.
ThreadPool& InfluencePool() {
  static ThreadPool* const pool =
      new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())), 1 << 30);
  return *pool;
}

}  // namespace

Example ExampleFromRecord(const v1::Record& r) {
  Example ex;
  if (r.messages_size() > 0) {
    ex.format = RecordFormat::kChat;
    for (const auto& m : r.messages()) ex.messages.push_back({m.role(), m.content()});
  } else if (!r.text().empty() && r.instruction().empty()) {
    ex.format = RecordFormat::kText;
    ex.text = r.text();
  } else {
    ex.instruction = r.instruction();
    ex.input = r.input();
    ex.output = r.output();
  }
  return ex;
}

absl::Status Attribute(const Featurizer& featurizer, const Example& gen, const std::vector<float>& q,
                       const RecordFetcher& fetch, v1::QueryResult* result) {
  const GradientEngine& eng = featurizer.engine();
  auto gt = eng.Tokenize(gen);
  if (!gt.ok()) return gt.status();
  std::vector<std::vector<float>> g_tok;
  absl::Status st = featurizer.TokenSketches(gt->ids, gt->response_begin, &g_tok);
  if (!st.ok()) return st;
  auto attribute = [&](v1::ScoredRecord* sr) -> absl::Status {
    v1::Record rec;
    std::vector<float> x;
    absl::Status fs = fetch(*sr, &rec, &x);
    if (!fs.ok()) return fs;
    for (size_t t = 0; t < g_tok.size(); ++t) {
      // Tokens outside the generation's loss (a chat's template text between turns) are not shown.
      if (!gt->loss_weights.empty() && gt->loss_weights[t] == 0 && gen.format == RecordFormat::kChat) continue;
      const TokenPlace& pl = gt->places[gt->response_begin + t];
      auto* ts = sr->add_generation_tokens();
      ts->set_text(ValidUtf8(eng.tokenizer()->Piece(gt->ids[gt->response_begin + t])));
      ts->set_field(gen.format == RecordFormat::kAlpaca ? "generation" : pl.field);
      ts->set_begin(pl.span.begin);
      ts->set_end(pl.span.end);
      ts->set_score(static_cast<float>(Dot(g_tok[t], x, featurizer.final_offset())));
    }
    const Example z = ExampleFromRecord(rec);
    auto zt = eng.Tokenize(z);
    if (!zt.ok()) return zt.status();
    // The two record views at once: the influence view is one pass on one of InfluencePool's threads, the token
    // view spreads its chunks over the others, so the cores do not wait for the single-threaded part.
    std::vector<double> infl;
    absl::StatusOr<double> total = absl::UnknownError("not run");
    BlockingCounter influence(1);
    InfluencePool().Schedule([&] {
      total = featurizer.RecordTokenInfluence(*zt, q, &infl);
      influence.DecrementCount();
    });
    // The token-loss view covers the tokens the record's loss is on: a prompt token's own loss was never trained
    // on, so its score would answer a question nobody asked (and a prompt's tokens are a third of the work).
    const int T = static_cast<int>(zt->ids.size());
    const int from = std::max(1, zt->response_begin);
    auto trained = [&](int s) {
      return s >= from && (zt->loss_weights.empty() || zt->loss_weights[s - zt->response_begin] != 0);
    };
    std::vector<double> z_tok;  // <C(N(grad l_s)), q> for s >= from
    absl::Status s2 = from < T ? featurizer.TokenScores(zt->ids, from, q, &z_tok) : absl::OkStatus();
    influence.Wait();
    if (!s2.ok()) return s2;
    if (!total.ok()) return total.status();
    auto place = [&](int s, v1::TokenScore* ts) {
      ts->set_text(ValidUtf8(eng.tokenizer()->Piece(zt->ids[s])));
      const TokenPlace& pl = zt->places[s];
      ts->set_field(pl.field);
      ts->set_begin(pl.span.begin);
      ts->set_end(pl.span.end);
    };
    // The first token has no loss of its own (nothing predicts it); without a BOS it is text and still has an
    // influence through the tokens after it.
    const bool bos_first = eng.tokenizer()->bos() >= 0 && !zt->ids.empty() && zt->ids[0] == eng.tokenizer()->bos();
    for (int s = bos_first ? 1 : 0; s < T; ++s) {
      if (trained(s)) {
        auto* ts = sr->add_record_tokens();
        place(s, ts);
        ts->set_score(static_cast<float>(z_tok[s - from]));
      }
      auto* ti = sr->add_record_influence_tokens();
      place(s, ti);
      ti->set_score(static_cast<float>(infl[s]));
    }
    return absl::OkStatus();
  };
  for (auto& sr : *result->mutable_helpful()) {
    st = attribute(&sr);
    if (!st.ok()) return st;
  }
  for (auto& sr : *result->mutable_harmful()) {
    st = attribute(&sr);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}


}  // namespace rapidin::model
