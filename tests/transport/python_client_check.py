"""Drives `attnpilot env-server` from Python through attnpilot_client.RemoteEnv.

1. gymnasium.utils.env_checker.check_env on the remote CartPole (spaces, reset(seed)
   determinism, step API).
2. Episodes with a simple balancing controller; every transition is checked against
   gymnasium's own CartPole-v1 started from the same state (dynamics to 1e-5, reward,
   termination).
3. Malformed frames sent to the server are answered with an error and the server carries on.
Prints "OK <episodes> <steps>" on success; any failure raises.
"""
import sys

import gymnasium as gym
import numpy as np
import zmq
from gymnasium.utils.env_checker import check_env

sys.path.insert(0, sys.argv[2])
from attnpilot_client import RemoteEnv, RemoteError, codec  # noqa: E402

endpoint = sys.argv[1]
env = RemoteEnv(endpoint, timeout_ms=10000)
assert isinstance(env, gym.Env)
assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.n == 2, env.action_space
assert env.observation_space.shape == (4,), env.observation_space
check_env(env, skip_render_check=True)

# Same seed, same start; different seeds, different starts.
a, _ = env.reset(seed=123)
b, _ = env.reset(seed=123)
c, _ = env.reset(seed=124)
assert np.array_equal(a, b) and not np.array_equal(a, c), (a, b, c)

ref = gym.make("CartPole-v1").unwrapped
ref.reset(seed=0)
steps = 0
returns = []
for ep in range(5):
    obs, info = env.reset(seed=1000 + ep)
    assert env.observation_space.contains(obs), obs
    total, done = 0.0, False
    while not done:
        theta, theta_dot = obs[2], obs[3]
        action = 1 if theta + 0.5 * theta_dot > 0 else 0
        ref.state = obs.astype(np.float64)
        ref_obs, ref_r, ref_term, _, _ = ref.step(action)
        obs, r, term, trunc, info = env.step(action)
        np.testing.assert_allclose(obs, ref_obs, rtol=1e-5, atol=1e-5)
        assert r == ref_r and term == ref_term, (r, ref_r, term, ref_term, obs)
        total += r
        steps += 1
        done = term or trunc
    returns.append(total)
assert min(returns) >= 100, returns  # the controller balances; the episodes are real

# Malformed and out-of-protocol requests: answered, and the session still works after.
ctx = zmq.Context.instance()
raw = ctx.socket(zmq.DEALER)
raw.setsockopt(zmq.LINGER, 0)
raw.connect(endpoint)
raw.send(codec.encode("weights", 5, {}, {}))
assert raw.poll(5000), "no answer to an unexpected message type"
t, seq, meta, _ = codec.decode(raw.recv())
assert t == "error" and seq == 5 and "weights" in meta["message"], (t, seq, meta)
raw.send(codec.encode("step_request", 6, {}, {"actions": np.zeros(1, np.int64)}))
assert raw.poll(5000)
t, _, meta, _ = codec.decode(raw.recv())
assert t == "error" and "reset" in meta["message"], meta
raw.send(b"APZ1 garbage")  # refused by the decoder: no reply, counted server-side
try:
    env.step(np.int64(7))  # action outside Discrete(2)
    raise AssertionError("out-of-range action accepted")
except RemoteError as e:
    print("server refused bad action:", e)
obs, _ = env.reset(seed=5)
obs, r, *_ = env.step(0)
assert r == 1.0
env.close()
raw.close()
print("OK", len(returns), steps, "returns", returns)
