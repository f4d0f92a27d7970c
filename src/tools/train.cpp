// `ftcomm train`: one rank of fault-tolerant data-parallel training. Launch under
// torchrun --no-python (restarts, rendezvous); with no torchrun environment it
// runs as world size 1.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ftcomm/ddp.h"
#include "ftcomm/process_group.h"
#include <torch/csrc/distributed/c10d/HashStore.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct TrainArgs {
  std::string model = "mlp";
  int64_t steps = 100, batch = 32, seed = 0;
  double lr = 0.05, momentum = 0.9;
  std::string hook = "allreduce";
  std::vector<std::pair<std::string, std::string>> hook_args;
  std::string ckpt;
  int commit_every = 10;
  std::string backend = "auto";
  double bucket_mb = 1;
  struct Failure {
    int rank;
    int64_t step;
    std::string phase;
    int64_t attempt;
  };
  std::vector<Failure> failures;
  std::string summary;
  int log_every = 10;
};

constexpr const char* kTrainUsage = R"(Usage: ftcomm train [options]
  --model mlp             the model (an MLP on a synthetic regression task)
  --steps N               total step target; a restarted job resumes from its newest commit (default 100)
  --batch B --lr X --seed S
  --hook NAME|FILE        comm hook (default allreduce); --hook-arg k=v sets its parameters
  --ckpt DIR              checkpoint stores, one per rank under DIR/rank<R>
  --commit-every K        snapshot every K steps (default 10)
  --backend auto|gloo|nccl  --bucket-mb X
  --fail-at RANK:STEP[:PHASE][@ATTEMPT]
                          SIGKILL that rank at that step of torchrun attempt ATTEMPT (default 0,
                          the first); PHASE is forward, backward (default), hook, commit, or
                          resync (during recovery at start-up; STEP is ignored). Repeatable.
  --summary-json FILE     written by rank 0 at the end
)";

TrainArgs parse_train(const std::vector<std::string>& args) {
  TrainArgs a;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& k = args[i];
    auto v = [&]() -> std::string {
      if (i + 1 >= args.size()) throw std::invalid_argument(k + " needs a value");
      return args[++i];
    };
    if (k == "--model") a.model = v();
    else if (k == "--steps") a.steps = std::stoll(v());
    else if (k == "--batch") a.batch = std::stoll(v());
    else if (k == "--seed") a.seed = std::stoll(v());
    else if (k == "--lr") a.lr = std::stod(v());
    else if (k == "--hook") a.hook = v();
    else if (k == "--hook-arg") {
      const std::string kv = v();
      const auto eq = kv.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("--hook-arg takes k=v, got '" + kv + "'");
      a.hook_args.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else if (k == "--ckpt") a.ckpt = v();
    else if (k == "--commit-every") a.commit_every = std::stoi(v());
    else if (k == "--backend") a.backend = v();
    else if (k == "--bucket-mb") a.bucket_mb = std::stod(v());
    else if (k == "--summary-json") a.summary = v();
    else if (k == "--log-every") a.log_every = std::stoi(v());
    else if (k == "--fail-at") {
      // RANK:STEP[:PHASE][@ATTEMPT]; the attempt is torchrun's restart count (default 0).
      std::string spec = v();
      TrainArgs::Failure f{0, 0, "backward", 0};
      const auto at = spec.find('@');
      if (at != std::string::npos) {
        f.attempt = std::stoll(spec.substr(at + 1));
        spec = spec.substr(0, at);
      }
      const auto c1 = spec.find(':');
      if (c1 == std::string::npos) throw std::invalid_argument("--fail-at takes RANK:STEP[:PHASE][@ATTEMPT], got '" + spec + "'");
      const auto c2 = spec.find(':', c1 + 1);
      f.rank = std::stoi(spec.substr(0, c1));
      f.step = std::stoll(spec.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1));
      if (c2 != std::string::npos) f.phase = spec.substr(c2 + 1);
      if (f.phase != "forward" && f.phase != "backward" && f.phase != "hook" && f.phase != "commit" &&
          f.phase != "resync") {
        throw std::invalid_argument("--fail-at phase '" + f.phase + "' is not one of forward, backward, hook, commit, resync");
      }
      a.failures.push_back(f);
    } else if (k == "--help" || k == "-h") {
      std::cout << kTrainUsage;
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option '" + k + "' for train");
    }
  }
  if (a.model != "mlp") throw std::invalid_argument("unknown --model '" + a.model + "'; this build has: mlp");
  if (a.steps < 1 || a.batch < 1) throw std::invalid_argument("--steps and --batch must be at least 1");
  return a;
}

}  // namespace

