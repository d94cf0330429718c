// Hugging Face tokenizer.json: byte-level BPE (GPT-2, Llama 3, Qwen2, newer Mistral releases), encoded as the
// `tokenizers` library does:
//   1. added tokens (special tokens among them) are matched in the raw text first, leftmost then longest;
//   2. the text between them is normalised (none, NFC or NFKC), split by the pre-tokenizer's regexes (PCRE2 with
//      Unicode properties, "Isolated": matches and the gaps between them are pieces), and each piece's bytes
//      mapped to GPT-2's printable byte characters;
//   3. BPE merges by rank (lowest first, leftmost on ties) within each piece; with ignore_merges a piece that is
//      itself in the vocabulary is one token.
// Spans are byte offsets into the caller's text (a normalised run maps to its source run). ByteLevel's
// trim_offsets drops leading and trailing spaces from a span, as `tokenizers` does. What a file asks for that
// is not listed here (another model type, normalizer or pre-tokenizer, flags on added tokens) is refused by name.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/internal/unicode.h"
#include "model/tokenizer.h"

namespace rapidin::model {
namespace {

using internal::NormalForm;

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others for code points 256 + n.
std::array<std::string, 256> ByteChars() {
  std::array<std::string, 256> out;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    const int cp = printable ? b : 256 + n++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out[b] = s;
  }
  return out;
}

constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Regex {
  pcre2_code* code = nullptr;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

class HfBpeTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path, int32_t vocab_size);

  Encoding Encode(const std::string& text, bool) const override {
    Encoding e;
    size_t pos = 0;
    while (pos < text.size()) {
      // The leftmost added token, the longest at that position.
      size_t best = std::string::npos, best_len = 0;
      int32_t best_id = -1;
      for (const auto& [content, id] : added_) {
        const size_t at = text.find(content, pos);
        if (at == std::string::npos) continue;
        if (at < best || (at == best && content.size() > best_len)) {
          best = at;
          best_len = content.size();
          best_id = id;
        }
      }
      const size_t stop = best == std::string::npos ? text.size() : best;
      EncodeSegment(text, pos, stop, &e);
      if (best == std::string::npos) break;
      e.ids.push_back(best_id);
      e.spans.push_back({static_cast<int32_t>(best), static_cast<int32_t>(best + best_len)});
      pos = best + best_len;
    }
    return e;
  }

