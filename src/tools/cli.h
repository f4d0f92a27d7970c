// Internal to the ftcomm tool and benchmarks: CLI11 helpers for range checks
// with plain messages, and one way to turn a parse error into a message that
// names the option and what it accepts.
#pragma once

#include <cerrno>
#include <cmath>
#include <iostream>
#include <sstream>
#include <cstdlib>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include "log.h"

namespace ftcomm::cli {

// A finite number in [lo, hi] (or (lo, hi] with lo_open); the description says
// what it is in messages and in --help.
inline CLI::Validator number_in(double lo, double hi, bool lo_open = false) {
  auto show = [](double v) {
    std::ostringstream s;
    s << v;
    return s.str();
  };
  const std::string range = (lo_open ? "(" : "[") + show(lo) + ", " + show(hi) + "]";
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0' || !std::isfinite(v)) return "'" + text + "' is not a finite number";
        if (v < lo || v > hi || (lo_open && v == lo)) return "'" + text + "' is outside " + range;
        return std::string();
      },
      "in " + range);
}

// A whole number in [lo, hi] ("1e3", "5abc" and "2.5" are not).
inline CLI::Validator integer_in(long long lo, long long hi) {
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        char* end = nullptr;
        errno = 0;
        const long long v = std::strtoll(text.c_str(), &end, 10);
        if (end == text.c_str() || *end != '\0' || errno == ERANGE) return "'" + text + "' is not a whole number";
        if (v < lo || v > hi) return "'" + text + "' is outside " + range;
        return std::string();
      },
      "in " + range);
}

// "k=v": the hook's parameter settings.
inline std::pair<std::string, std::string> split_kv(const std::string& option, const std::string& kv) {
  const auto eq = kv.find('=');
  if (eq == std::string::npos || eq == 0) throw CLI::ValidationError(option, "takes k=v, got '" + kv + "'");
  return {kv.substr(0, eq), kv.substr(eq + 1)};
}

// Parses; on a bad command line prints one message naming the option and what it
// accepts, and returns the exit code (2), or 0 after --help. -1: go on.
inline int parse(CLI::App& app, const std::vector<std::string>& args, const std::string& tool) {
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::ParseError& e) {
    std::string message = e.what();
    // "Could not convert: --seed = 1e3": say what the option takes.
    for (const CLI::Option* o : app.get_options()) {
      for (const auto& name : o->get_lnames()) {
        if (message.find("--" + name + " = ") != std::string::npos ||
            message.rfind("--" + name + ":", 0) == 0) {
          message += " (--" + name + " takes " + o->get_type_name() + ")";
          break;
        }
      }
    }
    std::cerr << tool << ": " << message << "\nRun '" << tool << " --help' for the options.\n";
    return 2;
  }
  return -1;
}

// Reports a failed command in one line (ranks share torchrun's stderr) and exits
// at once, without unwinding: a hook thread that never returned cannot be
// joined, and a process group's destructor can block (NCCL) before the message
// is out, while torchrun stops the other ranks as soon as one exits. The store
// needs no shutdown: it is crash-safe (an unfinished snapshot is collected on the
// next open).
[[noreturn]] inline void exit_with_error(const std::string& command, const std::exception& e) {
  std::string what = e.what();
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) what = c10_error->what_without_backtrace();
  std::string rank;
  if (const char* r = std::getenv("RANK")) rank = std::string(" (rank ") + r + ")";
  std::fflush(stdout);
  detail::log_line("ftcomm " + command + rank + ": " + what);
  std::_Exit(1);
}

}  // namespace ftcomm::cli
