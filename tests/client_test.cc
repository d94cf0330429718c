// client/: JSONL parsing with clear, line-numbered errors.
#include <gtest/gtest.h>

#include <fstream>

#include "client/client.h"
#include "tests/test_util.h"

namespace rapidin::client {
namespace {

TEST(ParseRecordLine, AcceptsAlpacaAndFreeText) {
  auto r = ParseRecordLine(
      R"({"id": "a1", "instruction": "Say hi", "input": "", "output": "Hi!", "metadata": {"src": "x", "n": 3},
          "vector": [1, -2.5, 3e-3]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->record().id(), "a1");
  EXPECT_EQ(r->record().output(), "Hi!");
  EXPECT_EQ(r->record().metadata().at("src"), "x");
  EXPECT_EQ(r->record().metadata().at("n"), "3");
  ASSERT_EQ(r->vector_size(), 3);
  EXPECT_FLOAT_EQ(r->vector(1), -2.5f);
  auto t = ParseRecordLine(R"({"id": 17, "text": "free", "vector": [0.5]})");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->record().id(), "17");
  EXPECT_EQ(t->record().text(), "free");
}

TEST(ParseRecordLine, RejectsBadLines) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"id": "a", "vector": [1, 2)", "malformed JSON"},
      {R"([1, 2])", "expected a JSON object"},
      {R"({"vector": [1]})", "missing \"id\""},
      {R"({"id": "a"})", "missing \"vector\""},
      {R"({"id": "a", "vector": 3})", "array"},
      {R"({"id": "a", "vector": [1, "x"]})", "\"vector\"[1]"},
      {R"({"id": "a", "instruction": 5, "vector": [1]})", "\"instruction\" must be a string"},
      {R"({"id": [1], "vector": [1]})", "\"id\" must be"},
      {R"({"id": "a", "metadata": [1], "vector": [1]})", "metadata"},
  };
  for (const auto& [line, words] : cases) {
    auto r = ParseRecordLine(line);
    ASSERT_FALSE(r.ok()) << line;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(words), std::string::npos) << r.status() << " for " << line;
  }
}

TEST(ParseQueryLine, VectorAndWeight) {
  auto q = ParseQueryLine(R"({"vector": [1, 2, 3], "weight": 0.25})");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->values_size(), 3);
  EXPECT_FLOAT_EQ(q->weight(), 0.25f);
  EXPECT_FALSE(ParseQueryLine(R"({"values": [1]})").ok());
  EXPECT_FALSE(ParseQueryLine(R"({"vector": [1], "weight": "heavy"})").ok());
}

TEST(ForEachLine, ReportsFileAndLineNumber) {
  rapidin::testing::TempDir dir;
  const std::string path = dir.path("in.jsonl");
  std::ofstream(path) << R"({"vector": [1]})" << "\n\n" << R"({"vector": [2]})" << "\n" << "{oops\n";
  int seen = 0;
  auto st = ForEachLine(path, [&](int64_t, const std::string& line) -> absl::Status {
    auto q = ParseQueryLine(line);
    if (!q.ok()) return q.status();
    ++seen;
    return absl::OkStatus();
  });
  EXPECT_EQ(seen, 2);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("in.jsonl:4: malformed JSON"), std::string::npos) << st;
  EXPECT_EQ(ForEachLine(dir.path("missing"), [](int64_t, const std::string&) { return absl::OkStatus(); }).code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace rapidin::client
