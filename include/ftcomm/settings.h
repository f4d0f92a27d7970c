// How a run's settings are written down: the trainer's settings that change the
// result (learning rate, batch, model, ...) and a hook's parameters are recorded
// with every commit as text, and a resume compares them as text.
#pragma once

#include <string>

namespace ftcomm {

// The shortest text that reads back as `v` (6 to 17 significant digits).
std::string format_setting(double v);

}  // namespace ftcomm
