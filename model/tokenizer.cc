#include "model/tokenizer.h"

#include <cstdio>
#include <fstream>

#include <limits>
#include <optional>
#include <queue>
#include <unordered_map>

#include "sentencepiece/model_min.pb.h"

#include "absl/strings/str_cat.h"
#include "model/internal/sp_normalizer.h"

namespace rapidin::model {

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& path, int32_t vocab_size);

namespace {

// Greedy BPE merges over n symbols in a row, as SentencePiece and llama2.c's run.c do them: the adjacent pair with
// the highest score merges, the leftmost among equal scores, until no pair merges. score(l, r) gives the pair's
// score, or nullopt when it never merges; merge(l, r) makes symbol l absorb its right neighbour r. Returns the
// surviving symbols' indices in order. Rescanning every pair after each merge is quadratic in the text's length;
// here candidate pairs wait in a heap ordered by score, then by the left symbol's first index (a symbol keeps it
// when it absorbs its neighbour, so it orders symbols as the text does), and a popped pair whose symbols changed
// since (a version per symbol) or no longer stand side by side is skipped: its successor is in the heap too.
template <class ScoreFn, class MergeFn>
std::vector<int> GreedyMerges(int n, const ScoreFn& score, const MergeFn& merge) {
  struct Cand {
    float score;
    int left, right;
    uint32_t left_ver, right_ver;
  };
  auto worse = [](const Cand& x, const Cand& y) { return x.score < y.score || (x.score == y.score && x.left > y.left); };
  std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1;
  std::vector<uint32_t> ver(n, 0);
  std::vector<char> alive(n, 1);
  auto consider = [&](int l) {  // the pair starting at symbol l, if it merges
    const int r = next[l];
    if (r >= n) return;
    if (const std::optional<float> sc = score(l, r)) heap.push({*sc, l, r, ver[l], ver[r]});
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    const int l = c.left, r = c.right;
    if (!alive[l] || next[l] != r || ver[l] != c.left_ver || ver[r] != c.right_ver) continue;  // stale
    merge(l, r);
    ++ver[l];
    alive[r] = 0;
    next[l] = next[r];
    if (next[r] < n) prev[next[r]] = l;
    if (prev[l] >= 0) consider(prev[l]);
    consider(l);
  }
  std::vector<int> kept;
  for (int i = 0; i < n; i = next[i]) kept.push_back(i);
  return kept;
}

class Llama2cTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size);
  Encoding Encode(const std::string& text, bool dummy_prefix) const override;
  std::string Piece(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }

 private:
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (uint64_t{static_cast<uint32_t>(a)} << 32) | static_cast<uint32_t>(b);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> lookup_;
  // (left id, right id) -> the id lookup_ gives their concatenated pieces, for every pair whose concatenation is
  // a piece: the merge loop then hashes two integers instead of building and hashing a string per pair.
  std::unordered_map<uint64_t, int32_t> pairs_;
};


