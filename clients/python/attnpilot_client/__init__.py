"""Python client of `attnpilot env-server`: `RemoteEnv` is a real `gymnasium.Env`."""
from .codec import DecodeError, decode, encode
from .env import RemoteEnv, RemoteError

__all__ = ["RemoteEnv", "RemoteError", "DecodeError", "encode", "decode"]