  std::string Piece(int32_t id) const override {
    if (id < 0 || id >= static_cast<int32_t>(pieces_.size())) return "";
    if (special_.count(id)) return pieces_[id];
    std::string out;  // byte characters back to bytes
    const std::string& p = pieces_[id];
    for (size_t i = 0; i < p.size();) {
      const size_t len = (static_cast<unsigned char>(p[i]) & 0x80) == 0 ? 1 : 2;
      auto it = char_byte_.find(p.substr(i, len));
      if (it == char_byte_.end()) return p;  // not a byte-level token
      out.push_back(static_cast<char>(it->second));
      i += len;
    }
    return out;
  }
  int32_t vocab_size() const override { return static_cast<int32_t>(pieces_.size()); }
  int32_t bos() const override { return bos_; }
  int32_t eos() const override { return eos_; }
  int32_t TokenId(const std::string& piece) const override {
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) return it->second;
    for (const auto& [content, id] : added_) {
      if (content == piece) return id;
    }
    return -1;
  }

 private:
  // Byte range [b, e) of text, without added tokens.
  void EncodeSegment(const std::string& text, size_t b, size_t e, Encoding* out) const {
    if (b >= e) return;
    const internal::Normalized norm =
        internal::Normalize(std::string_view(text).substr(b, e - b), form_, static_cast<int32_t>(b));
    std::vector<std::pair<size_t, size_t>> pieces = {{0, norm.text.size()}};
    // Invalid UTF-8 (which `tokenizers`, taking str, never sees) is not split: one piece of bytes.
    if (ValidUtf8(norm.text)) {
      for (const auto& re : regexes_) pieces = Split(norm.text, pieces, re->code);
    }
    for (const auto& [pb, pe] : pieces) Bpe(norm, pb, pe, out);
  }

  static bool ValidUtf8(const std::string& s) {
    int err = 0;
    PCRE2_SIZE off = 0;
    (void)off;
    // A match of the empty pattern checks the subject's encoding once.
    static pcre2_code* empty = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(""), 0, PCRE2_UTF, &err, &off, nullptr);
    pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
    const int rc = pcre2_match(empty, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0, 0, md, nullptr);
    pcre2_match_data_free(md);
    return rc >= 0;
  }

  // Splits each piece by the regex: matches and the gaps between them become pieces (behaviour "Isolated").
  static std::vector<std::pair<size_t, size_t>> Split(const std::string& s,
                                                     const std::vector<std::pair<size_t, size_t>>& in,
                                                     pcre2_code* re) {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(re, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    for (const auto& [b, e] : in) {
      size_t at = b;
      // Each piece is matched as its own subject (lookarounds do not see past it), as tokenizers does.
      while (at < e) {
        const int rc = pcre2_match(re, subject + b, e - b, at - b, PCRE2_NO_UTF_CHECK, md, nullptr);
        if (rc < 0) break;
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        const size_t mb = b + ov[0], me = b + ov[1];
        if (me == mb) {  // an empty match: step over one character
          size_t next = at + 1;
          while (next < e && (static_cast<unsigned char>(s[next]) & 0xC0) == 0x80) ++next;
          at = next;
          continue;
        }
        if (mb > at) out.push_back({at, mb});
        out.push_back({mb, me});
        at = me;
      }
      if (at < e) out.push_back({at, e});
    }
    pcre2_match_data_free(md);
    return out;
  }

  void Bpe(const internal::Normalized& norm, size_t b, size_t e, Encoding* out) const {
    struct Sym {
      std::string s;
      size_t first, last;  // normalised bytes
    };
    std::vector<Sym> syms;
    std::string word;
    for (size_t i = b; i < e; ++i) {
      const std::string& c = byte_chars_[static_cast<unsigned char>(norm.text[i])];
      syms.push_back({c, i, i});
      word += c;
    }
    if (ignore_merges_ && vocab_.count(word)) syms = {{word, b, e - 1}};
    for (;;) {
      int best = INT_MAX;
      size_t at = 0;
      for (size_t j = 0; j + 1 < syms.size(); ++j) {
        auto it = merges_.find(syms[j].s + ' ' + syms[j + 1].s);
        if (it != merges_.end() && it->second < best) {
          best = it->second;
          at = j;
        }
      }
      if (best == INT_MAX) break;
      syms[at].s += syms[at + 1].s;
      syms[at].last = syms[at + 1].last;
      syms.erase(syms.begin() + at + 1);
    }
    for (const auto& sym : syms) {
      auto it = vocab_.find(sym.s);
      out->ids.push_back(it != vocab_.end() ? it->second : unk_);
      int32_t sb = norm.begin[sym.first], se = norm.end[sym.last];
      if (trim_offsets_) {  // leading and trailing spaces are not part of the token's span
        size_t lead = 0, trail = 0;
        for (size_t i = sym.first; i <= sym.last && norm.text[i] == ' '; ++i) ++lead;
        for (size_t i = sym.last + 1; i > sym.first && norm.text[i - 1] == ' '; --i) ++trail;
        // tokenizers keeps one leading space of the text's first token when the processor adds prefix spaces.
        if ((out->ids.empty() || sb == 0) && trim_prefix_space_ && lead == 1) lead = 0;
        if (lead > 0) sb = std::min(sb + static_cast<int32_t>(lead), se);
        if (trail > 0 && se >= static_cast<int32_t>(trail)) se = std::max(se - static_cast<int32_t>(trail), sb);
      }
      out->spans.push_back({sb, se});
    }
  }

  std::vector<std::string> pieces_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int> merges_;  // "left right" -> rank
  std::vector<std::pair<std::string, int32_t>> added_;
  std::map<int32_t, bool> special_;
  std::vector<std::unique_ptr<Regex>> regexes_;
  std::array<std::string, 256> byte_chars_ = ByteChars();
  std::unordered_map<std::string, int> char_byte_;
  NormalForm form_ = NormalForm::kNone;
  bool ignore_merges_ = false;
  bool trim_offsets_ = false;
  bool trim_prefix_space_ = false;  // the ByteLevel processor's add_prefix_space
  int32_t bos_ = -1, eos_ = -1, unk_ = -1;
};