int train_main(const std::vector<std::string>& argv) {
  const TrainArgs args = parse_train(argv);
  ftcomm::ProcessGroupOptions pgo = ftcomm::process_group_options_from_env();
  pgo.backend = ftcomm::parse_backend(args.backend);
  if (!ftcomm::launched_by_torchrun()) {
    pgo.store = ftcomm::StoreKind::kCustom;  // world size 1: an in-memory store
    pgo.custom_store = c10::make_intrusive<c10d::HashStore>();
  }
  at::set_num_threads(1);
  auto pg = ftcomm::make_process_group(pgo);
  const int rank = pg->getRank(), world = pg->getSize();
  auto maybe_fail = [&](int64_t step, const std::string& phase) {
    for (const auto& f : args.failures) {
      if (f.attempt == pgo.restart_count && f.rank == rank && f.phase == phase && (phase == "resync" || f.step == step)) {
        std::cerr << "ftcomm train: rank " << rank << ": injected failure at step " << step << " (" << phase
                  << ", attempt " << pgo.restart_count << ")\n";
        ::kill(::getpid(), SIGKILL);
      }
    }
  };

  // The model: an MLP; its teacher is a fixed random network (same on every rank).
  const std::vector<int64_t> widths{64, 256, 256, 16};
  std::vector<at::Tensor> params, momentum;
  auto init = at::make_generator<at::CPUGeneratorImpl>(1000 + args.seed);
  for (size_t i = 0; i + 1 < widths.size(); ++i) {
    params.push_back((at::randn({widths[i], widths[i + 1]}, init) / std::sqrt(double(widths[i]))).requires_grad_());
    params.push_back(at::zeros({widths[i + 1]}).requires_grad_());
  }
  for (const auto& p : params) momentum.push_back(at::zeros_like(p));
  const at::Tensor teacher = at::randn({widths.front(), widths.back()}, init);

  ftcomm::DdpOptions options;
  options.bucket_bytes = static_cast<int64_t>(args.bucket_mb * (1 << 20));
  options.hook = args.hook;
  options.hook_args = args.hook_args;
  options.commit_every = args.commit_every;
  options.job_id = "train-mlp-seed" + std::to_string(args.seed);
  if (!args.ckpt.empty()) options.ckpt_dir = args.ckpt + "/rank" + std::to_string(rank);
  options.on_phase = [&](const std::string& phase) { maybe_fail(-1, phase); };
  ftcomm::DistributedDataParallel ddp(pg, params, momentum, options);
  const auto restart_t0 = Clock::now();
  const auto report = ddp.recover();
  const int64_t start = std::max<int64_t>(0, report.resumed_from_step);
  if (rank == 0) {
    if (report.resumed_from_step >= 0) {
      std::printf("ftcomm train: resumed from step %lld (agreement %.1f ms, load %.1f ms, resync %.1f ms, %lld bytes "
                  "to %zu ranks); rank-local hook state: %s\n",
                  static_cast<long long>(report.resumed_from_step), report.agreement_ms, report.load_ms,
                  report.resync_ms, static_cast<long long>(report.resync_bytes), report.resynced_ranks.size(),
                  report.local_state.c_str());
    } else {
      std::printf("ftcomm train: starting at step 0, world %d, hook %s\n", world, ddp.hook()->name().c_str());
    }
    std::fflush(stdout);
  }
  double loss_last = 0;
  double first_step_ms = 0;
  const auto train_t0 = Clock::now();
  auto t_log = Clock::now();
  for (int64_t step = start; step < args.steps; ++step) {
    const auto t_step = Clock::now();
    auto gen = at::make_generator<at::CPUGeneratorImpl>(args.seed * 1000003 + step * 131 + rank);
    const at::Tensor x = at::randn({args.batch, widths.front()}, gen);
    const at::Tensor y = at::tanh(at::mm(x, teacher) / 8.0);
    for (auto& p : params) {
      if (p.grad().defined()) p.mutable_grad().zero_();
    }
    maybe_fail(step + 1, "forward");
    ddp.before_forward();
    at::Tensor h = x;
    for (size_t i = 0; i < params.size(); i += 2) {
      h = at::addmm(params[i + 1], h, params[i]);
      if (i + 2 < params.size()) h = at::relu(h);
    }
    const at::Tensor loss = (h - y).pow(2).mean();
    maybe_fail(step + 1, "backward");
    ddp.before_backward(loss);
    maybe_fail(step + 1, "hook");  // the hook runs during backward; dying here kills it mid-collective for peers
    loss.backward();
    {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) {
        momentum[i].mul_(args.momentum).add_(params[i].grad());
        params[i].sub_(momentum[i] * args.lr);
      }
    }
    loss_last = loss.item<double>();
    ddp.after_step(step + 1, (step + 1) * args.batch * world);
    maybe_fail(step + 1, "commit");
    if (step == start) first_step_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_step).count();
    if (rank == 0 && args.log_every > 0 && ((step + 1) % args.log_every == 0 || step + 1 == args.steps)) {
      const double s = std::chrono::duration<double>(Clock::now() - t_log).count();
      std::printf("step %lld/%lld loss %.6f samples/s %.0f\n", static_cast<long long>(step + 1),
                  static_cast<long long>(args.steps), loss_last, args.log_every * args.batch * world / std::max(s, 1e-9));
      std::fflush(stdout);
      t_log = Clock::now();
    }
  }
  ddp.flush();
  const std::string digest = ftcomm::tensors_digest(params);
  if (rank == 0 && !args.summary.empty()) {
    std::ofstream out(args.summary);
    out << "{\"steps\": " << args.steps << ", \"world_size\": " << world << ", \"restarts\": " << pgo.restart_count
        << ", \"resumed_from_step\": " << report.resumed_from_step << ", \"param_digest\": \"" << digest
        << "\", \"loss_last\": " << loss_last << ", \"recovery_ms\": {\"agreement\": " << report.agreement_ms
        << ", \"load\": " << report.load_ms << ", \"resync\": " << report.resync_ms
        << ", \"first_step\": " << first_step_ms << ", \"since_start\": "
        << std::chrono::duration<double, std::milli>(Clock::now() - restart_t0).count()
        << "}, \"train_ms\": " << std::chrono::duration<double, std::milli>(Clock::now() - train_t0).count()
        << ", \"resync_bytes\": " << report.resync_bytes << ", \"hook\": \"" << ddp.hook()->name() << "\"}\n";
  }
  if (rank == 0) std::printf("ftcomm train: done, %lld steps, param digest %s\n", static_cast<long long>(args.steps), digest.c_str());
  return 0;
}
