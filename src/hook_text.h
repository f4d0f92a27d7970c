// Internal: the text of errors from TorchScript hooks.
#pragma once

#include <sstream>
#include <string>

namespace ftcomm::detail {

// The line that says what went wrong in a TorchScript exception: the
// interpreter puts the raised message last ("builtins.Exception: boom").
inline std::string script_error(const std::string& what) {
  std::istringstream in(what.substr(0, what.find("\nException raised from")));
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t") != std::string::npos) last = line;
  }
  return last.empty() ? what : last;
}

// The first line of a multi-line message.
inline std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

}  // namespace ftcomm::detail
