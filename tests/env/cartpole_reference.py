"""Reference CartPole-v1 trajectories from Gymnasium for tests/env/env_test.cpp.

Prints JSON: a list of episodes {state0, actions, obs, terminated}, each started from a
random state set through env.unwrapped.state and stepped with random actions until it
terminates or 200 steps pass.
"""
import json
import sys

import gymnasium as gym
import numpy as np

rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
env = gym.make("CartPole-v1")
env.reset(seed=0)
episodes = []
for ep in range(20):
    env.reset(seed=ep)
    state0 = rng.uniform(-0.2, 0.2, size=4)
    env.unwrapped.state = np.array(state0, dtype=np.float64)
    actions, obs, term = [], [], []
    for t in range(200):
        a = int(rng.integers(0, 2))
        o, r, terminated, truncated, _ = env.step(a)
        actions.append(a)
        obs.append([float(x) for x in o])
        term.append(bool(terminated))
        if terminated:
            break
    episodes.append({"state0": [float(x) for x in state0], "actions": actions, "obs": obs,
                     "terminated": term})
print(json.dumps({"gymnasium": gym.__version__, "episodes": episodes}))