absl::Status Refuse(const std::string& path, const std::string& what, const nlohmann::json& j) {
  return absl::UnimplementedError(absl::StrCat(path, ": ", what, " ", j.dump(), " is not supported"));
}

absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& path, const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE off = 0;
  auto re = std::make_unique<Regex>();
  re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                           &off, nullptr);
  if (re->code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    return absl::DataLossError(absl::StrCat(path, ": pre-tokenizer regex does not compile at ", off, ": ",
                                            reinterpret_cast<const char*>(msg)));
  }
  pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // a speed-up only; the interpreter runs without it
  return re;
}

// The token named by a tokenizer_config.json entry ("<|endoftext|>" or {"content": "..."}), or "".
std::string TokenName(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

absl::StatusOr<std::unique_ptr<Tokenizer>> HfBpeTokenizer::Load(const std::string& path, int32_t vocab_size) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("tokenizer file not found: ", path));
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(path, ": malformed JSON"));
  std::unique_ptr<HfBpeTokenizer> t(new HfBpeTokenizer());
  for (int b = 0; b < 256; ++b) t->char_byte_[t->byte_chars_[b]] = b;
  try {
    const auto& m = j.at("model");
    if (m.value("type", "BPE") != "BPE") return Refuse(path, "model type", m["type"]);
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix", "dropout"}) {
      if (m.contains(key) && !m[key].is_null() && m[key] != "") return Refuse(path, key, m[key]);
    }
    if (m.value("byte_fallback", false)) return Refuse(path, "byte_fallback", m["byte_fallback"]);
    t->ignore_merges_ = m.value("ignore_merges", false);
    int32_t max_id = -1;
    for (auto it = m.at("vocab").begin(); it != m.at("vocab").end(); ++it) {
      const int32_t id = it.value().get<int32_t>();
      t->vocab_[it.key()] = id;
      max_id = std::max(max_id, id);
    }
    int rank = 0;
    for (const auto& mg : m.at("merges")) {
      std::string key;
      if (mg.is_string()) key = mg.get<std::string>();
      else key = mg.at(0).get<std::string>() + ' ' + mg.at(1).get<std::string>();
      t->merges_.emplace(key, rank++);
    }
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      auto it = t->vocab_.find(m["unk_token"].get<std::string>());
      if (it != t->vocab_.end()) t->unk_ = it->second;
    }
    for (const auto& a : j.value("added_tokens", nlohmann::json::array())) {
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        if (a.value(flag, false)) return Refuse(path, absl::StrCat("added token flag ", flag, " on"), a["content"]);
      }
      const int32_t id = a.at("id").get<int32_t>();
      t->added_.push_back({a.at("content").get<std::string>(), id});
      t->special_[id] = a.value("special", false);
      max_id = std::max(max_id, id);
    }
    t->pieces_.assign(max_id + 1, "");
    for (const auto& [p, id] : t->vocab_) t->pieces_[id] = p;
    for (const auto& [p, id] : t->added_) t->pieces_[id] = p;
    // Normalizer: none, NFC or NFKC (alone or as a one-element sequence).
    nlohmann::json nm = j.value("normalizer", nlohmann::json());
    if (nm.is_object() && nm.value("type", "") == "Sequence" && nm.contains("normalizers") &&
        nm["normalizers"].size() <= 1) {
      nm = nm["normalizers"].empty() ? nlohmann::json() : nm["normalizers"][0];
    }
    if (!nm.is_null()) {
      const std::string type = nm.value("type", "");
      if (type == "NFC") t->form_ = NormalForm::kNfc;
      else if (type == "NFKC") t->form_ = NormalForm::kNfkc;
      else return Refuse(path, "normalizer", nm);
    }
    // Pre-tokenizer: Split regexes (Isolated) and ByteLevel, alone or in a sequence; ByteLevel must be there.
    const nlohmann::json pt = j.value("pre_tokenizer", nlohmann::json());
    std::vector<nlohmann::json> steps;
    if (pt.is_object() && pt.value("type", "") == "Sequence") {
      for (const auto& s : pt.at("pretokenizers")) steps.push_back(s);
    } else if (!pt.is_null()) {
      steps.push_back(pt);
    }
    bool byte_level = false;
    for (const auto& s : steps) {
      const std::string type = s.value("type", "");
      if (type == "Split") {
        if (s.value("behavior", "") != "Isolated" || s.value("invert", false) || !s.at("pattern").contains("Regex")) {
          return Refuse(path, "pre-tokenizer", s);
        }
        auto re = Compile(path, s["pattern"]["Regex"].get<std::string>());
        if (!re.ok()) return re.status();
        t->regexes_.push_back(std::move(*re));
      } else if (type == "ByteLevel") {
        if (s.value("add_prefix_space", false)) return Refuse(path, "ByteLevel add_prefix_space", s);
        if (s.value("use_regex", true)) {
          auto re = Compile(path, kGpt2Regex);
          if (!re.ok()) return re.status();
          t->regexes_.push_back(std::move(*re));
        }
        byte_level = true;
      } else {
        return Refuse(path, "pre-tokenizer", s);
      }
    }
    if (!byte_level) return Refuse(path, "a BPE model without a ByteLevel pre-tokenizer:", pt);
    // Post-processor: ByteLevel (trim_offsets) and a TemplateProcessing that puts one special token (BOS) first.
    const nlohmann::json pp = j.value("post_processor", nlohmann::json());
    std::vector<nlohmann::json> posts;
    if (pp.is_object() && pp.value("type", "") == "Sequence") {
      for (const auto& s : pp.at("processors")) posts.push_back(s);
    } else if (!pp.is_null()) {
      posts.push_back(pp);
    }
    for (const auto& s : posts) {
      const std::string type = s.value("type", "");
      if (type == "ByteLevel") {
        t->trim_offsets_ = s.value("trim_offsets", false);
        t->trim_prefix_space_ = s.value("add_prefix_space", true);
      } else if (type == "TemplateProcessing") {
        const auto& single = s.at("single");
        if (single.size() == 2 && single[0].contains("SpecialToken") && single[1].contains("Sequence")) {
          const std::string name = single[0]["SpecialToken"].at("id").get<std::string>();
          t->bos_ = t->TokenId(name);
          if (t->bos_ < 0) return absl::DataLossError(absl::StrCat(path, ": template token ", name, " is unknown"));
        } else if (!(single.size() == 1 && single[0].contains("Sequence"))) {
          return Refuse(path, "post-processor template", single);
        }
      } else {
        return Refuse(path, "post-processor", s);
      }
    }
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(path, ": ", e.what()));
  }
  for (int b = 0; b < 256; ++b) {
    if (!t->vocab_.count(t->byte_chars_[b])) {
      return absl::DataLossError(absl::StrCat(path, ": the vocabulary lacks byte ", b, "'s token; not a byte-level BPE"));
    }
  }
  // BOS and EOS from tokenizer_config.json next to the file, when the post-processor did not say.
  const auto cfg_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  if (std::ifstream cin(cfg_path); cin) {
    const auto c = nlohmann::json::parse(cin, nullptr, false);
    if (c.is_object()) {
      if (c.contains("eos_token")) t->eos_ = t->TokenId(TokenName(c["eos_token"]));
      if (t->bos_ < 0 && c.value("add_bos_token", false) && c.contains("bos_token")) {
        t->bos_ = t->TokenId(TokenName(c["bos_token"]));
      }
    }
  }
  if (static_cast<int32_t>(t->pieces_.size()) > vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has ", t->pieces_.size(),
                                                   " tokens; the model's vocabulary is ", vocab_size));
  }
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizer(const std::string& path, int32_t vocab_size) {
  return HfBpeTokenizer::Load(path, vocab_size);
}

}  // namespace rapidin::model
