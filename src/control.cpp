#include "control.h"

#include <algorithm>
#include <cstring>

#include <ATen/ATen.h>

namespace ftcomm::control {
namespace {

at::Tensor on(const at::Tensor& host, const Options& o) {
  return o.device.is_cpu() ? host : host.to(o.device);
}

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor host = t.to(at::kCPU).contiguous();
  return std::vector<int64_t>(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + host.numel());
}

// A group of one rank decides alone: no collective, no hand-off to the
// backend's threads (a per-step agreement at world 1 paid one every step).
bool alone(const Group& pg) {
  return pg->getSize() == 1;
}

template <typename T>
T max_of(const Group& pg, T value, at::ScalarType dtype, const Options& o) {
  if (alone(pg)) return value;
  std::vector<at::Tensor> list{on(at::full({1}, value, at::TensorOptions().dtype(dtype)), o)};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::MAX;
  if (o.timeout.count() > 0) options.timeout = o.timeout;
  pg->allreduce(list, options)->wait(o.timeout);
  return list[0].to(at::kCPU).item<T>();
}

void broadcast_in_place(const Group& pg, at::Tensor& t, int root, const Options& o) {
  if (alone(pg)) return;
  std::vector<at::Tensor> list{t};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  if (o.timeout.count() > 0) options.timeout = o.timeout;
  pg->broadcast(list, options)->wait(o.timeout);
}

}  // namespace

int64_t max(const Group& pg, int64_t value, const Options& o) {
  return max_of<int64_t>(pg, value, at::kLong, o);
}

double max(const Group& pg, double value, const Options& o) {
  return max_of<double>(pg, value, at::kDouble, o);
}

std::vector<std::vector<int64_t>> allgather(const Group& pg, const std::vector<int64_t>& values, const Options& o) {
  if (alone(pg)) return {values};
  const auto n = static_cast<int64_t>(values.size());
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < pg->getSize(); ++r) out[0].push_back(on(at::empty({n}, at::kLong), o));
  std::vector<at::Tensor> in{on(at::tensor(values, at::kLong), o)};
  c10d::AllgatherOptions options;
  if (o.timeout.count() > 0) options.timeout = o.timeout;
  pg->allgather(out, in, options)->wait(o.timeout);
  std::vector<std::vector<int64_t>> all;
  for (const auto& t : out[0]) all.push_back(to_vector(t));
  return all;
}

std::vector<int64_t> allgather(const Group& pg, int64_t value, const Options& o) {
  std::vector<int64_t> values;
  for (const auto& v : allgather(pg, std::vector<int64_t>{value}, o)) values.push_back(v[0]);
  return values;
}

std::vector<int64_t> broadcast_fixed(const Group& pg, const std::vector<int64_t>& values, int root, const Options& o) {
  at::Tensor data = on(at::tensor(values, at::kLong), o);
  broadcast_in_place(pg, data, root, o);
  return to_vector(data);
}

// How many items the root sends (every rank learns it first).
int64_t broadcast_count(const Group& pg, size_t count, int root, const Options& o) {
  return broadcast_fixed(pg, {static_cast<int64_t>(pg->getRank() == root ? count : 0)}, root, o)[0];
}

std::vector<int64_t> broadcast(const Group& pg, const std::vector<int64_t>& values, int root, const Options& o) {
  const bool is_root = pg->getRank() == root;
  const int64_t n = broadcast_count(pg, values.size(), root, o);
  at::Tensor data = on(is_root ? at::tensor(values, at::kLong) : at::empty({n}, at::kLong), o);
  if (n > 0) broadcast_in_place(pg, data, root, o);
  return to_vector(data);
}

std::string broadcast_bytes(const Group& pg, const std::string& bytes, int root, const Options& o) {
  const bool is_root = pg->getRank() == root;
  const int64_t n = broadcast_count(pg, bytes.size(), root, o);
  at::Tensor host = at::empty({n}, at::kByte);
  if (is_root && n > 0) std::memcpy(host.data_ptr(), bytes.data(), static_cast<size_t>(n));
  at::Tensor data = on(host, o);
  if (n > 0) broadcast_in_place(pg, data, root, o);
  const at::Tensor back = data.to(at::kCPU);
  return std::string(static_cast<const char*>(back.data_ptr()), static_cast<size_t>(n));
}

std::vector<std::string> allgather_bytes(const Group& pg, const std::string& bytes, const Options& o) {
  // Lengths first, then every rank's bytes padded to the longest.
  const auto lengths = allgather(pg, static_cast<int64_t>(bytes.size()), o);
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  if (alone(pg)) return {bytes};
  at::Tensor mine = at::zeros({longest}, at::kByte);
  if (!bytes.empty()) std::memcpy(mine.data_ptr(), bytes.data(), bytes.size());
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < pg->getSize(); ++r) out[0].push_back(on(at::empty({longest}, at::kByte), o));
  std::vector<at::Tensor> in{on(mine, o)};
  c10d::AllgatherOptions options;
  if (o.timeout.count() > 0) options.timeout = o.timeout;
  if (longest > 0) pg->allgather(out, in, options)->wait(o.timeout);
  std::vector<std::string> all;
  for (int r = 0; r < pg->getSize(); ++r) {
    const at::Tensor host = out[0][r].to(at::kCPU);
    all.emplace_back(static_cast<const char*>(host.data_ptr()), static_cast<size_t>(lengths[r]));
  }
  return all;
}

std::optional<std::string> first_error(const Group& pg, const std::string& error, const Options& o) {
  const auto failed = allgather(pg, int64_t(error.empty() ? 0 : 1), o);
  if (std::none_of(failed.begin(), failed.end(), [](int64_t f) { return f != 0; })) return std::nullopt;
  // Some rank refused: the texts travel so that every rank reports the cause.
  const auto texts = allgather_bytes(pg, error, o);
  if (!error.empty()) return error;
  for (size_t r = 0; r < texts.size(); ++r) {
    if (!texts[r].empty()) return texts[r] + " (decided on rank " + std::to_string(r) + ")";
  }
  return std::nullopt;  // not reached: some rank had a text
}

void throw_if_any(const Group& pg, const std::string& error, const Options& o) {
  if (auto why = first_error(pg, error, o)) TORCH_CHECK(false, *why);
}

}  // namespace ftcomm::control