// SentencePiece BPE models (tokenizer.model), read with rapidin's copy of the model schema and encoded the
// way libsentencepiece does: its normaliser (internal/sp_normalizer.h: the model's own character map, then the
// whitespace rules), greedy highest-score merges (leftmost first on ties), and byte fallback for characters left
// unknown (the character's span goes to its last byte piece, earlier ones get empty spans, as libsentencepiece
// reports them).
class SentencePieceBpe : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
    rapidin::sentencepiece::ModelProto m;
    if (!m.ParseFromIstream(&in)) return absl::DataLossError(absl::StrCat(path, ": not a SentencePiece model"));
    if (m.trainer_spec().model_type() != rapidin::sentencepiece::TrainerSpec::BPE) {
      return absl::UnimplementedError(absl::StrCat(path, ": only SentencePiece BPE models are supported"));
    }
    if (m.pieces_size() != vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(path, " has ", m.pieces_size(),
                                                     " pieces; the model's vocabulary is ", vocab_size));
    }
    if (m.trainer_spec().treat_whitespace_as_suffix()) {
      return absl::UnimplementedError(absl::StrCat(path, ": treat_whitespace_as_suffix is not supported"));
    }
    std::unique_ptr<SentencePieceBpe> t(new SentencePieceBpe());
    t->m_ = m;
    // The rule's name is informational: the map in the model is what libsentencepiece applies (none: identity).
    const auto& ns = m.normalizer_spec();
    auto norm = internal::SpNormalizer::Create(
        {ns.precompiled_charsmap(), ns.add_dummy_prefix(), ns.remove_extra_whitespaces(), ns.escape_whitespaces()});
    if (!norm.ok()) return absl::DataLossError(absl::StrCat(path, ": ", norm.status().message()));
    t->norm_ = std::move(*norm);
    for (int i = 0; i < m.pieces_size(); ++i) {
      const auto& p = m.pieces(i);
      using P = rapidin::sentencepiece::ModelProto::SentencePiece;
      if (p.type() == P::NORMAL || p.type() == P::USER_DEFINED) t->lookup_.emplace(p.piece(), i);
      if (p.type() == P::BYTE) {
        unsigned int b = 0;
        if (std::sscanf(p.piece().c_str(), "<0x%02X>", &b) == 1 && b < 256) t->byte_id_[b] = i;
      }
    }
    return std::unique_ptr<Tokenizer>(std::move(t));
  }

  Encoding Encode(const std::string& raw, bool) const override {
    std::string text;
    std::vector<int32_t> to_raw;
    norm_.Normalize(raw, &text, &to_raw);
    Encoding e = EncodeNormalized(text);
    for (Span& sp : e.spans) sp = {to_raw[sp.begin], to_raw[sp.end]};
    return e;
  }

  // text: normalised (spaces already U+2581); spans in text's bytes.
  Encoding EncodeNormalized(const std::string& text) const {
    // 1. Characters.
    struct Sym {
      std::string s;
      int32_t begin, end;
      bool unknown;
    };
    std::vector<Sym> syms;
    const size_t n = text.size();
    for (size_t i = 0; i < n;) {
      size_t len = 1;
      const unsigned char c = text[i];
      if (c >= 0xF0) len = 4;
      else if (c >= 0xE0) len = 3;
      else if (c >= 0xC0) len = 2;
      if (i + len > n) len = 1;
      std::string ch = text.substr(i, len);
      const bool unknown = lookup_.find(ch) == lookup_.end();
      syms.push_back({ch, static_cast<int32_t>(i), static_cast<int32_t>(i + len), unknown});
      i += len;
    }
    // 2. Greedy merges of known symbols.
    std::vector<Sym> merged;
    const std::vector<int> kept = GreedyMerges(
        static_cast<int>(syms.size()),
        [&](int l, int r) -> std::optional<float> {
          if (syms[l].unknown || syms[r].unknown) return std::nullopt;
          const auto it = lookup_.find(syms[l].s + syms[r].s);
          if (it == lookup_.end()) return std::nullopt;
          const float sc = m_.pieces(it->second).score();
          if (!(sc > -std::numeric_limits<float>::infinity())) return std::nullopt;  // never beats the scan's -inf
          return sc;
        },
        [&](int l, int r) {
          syms[l].s += syms[r].s;
          syms[l].end = syms[r].end;
        });
    for (int j : kept) merged.push_back(std::move(syms[j]));
    syms = std::move(merged);
    // 3. Ids, with byte fallback for unknown characters.
    Encoding e;
    for (const auto& sym : syms) {
      if (!sym.unknown) {
        e.ids.push_back(lookup_.at(sym.s));
        e.spans.push_back({sym.begin, sym.end});
        continue;
      }
      if (m_.trainer_spec().byte_fallback()) {
        for (size_t b = 0; b < sym.s.size(); ++b) {
          e.ids.push_back(byte_id_[static_cast<unsigned char>(sym.s[b])]);
          const bool last = b + 1 == sym.s.size();
          e.spans.push_back({sym.begin, last ? sym.end : sym.begin});
        }
      } else {
        e.ids.push_back(m_.trainer_spec().unk_id());
        e.spans.push_back({sym.begin, sym.end});
      }
    }
    return e;
  }

  std::string Piece(int32_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const auto& p = m_.pieces(id);
    unsigned int byte = 0;
    if (p.type() == rapidin::sentencepiece::ModelProto::SentencePiece::BYTE &&
        std::sscanf(p.piece().c_str(), "<0x%02X>", &byte) == 1) {
      return std::string(1, static_cast<char>(byte));
    }
    std::string out;
    for (size_t i = 0; i < p.piece().size();) {
      if (p.piece().compare(i, 3, "\xe2\x96\x81") == 0) {
        out += ' ';
        i += 3;
      } else {
        out += p.piece()[i++];
      }
    }
    return out;
  }
  int32_t vocab_size() const override { return m_.pieces_size(); }
  int32_t bos() const override { return m_.trainer_spec().bos_id(); }
  int32_t eos() const override { return m_.trainer_spec().eos_id(); }

 private:
  rapidin::sentencepiece::ModelProto m_;
  std::unordered_map<std::string, int32_t> lookup_;
  int32_t byte_id_[256] = {0};
  internal::SpNormalizer norm_;  // identity until Load sets the model's
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path, int32_t vocab_size) {
  if (vocab_size <= 0) return absl::InvalidArgumentError("tokenizer: vocab_size must be positive");
  if (!std::ifstream(path).good()) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  if (path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0) {
    // Read with rapidin's own copy of the schema: libsentencepiece embeds protobuf-lite, whose symbols collide
    // with libprotobuf's in one process (a crash during static initialisation with Debian's packages).
    return SentencePieceBpe::Load(path, vocab_size);
  }
  if (path.size() > 5 && path.compare(path.size() - 5, 5, ".json") == 0) return LoadHfTokenizer(path, vocab_size);
  return Llama2cTokenizer::Load(path, vocab_size);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Llama2cTokenizer::Load(const std::string& path, int32_t vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  std::unique_ptr<Llama2cTokenizer> t(new Llama2cTokenizer());
  int32_t max_len = 0;
  if (!in.read(reinterpret_cast<char*>(&max_len), 4) || max_len <= 0 || max_len > 4096) {
    return absl::DataLossError(absl::StrCat(path, ": not a llama2.c tokenizer (bad header)"));
  }
  t->pieces_.resize(vocab_size);
  t->scores_.resize(vocab_size);
  for (int32_t i = 0; i < vocab_size; ++i) {
    int32_t len = 0;
    if (!in.read(reinterpret_cast<char*>(&t->scores_[i]), 4) || !in.read(reinterpret_cast<char*>(&len), 4) ||
        len < 0 || len > max_len) {
      return absl::DataLossError(absl::StrCat(path, ": truncated or corrupt at token ", i, " of ", vocab_size));
    }
    t->pieces_[i].resize(len);
    if (len > 0 && !in.read(t->pieces_[i].data(), len)) {
      return absl::DataLossError(absl::StrCat(path, ": truncated at token ", i));
    }
    t->lookup_.emplace(t->pieces_[i], i);  // first occurrence wins
  }
  in.peek();
  if (!in.eof()) return absl::DataLossError(absl::StrCat(path, ": has more tokens than vocab_size ", vocab_size));
  // pieces_[a] + pieces_[b] == s splits s after pieces_[a].size() bytes: enumerate every split of every piece.
  std::unordered_map<std::string, std::vector<int32_t>> ids_of;  // duplicated pieces have several ids
  for (int32_t i = 0; i < vocab_size; ++i) ids_of[t->pieces_[i]].push_back(i);
  for (const auto& [s, merged] : t->lookup_) {
    for (size_t k = 0; k <= s.size(); ++k) {
      const auto left = ids_of.find(s.substr(0, k));
      if (left == ids_of.end()) continue;
      const auto right = ids_of.find(s.substr(k));
      if (right == ids_of.end()) continue;
      for (int32_t a : left->second) {
        for (int32_t b : right->second) t->pairs_[PairKey(a, b)] = merged;
      }
    }
  }
  return std::unique_ptr<Tokenizer>(std::move(t));
}

Encoding Llama2cTokenizer::Encode(const std::string& text, bool dummy_prefix) const {
  Encoding e;
  if (dummy_prefix && !text.empty()) {
    auto it = lookup_.find(" ");
    if (it != lookup_.end()) {
      e.ids.push_back(it->second);
      e.spans.push_back({0, 0});
    }
  }
  // Code points first, byte fallback for those not in the vocabulary.
  for (size_t i = 0; i < text.size();) {
    size_t n = 1;
    const unsigned char c = text[i];
    if (c >= 0xF0) n = 4;
    else if (c >= 0xE0) n = 3;
    else if (c >= 0xC0) n = 2;
    if (i + n > text.size()) n = 1;
    for (size_t j = 1; j < n; ++j) {
      if ((static_cast<unsigned char>(text[i + j]) & 0xC0) != 0x80) n = 1;
    }
    auto it = lookup_.find(text.substr(i, n));
    if (it != lookup_.end()) {
      e.ids.push_back(it->second);
      e.spans.push_back({static_cast<int32_t>(i), static_cast<int32_t>(i + n)});
    } else {
      for (size_t j = 0; j < n; ++j) {
        e.ids.push_back(static_cast<unsigned char>(text[i + j]) + 3);
        e.spans.push_back({static_cast<int32_t>(i + j), static_cast<int32_t>(i + j + 1)});
      }
    }
    i += n;
  }
  // Merge the best-scoring adjacent pair until none merges (llama2.c's run.c, including its tie rule: the
  // leftmost pair among equal scores; a pair scoring <= -1e10 never merges).
  const std::vector<int> kept = GreedyMerges(
      static_cast<int>(e.ids.size()),
      [&](int l, int r) -> std::optional<float> {
        const auto it = pairs_.find(PairKey(e.ids[l], e.ids[r]));
        if (it == pairs_.end() || !(scores_[it->second] > -1e10f)) return std::nullopt;
        return scores_[it->second];
      },
      [&](int l, int r) {
        e.ids[l] = pairs_.at(PairKey(e.ids[l], e.ids[r]));
        e.spans[l].end = e.spans[r].end;
        if (e.spans[l].begin == e.spans[l].end && e.spans[r].begin < e.spans[l].begin) e.spans[l].begin = e.spans[r].begin;
      });
  Encoding out;
  for (int i : kept) {
    out.ids.push_back(e.ids[i]);
    out.spans.push_back(e.spans[i]);
  }
  return out;
}

std::string Llama2cTokenizer::Piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& p = pieces_[id];
  unsigned int byte = 0;
  if (p.size() == 6 && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) return std::string(1, static_cast<char>(byte));
  return p;
}

}  // namespace rapidin::model
