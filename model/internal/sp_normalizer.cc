#include "model/internal/sp_normalizer.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace rapidin::model::internal {

namespace {

constexpr char kSpaceSymbol[] = "\xe2\x96\x81";  // U+2581
constexpr char kReplacement[] = "\xef\xbf\xbd";  // U+FFFD

bool Trail(unsigned char c) { return (c & 0xC0) == 0x80; }
bool ValidCodepoint(uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); }

// The length of s's first UTF-8 character, or 0 when it is malformed (overlong, a surrogate, past U+10FFFF, cut
// short), by libsentencepiece's rules (util.cc DecodeUTF8).
size_t Utf8Length(std::string_view s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  if (b[0] < 0x80) return 1;
  if (n >= 2 && (b[0] & 0xE0) == 0xC0 && Trail(b[1])) {
    const uint32_t c = ((b[0] & 0x1Fu) << 6) | (b[1] & 0x3Fu);
    return c >= 0x80 ? 2 : 0;
  }
  if (n >= 3 && (b[0] & 0xF0) == 0xE0 && Trail(b[1]) && Trail(b[2])) {
    const uint32_t c = ((b[0] & 0x0Fu) << 12) | ((b[1] & 0x3Fu) << 6) | (b[2] & 0x3Fu);
    return c >= 0x800 && ValidCodepoint(c) ? 3 : 0;
  }
  if (n >= 4 && (b[0] & 0xF8) == 0xF0 && Trail(b[1]) && Trail(b[2]) && Trail(b[3])) {
    const uint32_t c = ((b[0] & 0x07u) << 18) | ((b[1] & 0x3Fu) << 12) | ((b[2] & 0x3Fu) << 6) | (b[3] & 0x3Fu);
    return c >= 0x10000 && ValidCodepoint(c) ? 4 : 0;
  }
  return 0;
}

// darts-clone's unit fields (darts.h DoubleArrayUnit).
bool HasLeaf(uint32_t u) { return ((u >> 8) & 1) == 1; }
uint32_t Value(uint32_t u) { return u & ((1u << 31) - 1); }
uint32_t Label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
uint32_t Offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

}  // namespace

absl::StatusOr<SpNormalizer> SpNormalizer::Create(Spec spec) {
  SpNormalizer n;
  const std::string& blob = spec.precompiled_charsmap;
  if (!blob.empty()) {
    // <trie bytes: uint32 little-endian><double array: uint32 units><rewritten strings>
    uint32_t trie_bytes = 0;
    if (blob.size() > 4) std::memcpy(&trie_bytes, blob.data(), 4);
    if (blob.size() <= 4 || trie_bytes == 0 || trie_bytes % 4 != 0 || trie_bytes > blob.size() - 4) {
      return absl::DataLossError(absl::StrCat("SentencePiece character map of ", blob.size(),
                                              " bytes is broken (trie of ", trie_bytes, " bytes)"));
    }
    n.units_.resize(trie_bytes / 4);
    std::memcpy(n.units_.data(), blob.data() + 4, trie_bytes);
    n.pool_ = blob.substr(4 + size_t{trie_bytes});
  }
  spec.precompiled_charsmap.clear();
  n.spec_ = std::move(spec);
  return n;
}

std::pair<std::string_view, size_t> SpNormalizer::NormalizePrefix(std::string_view input) const {
  if (input.empty()) return {};
  size_t longest = 0;
  uint32_t value = 0;
  if (!units_.empty()) {
    // commonPrefixSearch: every rule that is a prefix of input; the longest wins. Positions are checked against
    // the array, so a corrupt map ends the search instead of reading past it.
    const size_t size = units_.size();
    size_t pos = Offset(units_[0]);
    for (size_t i = 0; i < input.size(); ++i) {
      const auto c = static_cast<unsigned char>(input[i]);
      pos ^= c;
      if (pos >= size) break;
      const uint32_t u = units_[pos];
      if (Label(u) != c) break;
      pos ^= Offset(u);
      if (pos >= size) break;
      if (HasLeaf(u)) {
        longest = i + 1;
        value = Value(units_[pos]);
      }
    }
  }
  if (longest > 0) {
    if (value < pool_.size()) {
      const char* s = pool_.data() + value;
      const void* nul = std::memchr(s, '\0', pool_.size() - value);
      const size_t len = nul ? static_cast<const char*>(nul) - s : pool_.size() - value;
      return {std::string_view(s, len), longest};
    }
  }
  const size_t len = Utf8Length(input);
  if (len == 0) return {std::string_view(kReplacement, 3), 1};
  return {input.substr(0, len), len};
}

void SpNormalizer::Normalize(std::string_view raw, std::string* normalized,
                             std::vector<int32_t>* norm_to_orig) const {
  normalized->clear();
  norm_to_orig->clear();
  int32_t consumed = 0;
  if (spec_.remove_extra_whitespaces) {  // leading spaces
    while (!raw.empty()) {
      const auto p = NormalizePrefix(raw);
      if (p.first != " ") break;
      raw.remove_prefix(p.second);
      consumed += static_cast<int32_t>(p.second);
    }
  }
  if (raw.empty()) {
    norm_to_orig->push_back(consumed);  // libsentencepiece leaves both empty; the end position keeps spans valid
    return;
  }
  auto put = [&](char c) {
    normalized->push_back(c);
    norm_to_orig->push_back(consumed);
  };
  auto put_space = [&]() {
    if (spec_.escape_whitespaces) {
      for (int m = 0; m < 3; ++m) put(kSpaceSymbol[m]);
    } else {
      put(' ');
    }
  };
  if (spec_.add_dummy_prefix) put_space();
  bool prev_space = spec_.remove_extra_whitespaces;
  while (!raw.empty()) {
    const auto [rewrite, used] = NormalizePrefix(raw);
    std::string_view sp = rewrite;
    while (prev_space && !sp.empty() && sp.front() == ' ') sp.remove_prefix(1);  // repeated spaces
    if (!sp.empty()) {
      for (char c : sp) {
        if (c == ' ' && spec_.escape_whitespaces) {
          put_space();
        } else {
          put(c);
        }
      }
      prev_space = sp.back() == ' ';
    }
    consumed += static_cast<int32_t>(used);
    raw.remove_prefix(used);
    if (!spec_.remove_extra_whitespaces) prev_space = false;
  }
  if (spec_.remove_extra_whitespaces) {  // trailing spaces
    const std::string_view space = spec_.escape_whitespaces ? std::string_view(kSpaceSymbol, 3) : " ";
    while (normalized->size() >= space.size() &&
           std::string_view(*normalized).substr(normalized->size() - space.size()) == space) {
      const size_t length = normalized->size() - space.size();
      consumed = (*norm_to_orig)[length];
      normalized->resize(length);
      norm_to_orig->resize(length);
    }
  }
  norm_to_orig->push_back(consumed);
}

}  // namespace rapidin::model::internal
