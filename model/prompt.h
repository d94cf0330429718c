// The prompt template (Alpaca, as RapidIn uses it) and where a record's fields lie inside the formatted prompt.
// The template's text is written here and nowhere else: the engine formats records with AlpacaPrompt, and the
// service maps prompt-token byte spans back to the instruction, the input or the template with PromptFields.
// No LibTorch. Thread-safety: pure functions.
#ifndef RAPIDIN_MODEL_PROMPT_H_
#define RAPIDIN_MODEL_PROMPT_H_

#include <cstdint>
#include <string>

#include "model/tokenizer.h"

namespace rapidin::model {

// The Alpaca prompt (everything before the response).
std::string AlpacaPrompt(const std::string& instruction, const std::string& input);

// Byte ranges [begin, end) of the instruction and the input inside AlpacaPrompt(instruction, input); the input's
// are -1 when the input is empty (the template then has no input section).
struct PromptFields {
  int32_t instruction_begin = 0, instruction_end = 0;
  int32_t input_begin = -1, input_end = -1;
};
PromptFields AlpacaPromptFields(const std::string& instruction, const std::string& input);

// Where a prompt span falls: "instruction" or "input" (the span made relative to that field) when it lies wholly
// inside one, else "template" (the span unchanged, relative to the prompt).
struct FieldSpan {
  const char* field;
  Span span;
};
FieldSpan LocateInPrompt(const PromptFields& fields, Span span);

}  // namespace rapidin::model

#endif  // RAPIDIN_MODEL_PROMPT_H_
