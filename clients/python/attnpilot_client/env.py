"""`RemoteEnv`: a `gymnasium.Env` whose dynamics run in `attnpilot env-server` (C++).

    env = RemoteEnv("tcp://127.0.0.1:5555")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Each RemoteEnv is one session on the server (one environment instance, keyed by this
socket's routing id). Requests time out after `timeout_ms` with a TimeoutError; the server's
typed errors arrive as `RemoteError`.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import zmq

from . import codec


class RemoteError(RuntimeError):
    """The server refused a request (its message says why)."""


def _space(spec: dict) -> gym.Space:
    kind = spec.get("type")
    if kind == "discrete":
        return gym.spaces.Discrete(int(spec["n"]))
    if kind == "multi_discrete":
        return gym.spaces.MultiDiscrete(np.asarray(spec["nvec"], dtype=np.int64))
    if kind == "box":
        dtype = np.dtype(spec.get("dtype", "float32"))
        shape = tuple(int(d) for d in spec["shape"])
        low = np.asarray(_bound(spec["low"]), dtype=np.float64).reshape(shape)
        high = np.asarray(_bound(spec["high"]), dtype=np.float64).reshape(shape)
        return gym.spaces.Box(low=low.astype(dtype), high=high.astype(dtype), shape=shape,
                              dtype=dtype)
    raise ValueError(f"unknown space type {kind!r} in {spec}")


def _bound(values):
    # The server writes infinite bounds as the strings "inf" / "-inf" (JSON has no inf).
    return [float(v) for v in values]


class RemoteEnv(gym.Env):
    """A Gymnasium environment served over ZeroMQ by `attnpilot env-server`."""

    metadata = {"render_modes": []}

    def __init__(self, endpoint: str, timeout_ms: int = 10000,
                 client_key_prefix: Optional[str] = None, server_public_key: Optional[str] = None,
                 render_mode: Optional[str] = None):
        super().__init__()
        self.render_mode = render_mode
        self._timeout_ms = int(timeout_ms)
        self._seq = 0
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 256 << 20)
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
        self._sock.setsockopt(zmq.ROUTING_ID, f"py-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        if client_key_prefix:
            if not server_public_key:
                raise ValueError("client_key_prefix needs server_public_key (the server's .pub file)")
            secret = _read_key(client_key_prefix + ".key")
            self._sock.curve_secretkey = secret.encode()
            self._sock.curve_publickey = zmq.curve_public(secret.encode())
            self._sock.curve_serverkey = _read_key(server_public_key).encode()
        self._sock.connect(endpoint)
        _, meta, _ = self._request("spec_request", {}, {}, "spec_reply")
        self.remote_spec = meta
        self.observation_space = _space(meta["observation_space"])
        self.action_space = _space(meta["action_space"])
        self.has_action_mask = bool(meta.get("has_action_mask", False))

    def _request(self, mtype: str, meta: dict, tensors: dict, want: str):
        self._seq += 1
        self._sock.send(codec.encode(mtype, self._seq, meta, tensors))
        while True:
            if not self._sock.poll(self._timeout_ms, zmq.POLLIN):
                raise TimeoutError(f"no {want} from the env-server within {self._timeout_ms} ms")
            rtype, seq, rmeta, rtensors = codec.decode(self._sock.recv())
            if seq != self._seq:
                continue  # a late reply to a request that timed out
            if rtype == "error":
                raise RemoteError(rmeta.get("message", "env-server error"))
            if rtype != want:
                raise RemoteError(f"expected {want}, got {rtype}")
            return rtensors, rmeta, rtype

    def _obs(self, tensors: dict) -> np.ndarray:
        obs = tensors["obs"][0]
        return obs.astype(self.observation_space.dtype, copy=False)

    def _info(self, tensors: dict, meta: dict) -> dict:
        info: dict[str, Any] = dict(meta.get("info", {}))
        if "action_mask" in tensors:
            info["action_mask"] = tensors["action_mask"][0]
        return info

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is None:
            # Derive the next episode's seed from our RNG: deterministic after a seeded reset.
            seed = int(self.np_random.integers(0, 2**31 - 1))
        tensors, meta, _ = self._request("reset_request", {"seed": int(seed)}, {}, "reset_reply")
        return self._obs(tensors), self._info(tensors, meta)

    def step(self, action):
        a = np.asarray(action)
        if isinstance(self.action_space, gym.spaces.Discrete):
            a = a.astype(np.int64).reshape(1)
        elif isinstance(self.action_space, gym.spaces.MultiDiscrete):
            a = a.astype(np.int64).reshape(1, -1)
        else:
            a = a.astype(np.float32).reshape((1,) + self.action_space.shape)
        tensors, meta, _ = self._request("step_request", {}, {"actions": a}, "step_reply")
        return (self._obs(tensors), float(tensors["rewards"][0]), bool(tensors["terminated"][0]),
                bool(tensors["truncated"][0]), self._info(tensors, meta))

    def close(self):
        if getattr(self, "_sock", None) is not None and not self._sock.closed:
            self._sock.close(linger=0)
        super().close()


def _read_key(path: str) -> str:
    with open(path) as f:
        for line in f:
            tok = (line.split() or [""])[0]
            if len(tok) == 40:  # Z85 keys may contain '#'
                return tok
            if tok and not tok.startswith("#"):
                raise ValueError(f"{path}: expected a 40-character Z85 key")
    raise ValueError(f"{path}: no key found")
