"""The answer step in torch, for a GPU (`PIRServer(table, device="cuda")`)."""

from __future__ import annotations

import numpy as np


class TorchAnswerer:
    """The answer step in torch (for CUDA): the GF(2) product as an integer one. Over a block of
    rows, the queries' bits E (queries x rows, 0/1 int8) times the rows' bits T (rows x row bits,
    0/1 int8) with int32 sums (`torch._int_mm`: int8 tensor cores on a GPU); the parity of a
    sum is the XOR of the selected bits, so the answer is exact. The table stays packed on the
    device (its own size) and each block's bits are unpacked on the fly, so a block needs
    block_bytes of scratch memory whatever the table size."""

    def __init__(self, words: np.ndarray, device: str, block_bytes: int = 1 << 28):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.rows = words.shape[0]
        self.block_bytes = block_bytes
        padded = -(-self.rows // 64) * 64  # whole words of the queries' bits
        t = torch.zeros((padded, words.shape[1]), dtype=torch.int64)
        t[: self.rows] = torch.from_numpy(words.view(np.int64))
        self.table = t.to(self.device)
        self.shifts = torch.arange(64, dtype=torch.int64, device=self.device)

    def _bits(self, words):
        """(n, w) int64 words -> (n, 64 w) int8 bits, bit j of word i at column 64 i + j."""
        bits = (words[:, :, None] >> self.shifts) & 1
        return bits.to(self.torch.int8).reshape(words.shape[0], -1)

    def __call__(self, bits: np.ndarray) -> np.ndarray:
        torch = self.torch
        q, width = bits.shape[0], self.table.shape[1]
        e = torch.from_numpy(np.ascontiguousarray(bits).view(np.int64)).to(self.device)
        e = torch.cat([e, e.new_zeros((max(17 - q, 0), e.shape[1]))])  # _int_mm wants > 16
        per_row = 64 * width + e.shape[0]  # bytes of unpacked bits per table row in a block
        block = max(64, self.block_bytes // per_row // 64 * 64)
        sums = torch.zeros((e.shape[0], 64 * width), dtype=torch.int32, device=self.device)
        for lo in range(0, self.table.shape[0], block):
            rows = self._bits(self.table[lo : lo + block])
            queries = self._bits(e[:, lo // 64 : lo // 64 + rows.shape[0] // 64])
            sums += torch._int_mm(queries, rows)
        parity = (sums[:q] & 1).to(torch.int64).reshape(q, width, 64)
        answers = (parity << self.shifts).sum(dim=2)  # distinct bits: the sum is their OR
        return answers.cpu().numpy().view(np.uint64)
