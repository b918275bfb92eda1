"""The attnpilot wire format (transport/codec.h), in Python.

Frame: 24-byte header (magic b"APZ1", u16 version, u16 type, u64 seq, u64 payload length),
then u32 meta length + JSON meta, u32 tensor count, and per tensor: u16 name length, name,
u8 dtype, u8 ndim, ndim x i64 dims, u64 data length, data. All little-endian. Decoding is
as strict as the C++ decoder: every length is checked against the bytes that remain.
"""
from __future__ import annotations

import json
import struct
from typing import Dict, Tuple

import numpy as np

MAGIC = b"APZ1"
VERSION = 1
HEADER = struct.Struct("<4sHHQQ")

MSG = {
    "hello": 1, "welcome": 2, "trajectory": 3, "ack": 4, "weights": 5,
    "spec_request": 6, "spec_reply": 7, "reset_request": 8, "reset_reply": 9,
    "step_request": 10, "step_reply": 11, "error": 12, "shutdown": 13, "ping": 14,
}
MSG_NAME = {v: k for k, v in MSG.items()}

DTYPES = {
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("<i8"),
    5: np.dtype("u1"), 6: np.dtype("?"), 7: np.dtype("<f2"),
}
DTYPE_CODE = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 8


class DecodeError(ValueError):
    """A frame that does not follow the wire format."""


def encode(msg_type: str, seq: int, meta: dict | None, tensors: Dict[str, np.ndarray]) -> bytes:
    meta_b = json.dumps(meta or {}).encode()
    parts = [struct.pack("<I", len(meta_b)), meta_b, struct.pack("<I", len(tensors))]
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in DTYPE_CODE:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no wire encoding")
        arr = arr.astype(dt, copy=False)
        nb = name.encode()
        parts.append(struct.pack("<H", len(nb)) + nb)
        parts.append(struct.pack("<BB", DTYPE_CODE[dt], arr.ndim))
        parts.append(struct.pack(f"<{arr.ndim}q", *arr.shape))
        data = arr.tobytes()
        parts.append(struct.pack("<Q", len(data)) + data)
    payload = b"".join(parts)
    return HEADER.pack(MAGIC, VERSION, MSG[msg_type], seq, len(payload)) + payload


def decode(frame: bytes, max_bytes: int = 256 << 20) -> Tuple[str, int, dict, Dict[str, np.ndarray]]:
    if len(frame) > max_bytes:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds {max_bytes}")
    if len(frame) < HEADER.size:
        raise DecodeError(f"truncated frame of {len(frame)} bytes")
    magic, version, mtype, seq, plen = HEADER.unpack_from(frame, 0)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r}")
    if version != VERSION:
        raise DecodeError(f"protocol version {version}, expected {VERSION}")
    if mtype not in MSG_NAME:
        raise DecodeError(f"unknown message type {mtype}")
    if plen != len(frame) - HEADER.size:
        raise DecodeError(f"payload length {plen} != {len(frame) - HEADER.size}")
    off = HEADER.size

    def take(n: int, what: str) -> bytes:
        nonlocal off
        if n > len(frame) - off:
            raise DecodeError(f"truncated at {what}: need {n}, have {len(frame) - off}")
        b = frame[off:off + n]
        off += n
        return b

    (mlen,) = struct.unpack("<I", take(4, "meta length"))
    try:
        meta = json.loads(take(mlen, "meta").decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DecodeError(f"meta is not JSON: {e}") from e
    (count,) = struct.unpack("<I", take(4, "tensor count"))
    tensors: Dict[str, np.ndarray] = {}
    for _ in range(count):
        (nlen,) = struct.unpack("<H", take(2, "name length"))
        name = take(nlen, "name").decode()
        code, ndim = struct.unpack("<BB", take(2, "dtype"))
        if code not in DTYPES:
            raise DecodeError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise DecodeError(f"tensor {name!r}: {ndim} dims")
        shape = struct.unpack(f"<{ndim}q", take(8 * ndim, "dims"))
        if any(d < 0 for d in shape):
            raise DecodeError(f"tensor {name!r}: negative dim in {shape}")
        want = int(np.prod(shape, dtype=object)) * DTYPES[code].itemsize
        (dlen,) = struct.unpack("<Q", take(8, "data length"))
        if dlen != want:
            raise DecodeError(f"tensor {name!r}: shape {shape} needs {want} bytes, got {dlen}")
        tensors[name] = np.frombuffer(take(dlen, "data"), dtype=DTYPES[code]).reshape(shape).copy()
    if off != len(frame):
        raise DecodeError(f"{len(frame) - off} trailing bytes")
    return MSG_NAME[mtype], seq, meta, tensors
