#include "agent/rollout.h"

#include "common/error.h"

namespace attnpilot::agent {

RolloutBuffer::RolloutBuffer(int64_t steps_, int64_t envs_, const std::vector<int64_t>& obs_shape,
                             int64_t action_dims, int64_t mask_size)
    : steps(steps_), envs(envs_) {
  ATTNPILOT_CHECK_ARG(steps > 0 && envs > 0, "RolloutBuffer: steps {} and envs {} must be > 0",
                      steps, envs);
  std::vector<int64_t> s{steps, envs};
  auto os = s;
  os.insert(os.end(), obs_shape.begin(), obs_shape.end());
  obs = torch::zeros(os, torch::kFloat32);
  actions = action_dims == 0 ? torch::zeros(s, torch::kInt64)
                             : torch::zeros({steps, envs, action_dims}, torch::kInt64);
  logprobs = torch::zeros(s, torch::kFloat32);
  rewards = torch::zeros(s, torch::kFloat32);
  dones = torch::zeros(s, torch::kFloat32);
  values = torch::zeros(s, torch::kFloat32);
  if (mask_size > 0) masks = torch::ones({steps, envs, mask_size}, torch::kBool);
}

torch::Tensor compute_gae(const torch::Tensor& rewards, const torch::Tensor& values,
                          const torch::Tensor& dones, const torch::Tensor& next_value, double gamma,
                          double lambda) {
  ATTNPILOT_CHECK_ARG(rewards.dim() == 2 && values.sizes() == rewards.sizes() &&
                          dones.sizes() == rewards.sizes() && next_value.dim() == 1 &&
                          next_value.size(0) == rewards.size(1),
                      "compute_gae: rewards/values/dones must be [T, N] and next_value [N], got "
                      "{} {} {} {}",
                      c10::str(rewards.sizes()), c10::str(values.sizes()), c10::str(dones.sizes()),
                      c10::str(next_value.sizes()));
  const int64_t T = rewards.size(0), N = rewards.size(1);
  auto r = rewards.to(torch::kFloat32).contiguous();
  auto v = values.to(torch::kFloat32).contiguous();
  auto d = dones.to(torch::kFloat32).contiguous();
  auto nv = next_value.to(torch::kFloat32).contiguous();
  auto adv = torch::zeros({T, N}, torch::kFloat32);
  const float *pr = r.data_ptr<float>(), *pv = v.data_ptr<float>(), *pd = d.data_ptr<float>();
  float* pa = adv.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i) {
    double last = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t k = t * N + i;
      const double next_v = t == T - 1 ? nv.data_ptr<float>()[i] : pv[k + N];
      const double nonterminal = 1.0 - pd[k];
      const double delta = pr[k] + gamma * next_v * nonterminal - pv[k];
      last = delta + gamma * lambda * nonterminal * last;
      pa[k] = static_cast<float>(last);
    }
  }
  return adv;
}

Batch make_batch(const RolloutBuffer& buf, const torch::Tensor& next_value, double gamma,
                 double lambda) {
  auto adv = compute_gae(buf.rewards, buf.values, buf.dones, next_value, gamma, lambda);
  const int64_t m = buf.steps * buf.envs;
  Batch b;
  auto obs_shape = buf.obs.sizes().vec();
  obs_shape.erase(obs_shape.begin());
  obs_shape[0] = m;
  b.obs = buf.obs.reshape(obs_shape);
  b.actions = buf.actions.dim() == 2 ? buf.actions.reshape({m})
                                     : buf.actions.reshape({m, buf.actions.size(2)});
  b.logprobs = buf.logprobs.reshape({m});
  b.values = buf.values.reshape({m});
  b.advantages = adv.reshape({m});
  b.returns = b.advantages + b.values;
  if (buf.masks.defined()) b.masks = buf.masks.reshape({m, buf.masks.size(2)});
  return b;
}

}  // namespace attnpilot::agent
