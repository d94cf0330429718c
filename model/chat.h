// Chat templates: how a conversation of messages becomes the text a chat model was trained on, where each
// message's content lies in that text, and which bytes a fine-tuning loss covers (the assistant turns and their
// end-of-turn marker).
//
// Templates are data (TemplateSpec), not Jinja: the common families are built in and recognised from a
// tokenizer_config.json chat_template by their markers (ChatML/Qwen2, Llama 3, Llama 2, Mistral, Gemma); any other
// template is refused by name and can be given as a JSON file (--template FILE) in TemplateSpec's fields.
// tests/chat_test.cc renders conversations with each and compares with transformers' apply_chat_template.
// No LibTorch. Thread-safety: immutable after construction.
#ifndef RAPIDIN_MODEL_CHAT_H_
#define RAPIDIN_MODEL_CHAT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace rapidin::model {

struct Message {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

struct TemplateSpec {
  std::string name;
  std::string begin;                      // text once at the start ("<|begin_of_text|>", the BOS text)
  std::string system_prefix, system_suffix;
  std::string user_prefix, user_suffix;
  std::string assistant_prefix, assistant_suffix;
  // The part of assistant_suffix that is trained on (the end-of-turn marker, EOS); the rest is not.
  std::string assistant_trained_suffix;
  std::string default_system;             // inserted when the conversation has no system message ("": none)
  bool system_supported = true;           // false: a system message is refused (Mistral, Gemma)
  // Llama 2: the system message is folded into the first user message as "<<SYS>>\n...\n<</SYS>>\n\n".
  bool system_in_first_user = false;
  bool strip_content = false;             // contents are stripped of surrounding whitespace (Jinja's trim)
  bool alternate = false;                 // user and assistant must alternate, user first (after any system)
  std::string generation_prompt;          // what add_generation_prompt appends
};

// A conversation as text. Every span is a byte range of `text`.
struct RenderedChat {
  std::string text;
  struct Part {
    int message = 0;                      // index into the conversation
    int32_t begin = 0, end = 0;           // the message's content (stripped when the template strips)
    int32_t content_offset = 0;           // byte of the message's content where `begin` lies (after stripping)
    int32_t suffix_begin = -1, suffix_end = -1;  // an assistant turn's trained suffix (-1: none)
  };
  std::vector<Part> contents;
  std::vector<std::pair<int32_t, int32_t>> trained;  // assistant contents and their trained suffixes
};

class ChatTemplate {
 public:
  // A built-in family by name: "chatml", "llama3", "llama2", "mistral", "gemma". bos/eos: the tokenizer's BOS and
  // EOS texts, which the Llama 2, Mistral, Llama 3 and Gemma templates write. Errors: NOT_FOUND for another name.
  static absl::StatusOr<ChatTemplate> Named(const std::string& name, const std::string& bos, const std::string& eos);
  // Recognises the family of a Jinja chat_template by its markers (ChatML's default system message is read from
  // the template). UNIMPLEMENTED naming what was seen when it is none of the families, or a variant they do not
  // cover (tools, Llama 3.1's date header, Mistral's [SYSTEM_PROMPT]).
  static absl::StatusOr<ChatTemplate> Recognize(const std::string& jinja, const std::string& bos,
                                                const std::string& eos);
  // A TemplateSpec as JSON (--template FILE): the fields above by name; "{bos}" and "{eos}" in any string are
  // replaced by the tokenizer's texts. Errors: NOT_FOUND, DATA_LOSS (malformed), INVALID_ARGUMENT (no name or
  // no assistant prefix).
  static absl::StatusOr<ChatTemplate> FromFile(const std::string& path, const std::string& bos,
                                               const std::string& eos);
  explicit ChatTemplate(TemplateSpec spec) : spec_(std::move(spec)) {}

  const std::string& name() const { return spec_.name; }
  const TemplateSpec& spec() const { return spec_; }

  // Errors: INVALID_ARGUMENT for an empty conversation, an unknown role, a system message the template does
  // not take or not first, or turns that do not alternate where the template requires it.
  absl::StatusOr<RenderedChat> Render(const std::vector<Message>& messages, bool add_generation_prompt) const;

 private:
  TemplateSpec spec_;
};

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_CHAT_H_
