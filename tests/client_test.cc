// client/: JSONL parsing with clear, line-numbered errors.
#include <gtest/gtest.h>

#include <google/protobuf/stubs/common.h>

#include <fstream>
#include <random>

#include "absl/strings/escaping.h"

#include "client/client.h"
#include "tests/test_util.h"

namespace rapidin::client {
namespace {

// InvalidUtf8At agrees with protobuf's own check (what its parser refuses) on every 1- and 2-byte string, on
// every 3-byte string that starts with a lead byte, and on random longer strings; it points at the first bad byte.
TEST(Utf8, AgreesWithProtobufAndFindsTheFirstBadByte) {
  auto agree = [](const std::string& s) {
    const bool ours = InvalidUtf8At(s) == std::string_view::npos;
    ASSERT_EQ(ours, google::protobuf::internal::IsStructurallyValidUTF8(s.data(), static_cast<int>(s.size())))
        << absl::CHexEscape(s);
    if (!ours) {  // everything before the reported byte is valid, and the byte itself starts no valid sequence
      const size_t at = InvalidUtf8At(s);
      EXPECT_EQ(InvalidUtf8At(s.substr(0, at)), std::string_view::npos) << absl::CHexEscape(s);
    }
  };
  for (int a = 0; a < 256; ++a) {
    agree(std::string(1, static_cast<char>(a)));
    for (int b = 0; b < 256; ++b) {
      agree(std::string{static_cast<char>(a), static_cast<char>(b)});
      if (a >= 0xC0) {
        for (int c = 0x70; c < 0xC8; ++c) agree(std::string{static_cast<char>(a), static_cast<char>(b), static_cast<char>(c)});
      }
    }
  }
  std::mt19937_64 rng(std::random_device{}());
  const char* pieces[] = {"a", "\xc3\xa9", "\xe2\x9c\x93", "\xf0\x9f\x98\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xc0\xaf"};
  for (int i = 0; i < 20000; ++i) {
    std::string s;
    for (int j = 0, n = rng() % 8; j < n; ++j) s += rng() % 4 ? pieces[rng() % 7] : std::string(1, static_cast<char>(rng()));
    agree(s);
  }
  EXPECT_EQ(InvalidUtf8At("caf\xc3\xa9 ok"), std::string_view::npos);
  EXPECT_EQ(InvalidUtf8At("caf\xe9"), 3u);
  EXPECT_EQ(InvalidUtf8At("ab\xf0\x9f\x98"), 2u);  // cut short
}

// CheckUtf8 names the field, through nested and repeated messages and maps.
TEST(Utf8, CheckUtf8NamesTheField) {
  rapidin::v1::IngestRequest b;
  b.add_records()->mutable_record()->set_id("fine");
  auto* r = b.add_records()->mutable_record();
  r->set_id("also fine \xc3\xa9");
  EXPECT_TRUE(CheckUtf8(b).ok());
  r->set_output("bad \xff here");
  absl::Status st = CheckUtf8(b);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("records[1].record.output is not valid UTF-8 (byte 4)"), std::string::npos) << st;
  r->set_output("");
  (*r->mutable_metadata())["k"] = "\xe9";
  st = CheckUtf8(b);
  EXPECT_NE(st.message().find("records[1].record.metadata[0].value"), std::string::npos) << st;
  rapidin::v1::QueryRequest q;
  q.set_generation("ok");
  q.add_hotwords("ok");
  q.add_hotwords("caf\xe9");
  EXPECT_NE(CheckUtf8(q).message().find("hotwords[1] is not valid UTF-8 (byte 3)"), std::string::npos);
}

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
