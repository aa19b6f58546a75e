// A small JSON reader for the exported model's metadata (what Python's json.dumps writes). Internal.
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <locale>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "hessforge/core.h"

namespace hessforge {
namespace json {

struct Value {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  const Value* get(const std::string& key) const {
    if (type != Object) return nullptr;
    auto it = object.find(key);
    return it == object.end() ? nullptr : &it->second;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = value();
    ws();
    if (pos_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw Error("invalid JSON metadata (" + what + " at offset " + std::to_string(pos_) + ")");
  }
  void ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' || s_[pos_] == '\r')) ++pos_;
  }
  char peek() {
    ws();
    if (pos_ >= s_.size()) fail("unexpected end");
    return s_[pos_];
  }
  void expect(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *c) fail(std::string("expected ") + word);
  }
  Value value() {
    Value v;
    const char c = peek();
    if (c == '{') {
      v.type = Value::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a key");
        std::string key = str();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        v.object[key] = value();
        const char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.type = Value::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array.push_back(value());
        const char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.type = Value::String;
      v.string = str();
    } else if (c == 't') {
      expect("true");
      v.type = Value::Bool;
      v.boolean = true;
    } else if (c == 'f') {
      expect("false");
      v.type = Value::Bool;
    } else if (c == 'n') {
      expect("null");
    } else if (c == 'N') {
      expect("NaN");
      v.type = Value::Number;
      v.number = std::nan("");
    } else {
      // Read in the "C" locale: strtod follows LC_NUMERIC, and a host program in a comma-decimal locale
      // (de_DE) made every model's metadata unreadable.
      auto numeric = [](char ch) { return ch != '\0' && std::strchr("+-0123456789.eE", ch) != nullptr; };
      size_t end = pos_;
      while (end < s_.size() && numeric(s_[end])) ++end;
      const std::string token = s_.substr(pos_, end - pos_);
      if ((token.empty() || token == "-") && s_.compare(end, 8, "Infinity") == 0) {  // Python's json writes these
        v.number = token.empty() ? HUGE_VAL : -HUGE_VAL;
        end += 8;
      } else {
        std::istringstream in(token);
        in.imbue(std::locale::classic());
        char extra;
        if (token.empty() || !(in >> v.number) || (in >> extra)) fail("unexpected character");
      }
      v.type = Value::Number;
      pos_ = end;
    }
    return v;
  }
  static void utf8(unsigned code, std::string& out) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }
  std::string str() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') break;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (pos_ + 4 > s_.size()) fail("bad \\u escape");
          unsigned code = static_cast<unsigned>(std::strtoul(s_.substr(pos_, 4).c_str(), nullptr, 16));
          pos_ += 4;
          utf8(code, out);  // surrogate pairs are not needed for our metadata; kept as two code units
          break;
        }
        default: out += e;
      }
    }
    return out;
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

}  // namespace json
}  // namespace hessforge
