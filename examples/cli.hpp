#pragma once
// Command-line parsing shared by the example programs: numbers that must be whole and in range,
// with errors (mla::Error) that name the flag.

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "mla/error.hpp"

namespace cli {

/// `text` as an integer; throws mla::Error naming `flag` unless the whole text is one.
inline long long parse_integer(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  mla::detail::require(used == text.size() && !text.empty(), flag, " needs an integer, got '", text,
                       "'");
  return v;
}

/// `text` as a finite number; throws mla::Error naming `flag` unless the whole text is one.
inline double parse_number(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  mla::detail::require(used == text.size() && !text.empty() && std::isfinite(v), flag,
                       " needs a number, got '", text, "'");
  return v;
}

/// The command line as (flag, value) pairs: every option takes a value. Throws mla::Error for a
/// flag without one or a stray argument, with the usage line.
inline std::vector<std::pair<std::string, std::string>> options(int argc, char** argv,
                                                                const char* usage) {
  std::vector<std::pair<std::string, std::string>> out;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    mla::detail::require(
        i + 1 < argc,
        flag.rfind("--", 0) == 0 ? flag + " needs a value" : "unexpected argument '" + flag + "'",
        "\n", usage);
    out.emplace_back(flag, argv[++i]);
  }
  return out;
}

/// True when the command line asks for help (--help or -h anywhere).
inline bool wants_help(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return true;
  }
  return false;
}

/// Prints `help` to stdout and returns 0 when the command line asks for it; otherwise runs
/// run(parse(argc, argv)) and on any exception prints `error: <what>` to stderr and returns 1.
template <class Parse, class Run>
int main(int argc, char** argv, const char* help, Parse parse, Run run) {
  if (wants_help(argc, argv)) {
    std::fputs(help, stdout);
    return 0;
  }
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

}  // namespace cli
