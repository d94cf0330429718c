#include "model/prompt.h"

#include "absl/strings/str_cat.h"

namespace rapidin::model {
namespace {

constexpr char kHeader[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n";
constexpr char kHeaderWithInput[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n";
constexpr char kInput[] = "\n\n### Input:\n";
constexpr char kResponse[] = "\n\n### Response:\n";

}  // namespace

std::string AlpacaPrompt(const std::string& instruction, const std::string& input) {
  if (input.empty()) return absl::StrCat(kHeader, instruction, kResponse);
  return absl::StrCat(kHeaderWithInput, instruction, kInput, input, kResponse);
}

PromptFields AlpacaPromptFields(const std::string& instruction, const std::string& input) {
  PromptFields f;
  f.instruction_begin = static_cast<int32_t>(input.empty() ? sizeof(kHeader) - 1 : sizeof(kHeaderWithInput) - 1);
  f.instruction_end = f.instruction_begin + static_cast<int32_t>(instruction.size());
  if (!input.empty()) {
    f.input_begin = f.instruction_end + static_cast<int32_t>(sizeof(kInput) - 1);
    f.input_end = f.input_begin + static_cast<int32_t>(input.size());
  }
  return f;
}

FieldSpan LocateInPrompt(const PromptFields& f, Span s) {
  if (s.begin >= f.instruction_begin && s.end <= f.instruction_end) {
    return {"instruction", {s.begin - f.instruction_begin, s.end - f.instruction_begin}};
  }
  if (f.input_begin >= 0 && s.begin >= f.input_begin && s.end <= f.input_end) {
    return {"input", {s.begin - f.input_begin, s.end - f.input_begin}};
  }
  return {"template", s};
}

}  // namespace rapidin::model
