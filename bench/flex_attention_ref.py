#!/usr/bin/env python3
"""FlexAttention (torch.compile'd) on the same block lists as attention_cuda_bench, timed in the
same run: the bench writes each mask's CSR to a file and calls this script with python3.

    python3 flex_attention_ref.py --csr FILE --len L --heads H --dim D --block BS [--reps R]

FILE: little-endian int64 values: heads, q_blocks, k_blocks, nnz, then row_ptr (heads*q_blocks
+ 1 values) and col_idx (nnz values), rows ordered (head, query block) as in
attention/block_mask.h, batch 1, causal, square (L queries, L keys, query i at key i).
Blocks strictly below the diagonal are passed as "full" (no mask_mod work); diagonal blocks as
partial blocks with the causal mask_mod, so FlexAttention does the same masking work we do.
Prints one line:  flex_ms=<median ms> compile_s=<s> rel_err_vs_sdpa=<at density 1, else ->
"""
import argparse
import sys
import time

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


def load_csr(path):
    raw = np.fromfile(path, dtype="<i8")
    if raw.size < 4:
        sys.exit(f"flex_attention_ref: {path}: {raw.size} int64 values, expected a 4-value header")
    heads, qbn, kbn, nnz = (int(x) for x in raw[:4])
    rows = heads * qbn
    if raw.size != 4 + rows + 1 + nnz:
        sys.exit(f"flex_attention_ref: {path}: {raw.size} values, expected {4 + rows + 1 + nnz}")
    row_ptr = raw[4 : 5 + rows]
    col_idx = raw[5 + rows :]
    return heads, qbn, kbn, row_ptr, col_idx


def to_block_mask(heads, qbn, kbn, row_ptr, col_idx, length, bs, device):
    rows = heads * qbn
    row = np.repeat(np.arange(rows), np.diff(row_ptr))  # the row of each listed block
    qb = row % qbn

    def lists(keep):  # (counts [1, H, qbn], indices [1, H, qbn, kbn]) of the kept entries
        r, c = row[keep], col_idx[keep]
        pos = np.arange(r.size) - np.searchsorted(r, r)  # position within its row
        idx = np.zeros((rows, kbn), np.int32)
        idx[r, pos] = c
        counts = np.bincount(r, minlength=rows).astype(np.int32)
        return counts.reshape(1, heads, qbn), idx.reshape(1, heads, qbn, kbn)

    full_n, full_i = lists(col_idx < qb)
    partial_n, partial_i = lists(col_idx == qb)
    t = lambda a: torch.from_numpy(a).to(device)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        t(partial_n), t(partial_i), t(full_n), t(full_i), BLOCK_SIZE=bs, mask_mod=causal,
        seq_lengths=(length, length))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--csr", required=True)
    ap.add_argument("--len", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--block", type=int, required=True)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("flex_attention_ref: needs a CUDA device")
    dev = torch.device("cuda")
    heads, qbn, kbn, row_ptr, col_idx = load_csr(a.csr)
    if heads != a.heads or qbn != (a.len + a.block - 1) // a.block:
        sys.exit(f"flex_attention_ref: mask is {heads} heads x {qbn} query blocks, expected "
                 f"{a.heads} x {(a.len + a.block - 1) // a.block}")
    mask = to_block_mask(heads, qbn, kbn, row_ptr, col_idx, a.len, a.block, dev)
    torch.manual_seed(a.len)
    q, k, v = (torch.randn(1, a.heads, a.len, a.dim, device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    flex = torch.compile(flex_attention)
    t0 = time.time()
    out = flex(q, k, v, block_mask=mask)
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    for _ in range(2):
        flex(q, k, v, block_mask=mask)
    ms = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(a.reps):
        start.record()
        flex(q, k, v, block_mask=mask)
        stop.record()
        stop.synchronize()
        ms.append(start.elapsed_time(stop))
    err = "-"
    if col_idx.size == heads * qbn * (qbn + 1) // 2:  # every causal block listed
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float()
        err = f"{((out.float() - ref).norm() / ref.norm()).item():.2e}"
    print(f"flex_ms={float(np.median(ms)):.4f} compile_s={compile_s:.1f} rel_err_vs_sdpa={err}")


if __name__ == "__main__":
    main()
