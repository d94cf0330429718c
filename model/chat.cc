#include "model/chat.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace rapidin::model {
namespace {

bool Space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::Named(const std::string& name, const std::string& bos,
                                                 const std::string& eos) {
  TemplateSpec s;
  s.name = name;
  if (name == "chatml") {
    s.system_prefix = "<|im_start|>system\n";
    s.user_prefix = "<|im_start|>user\n";
    s.assistant_prefix = "<|im_start|>assistant\n";
    s.system_suffix = s.user_suffix = s.assistant_suffix = "<|im_end|>\n";
    s.assistant_trained_suffix = "<|im_end|>";
    s.generation_prompt = "<|im_start|>assistant\n";
  } else if (name == "llama3") {
    s.begin = bos;
    s.system_prefix = "<|start_header_id|>system<|end_header_id|>\n\n";
    s.user_prefix = "<|start_header_id|>user<|end_header_id|>\n\n";
    s.assistant_prefix = "<|start_header_id|>assistant<|end_header_id|>\n\n";
    s.system_suffix = s.user_suffix = s.assistant_suffix = s.assistant_trained_suffix = "<|eot_id|>";
    s.strip_content = true;
    s.generation_prompt = s.assistant_prefix;
  } else if (name == "llama2") {
    s.user_prefix = bos + "[INST] ";
    s.user_suffix = " [/INST]";
    s.assistant_prefix = " ";
    s.assistant_suffix = " " + eos;
    s.assistant_trained_suffix = eos;
    s.system_in_first_user = true;
    s.strip_content = true;
    s.alternate = true;
  } else if (name == "mistral") {
    s.begin = bos;
    s.user_prefix = "[INST] ";
    s.user_suffix = " [/INST]";
    s.assistant_suffix = s.assistant_trained_suffix = eos;
    s.system_supported = false;
    s.alternate = true;
  } else if (name == "gemma") {
    s.begin = bos;
    s.user_prefix = "<start_of_turn>user\n";
    s.assistant_prefix = "<start_of_turn>model\n";
    s.user_suffix = s.assistant_suffix = "<end_of_turn>\n";
    s.assistant_trained_suffix = "<end_of_turn>";
    s.strip_content = true;
    s.system_supported = false;
    s.alternate = true;
    s.generation_prompt = "<start_of_turn>model\n";
  } else {
    return absl::NotFoundError(absl::StrCat("unknown chat template \"", name,
                                            "\" (built in: chatml, llama3, llama2, mistral, gemma)"));
  }
  return ChatTemplate(std::move(s));
}

absl::StatusOr<ChatTemplate> ChatTemplate::Recognize(const std::string& jinja, const std::string& bos,
                                                     const std::string& eos) {
  auto has = [&](const char* marker) { return jinja.find(marker) != std::string::npos; };
  auto refuse = [&](const std::string& why) {
    return absl::UnimplementedError(absl::StrCat("chat_template not recognised: ", why, " (template begins \"",
                                                 jinja.substr(0, 60), "\"); pass --template FILE"));
  };
  if (has("<|im_start|>")) {
    auto t = Named("chatml", bos, eos);
    // The default system message ChatML templates insert when there is none: a literal in the template.
    static const std::regex kDefault(R"(<\|im_start\|>system(?:\\n|\n)([^'"{}]*?)<\|im_end\|>)");
    std::smatch m;
    if (std::regex_search(jinja, m, kDefault)) {
      t->spec_.default_system = absl::StrReplaceAll(m[1].str(), {{"\\n", "\n"}});
    }
    return t;
  }
  if (has("<|start_header_id|>")) {
    if (has("Cutting Knowledge Date")) return refuse("Llama 3.1's date header");
    return Named("llama3", bos, eos);
  }
  if (has("<start_of_turn>")) return Named("gemma", bos, eos);
  if (has("[INST]")) {
    if (has("<<SYS>>")) return Named("llama2", bos, eos);
    if (has("[SYSTEM_PROMPT]") || has("[AVAILABLE_TOOLS]")) return refuse("a Mistral variant with system or tools");
    return Named("mistral", bos, eos);
  }
  return refuse("none of ChatML, Llama 3, Llama 2, Mistral or Gemma");
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromFile(const std::string& path, const std::string& bos,
                                                    const std::string& eos) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("template file not found: ", path));
  const auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError(absl::StrCat(path, ": malformed JSON"));
  TemplateSpec s;
  auto str = [&](const char* key, std::string* dst) -> absl::Status {
    if (!j.contains(key)) return absl::OkStatus();
    if (!j[key].is_string()) return absl::DataLossError(absl::StrCat(path, ": \"", key, "\" is not a string"));
    *dst = absl::StrReplaceAll(j[key].get<std::string>(), {{"{bos}", bos}, {"{eos}", eos}});
    return absl::OkStatus();
  };
  auto flag = [&](const char* key, bool* dst) -> absl::Status {
    if (!j.contains(key)) return absl::OkStatus();
    if (!j[key].is_boolean()) return absl::DataLossError(absl::StrCat(path, ": \"", key, "\" is not a boolean"));
    *dst = j[key].get<bool>();
    return absl::OkStatus();
  };
  static const std::vector<std::string> kKeys = {
      "name", "begin", "system_prefix", "system_suffix", "user_prefix", "user_suffix", "assistant_prefix",
      "assistant_suffix", "assistant_trained_suffix", "default_system", "generation_prompt", "system_supported",
      "system_in_first_user", "strip_content", "alternate"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (std::find(kKeys.begin(), kKeys.end(), it.key()) == kKeys.end()) {
      return absl::DataLossError(absl::StrCat(path, ": unknown field \"", it.key(), "\""));
    }
  }
  for (auto [key, dst] : std::vector<std::pair<const char*, std::string*>>{
           {"name", &s.name}, {"begin", &s.begin}, {"system_prefix", &s.system_prefix},
           {"system_suffix", &s.system_suffix}, {"user_prefix", &s.user_prefix}, {"user_suffix", &s.user_suffix},
           {"assistant_prefix", &s.assistant_prefix}, {"assistant_suffix", &s.assistant_suffix},
           {"assistant_trained_suffix", &s.assistant_trained_suffix}, {"default_system", &s.default_system},
           {"generation_prompt", &s.generation_prompt}}) {
    if (absl::Status st = str(key, dst); !st.ok()) return st;
  }
  for (auto [key, dst] : std::vector<std::pair<const char*, bool*>>{{"system_supported", &s.system_supported},
                                                                    {"system_in_first_user", &s.system_in_first_user},
                                                                    {"strip_content", &s.strip_content},
                                                                    {"alternate", &s.alternate}}) {
    if (absl::Status st = flag(key, dst); !st.ok()) return st;
  }
  if (s.name.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": a template needs a \"name\""));
  if (s.assistant_prefix.empty() && s.user_suffix.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no assistant_prefix or user_suffix: turns would run together"));
  }
  if (s.assistant_suffix.find(s.assistant_trained_suffix) == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": assistant_trained_suffix is not part of assistant_suffix"));
  }
  return ChatTemplate(std::move(s));
}

