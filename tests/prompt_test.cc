// model/prompt: the template's field ranges against a slow, obvious reference (searching the formatted prompt for
// the field text after its section header), on random fields that include the template's own markers.
#include "model/prompt.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

#include "tests/test_util.h"

namespace rapidin::model {
namespace {

std::string RandomField(std::mt19937* rng, bool may_be_empty) {
  static const char* kPieces[] = {"a", "Z", " ", "\n", "é", "§", "### Input:\n", "### Response:\n",
                                  "### Instruction:\n", "Howdy! ", "0"};
  std::string s;
  const int n = static_cast<int>((*rng)() % 12) + (may_be_empty ? 0 : 1);
  for (int i = 0; i < n; ++i) s += kPieces[(*rng)() % (sizeof(kPieces) / sizeof(kPieces[0]))];
  return s;
}

TEST(Prompt, FieldRangesHoldTheFieldsAndSpansMapToThem) {
  SCOPED_TRACE(rapidin::testing::FuzzReplay());
  std::mt19937 rng(static_cast<uint32_t>(rapidin::testing::FuzzSeed() + 7));
  for (int trial = 0; trial < 300; ++trial) {
    const std::string ins = RandomField(&rng, false), in = RandomField(&rng, true);
    const std::string p = AlpacaPrompt(ins, in);
    const PromptFields f = AlpacaPromptFields(ins, in);
    // Reference: the instruction follows the first "### Instruction:\n"; the input follows the "### Input:\n"
    // that comes right after the instruction; the prompt ends with the response header.
    const size_t ib = p.find("### Instruction:\n") + 17;
    ASSERT_EQ(f.instruction_begin, static_cast<int32_t>(ib));
    ASSERT_EQ(p.substr(f.instruction_begin, f.instruction_end - f.instruction_begin), ins);
    if (in.empty()) {
      EXPECT_EQ(f.input_begin, -1);
      EXPECT_EQ(f.input_end, -1);
      EXPECT_EQ(p.substr(f.instruction_end), "\n\n### Response:\n");
    } else {
      ASSERT_EQ(p.compare(f.instruction_end, 13, "\n\n### Input:\n"), 0);
      ASSERT_EQ(p.substr(f.input_begin, f.input_end - f.input_begin), in);
      EXPECT_EQ(p.substr(f.input_end), "\n\n### Response:\n");
    }
    // Every span inside a field maps to that field's own offsets; one that leaves it stays a template span.
    for (int k = 0; k < 20; ++k) {
      const int32_t b = static_cast<int32_t>(rng() % (p.size() + 1));
      const int32_t e = b + static_cast<int32_t>(rng() % (p.size() + 1 - b));
      const FieldSpan got = LocateInPrompt(f, {b, e});
      const bool in_ins = b >= f.instruction_begin && e <= f.instruction_end;
      const bool in_in = !in.empty() && b >= f.input_begin && e <= f.input_end;
      const std::string want = in_ins ? "instruction" : in_in ? "input" : "template";
      ASSERT_EQ(std::string(got.field), want) << b << ".." << e;
      const int32_t base = in_ins ? f.instruction_begin : in_in ? f.input_begin : 0;
      ASSERT_EQ(got.span.begin, b - base);
      ASSERT_EQ(got.span.end, e - base);
      if (want != "template") {
        const std::string& field = want == "instruction" ? ins : in;
        ASSERT_EQ(field.substr(got.span.begin, got.span.end - got.span.begin), p.substr(b, e - b));
      }
    }
  }
}

}  // namespace
}  // namespace rapidin::model
