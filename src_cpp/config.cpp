// config.cpp: the MTIA_ALLOC_CONF tokenizer and parser (allocator_core.md §10).
// Relies on: config.h and errors.h.
#include "config.h"

#include <cctype>
#include <cstdlib>
#include <vector>

#include "errors.h"

namespace mtia {
namespace {

// Splits on , : [ ] (kept as tokens) and drops all white space, like c10's ConfigTokenizer.
class Tokenizer {
 public:
  explicit Tokenizer(const std::string& s) {
    std::string cur;
    for (char c : s) {
      if (std::isspace(static_cast<unsigned char>(c))) continue;
      if (c == ',' || c == ':' || c == '[' || c == ']') {
        if (!cur.empty()) tokens_.push_back(cur), cur.clear();
        tokens_.push_back(std::string(1, c));
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) tokens_.push_back(cur);
  }
  size_t size() const { return tokens_.size(); }
  const std::string& operator[](size_t i) const {
    if (i >= tokens_.size()) throw InvalidState("Index out of bounds in ConfigTokenizer");
    return tokens_[i];
  }
  void expect(size_t i, const char* tok) const {
    if ((*this)[i] != tok)
      throw InvalidState("Error parsing CachingAllocator settings, expected " + std::string(tok) +
                         " at index " + std::to_string(i) + " but got '" + (*this)[i] + "'");
  }
  size_t to_size(size_t i) const {
    const std::string& t = (*this)[i];
    if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos || t.size() > 18)
      throw InvalidState("Expected a non-negative integer at index " + std::to_string(i) +
                         " in ConfigTokenizer but got '" + t + "'");
    return std::strtoull(t.c_str(), nullptr, 10);
  }
  double to_double(size_t i) const {
    const std::string& t = (*this)[i];
    char* end = nullptr;
    double v = std::strtod(t.c_str(), &end);
    if (t.empty() || *end != '\0')
      throw InvalidState("Expected a number at index " + std::to_string(i) +
                         " in ConfigTokenizer but got '" + t + "'");
    return v;
  }
  bool to_bool(size_t i) const {
    const std::string& t = (*this)[i];
    if (t == "True") return true;
    if (t == "False") return false;
    throw InvalidArgument("Expected 'True' or 'False' at index " + std::to_string(i) +
                          " in ConfigTokenizer but got '" + t + "'");
  }

 private:
  std::vector<std::string> tokens_;
};

bool is_pow2(size_t v) { return v && (v & (v - 1)) == 0; }

void check_divisions(size_t v) {
  if (v != 0 && !is_pow2(v))
    throw InvalidState("For roundups, the divisions has to be power of 2 or 0 to disable roundup");
}

// Parses the value of roundup_power2_divisions starting at token i; returns the last index used.
size_t parse_roundup(const Tokenizer& tk, size_t i, AllocatorConfig& c) {
  if (tk[i] != "[") {
    size_t v = tk.to_size(i);
    check_divisions(v);
    c.roundup_power2_divisions.fill(v);
    return i;
  }
  bool first = true;
  size_t last_index = 0;
  ++i;
  while (true) {
    if (i >= tk.size())
      throw InvalidState("Expected closing bracket ']' in ConfigTokenizer but reached end of config");
    if (tk[i] == "]") return i;
    const std::string key = tk[i];
    tk.expect(i + 1, ":");
    size_t value = tk.to_size(i + 2);
    check_divisions(value);
    if (key == ">") {
      for (size_t k = last_index + 1; k < c.roundup_power2_divisions.size(); ++k)
        c.roundup_power2_divisions[k] = value;
    } else {
      size_t mb = tk.to_size(i);
      if (!is_pow2(mb)) throw InvalidState("For roundups, the intervals have to be power of 2");
      size_t index = size_t(63 - __builtin_clzll(mb));
      if (index >= c.roundup_power2_divisions.size()) index = c.roundup_power2_divisions.size() - 1;
      if (first) {
        for (size_t k = 0; k < index; ++k) c.roundup_power2_divisions[k] = value;
        first = false;
      }
      c.roundup_power2_divisions[index] = value;
      last_index = index;
    }
    i += 3;
    if (i < tk.size() && tk[i] == ",") ++i;
  }
}

}  // namespace

void AllocatorConfig::parse(const std::string& conf) {
  AllocatorConfig c = *this;  // parse into a copy: an error leaves *this unchanged
  c.max_split_size = kUnlimited;
  c.roundup_power2_divisions.fill(0);
  c.garbage_collection_threshold = 0.0;
  Tokenizer tk(conf);
  for (size_t i = 0; i < tk.size(); ++i) {
    const std::string& key = tk[i];
    if (key == ",") continue;
    tk.expect(i + 1, ":");
    size_t v = i + 2;
    if (key == "max_split_size_mb") {
      size_t mb = tk.to_size(v);
      if (mb < 20) throw InvalidState("CachingAllocator option max_split_size_mb too small, must be >= 20");
      c.max_split_size = mb * 1048576;
    } else if (key == "max_non_split_rounding_mb") {
      size_t mb = tk.to_size(v);
      if (mb < 20)
        throw InvalidState("CachingAllocator option max_non_split_rounding_mb too small, must be >= 20");
      c.max_non_split_rounding_size = mb * 1048576;
    } else if (key == "roundup_power2_divisions") {
      v = parse_roundup(tk, v, c);
    } else if (key == "garbage_collection_threshold") {
      double t = tk.to_double(v);
      if (!(t > 0.0 && t < 1.0))
        throw InvalidState("garbage_collect_threshold is invalid, set it in (0.0, 1.0)");
      c.garbage_collection_threshold = t;
    } else if (key == "expandable_segments") {
      c.expandable_segments = tk.to_bool(v);
    } else if (key == "release_lock_on_cudamalloc") {
      c.release_lock_on_cudamalloc = tk.to_bool(v);
    } else if (key == "graph_capture_record_stream_reuse") {
      c.graph_capture_record_stream_reuse = tk.to_bool(v);
    } else if (key == "per_process_memory_fraction") {
      double f = tk.to_double(v);
      if (!(f >= 0.0 && f <= 1.0))
        throw InvalidState("invalid fraction:" + tk[v] + ". Please set within [0, 1].");
      c.per_process_memory_fraction = f;
    } else if (key == "backend") {
      if (tk[v] != "native")
        throw InvalidState("Unknown allocator backend '" + tk[v] + "': mtia_alloc has only 'native'");
    } else {
      throw InvalidState("Unrecognized key '" + key + "' in Accelerator allocator config.");
    }
    i = v;
    if (i + 1 < tk.size() && tk[i + 1] != ",")
      throw InvalidState("Error parsing CachingAllocator settings, expected , at index " +
                         std::to_string(i + 1) + " but got '" + tk[i + 1] + "'");
  }
  c.any_roundup_divisions = false;
  for (size_t d : c.roundup_power2_divisions) c.any_roundup_divisions |= d > 1;
  c.last_settings = conf;
  *this = c;
}

}  // namespace mtia