absl::StatusOr<RenderedChat> ChatTemplate::Render(const std::vector<Message>& messages,
                                                  bool add_generation_prompt) const {
  const TemplateSpec& s = spec_;
  if (messages.empty()) return absl::InvalidArgumentError("a chat needs at least one message");
  RenderedChat out;
  out.text = s.begin;
  const bool has_system = messages[0].role == "system";
  if (has_system && !s.system_supported) {
    return absl::InvalidArgumentError(absl::StrCat("the ", s.name, " chat template takes no system message"));
  }
  // Appends message i's content [b, e) of its text, stripped as the template says.
  auto content = [&](int i, bool lstrip, bool rstrip) {
    const std::string& c = messages[i].content;
    size_t b = 0, e = c.size();
    if (lstrip) while (b < e && Space(c[b])) ++b;
    if (rstrip) while (e > b && Space(c[e - 1])) --e;
    const int32_t at = static_cast<int32_t>(out.text.size());
    out.text.append(c, b, e - b);
    out.contents.push_back({i, at, static_cast<int32_t>(out.text.size()), static_cast<int32_t>(b)});
  };
  if (!has_system && !s.default_system.empty()) out.text += s.system_prefix + s.default_system + s.system_suffix;
  int turn = 0;  // non-system messages so far
  bool folded = false;
  for (int i = 0; i < static_cast<int>(messages.size()); ++i) {
    const std::string& role = messages[i].role;
    if (role == "system") {
      if (i != 0) return absl::InvalidArgumentError(absl::StrCat("message ", i, ": a system message must come first"));
      if (s.system_in_first_user) continue;  // folded into the first user message below
      out.text += s.system_prefix;
      content(i, s.strip_content, s.strip_content);
      out.text += s.system_suffix;
      continue;
    }
    if (role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": unknown role \"", role,
                                                     "\" (system, user or assistant)"));
    }
    if (s.alternate && (role == "user") != (turn % 2 == 0)) {
      return absl::InvalidArgumentError(absl::StrCat("message ", i, ": the ", s.name,
                                                     " template needs user and assistant turns to alternate, user first"));
    }
    ++turn;
    if (role == "user") {
      out.text += s.user_prefix;
      if (has_system && s.system_in_first_user && !folded) {
        // Llama 2: '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content, stripped as one string.
        folded = true;
        out.text += "<<SYS>>\n";
        content(0, false, false);
        out.text += "\n<</SYS>>\n\n";
        content(i, false, s.strip_content);
      } else {
        content(i, s.strip_content, s.strip_content);
      }
      out.text += s.user_suffix;
    } else {
      out.text += s.assistant_prefix;
      content(i, s.strip_content, s.strip_content);
      const int32_t b = out.contents.back().begin;
      const int32_t suffix_at = static_cast<int32_t>(out.text.size());
      out.text += s.assistant_suffix;
      const int32_t t = static_cast<int32_t>(s.assistant_suffix.find(s.assistant_trained_suffix));
      out.trained.push_back({b, suffix_at});
      if (!s.assistant_trained_suffix.empty()) {
        auto& part = out.contents.back();
        part.suffix_begin = suffix_at + t;
        part.suffix_end = part.suffix_begin + static_cast<int32_t>(s.assistant_trained_suffix.size());
        out.trained.push_back({part.suffix_begin, part.suffix_end});
      }
    }
  }
  if (add_generation_prompt) out.text += s.generation_prompt;
  return out;
}

}  // namespace rapidin::model
