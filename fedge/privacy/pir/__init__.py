"""Two-server private information retrieval from DPF keys (Lam et al., ASPLOS 2024, section 3).

The client splits e_i into two DPF keys, one per non-colluding server. Each server expands its
key over the whole table and returns the XOR of the rows its share selects; the two answers XOR
to row i. Neither server alone learns anything about i.

A server answers a whole batch in one pass over the table: with the batch's expansions as a bit
matrix E (queries x rows), the answer is the GF(2) product E @ T, the expansion chunked into
the pass (up to 2 MiB of bits per chunk, in a thread's L2 cache) and the chunk's rows XORed in
at once by a compiled kernel.

- `protocol`: `query`, `reconstruct`, `TableSpec`, rows as uint64 words (`as_words`);
- `kernels`: the compiled products, affine (GF2P8AFFINEQB on 8x8 bit matrices), stream, gray
  (four Russians) and mask;
- `layout`: the table's layouts ("rows", "blocks": `blocks_layout`) and how a pass is cut into
  chunks and threads (`plan_pass`);
- `server`: `ServerTable` (the table in its layout), `answer_batch`, `answer_many` and
  `PIRServer`;
- `torch_backend`: `TorchAnswerer`, the answer step in torch for a GPU.
"""

from fedge.privacy.pir.kernels import AFFINE, AFFINE_TILE_BYTES, GRAY_MIN_QUERIES, KERNELS
from fedge.privacy.pir.layout import (
    CHUNK_BITS,
    CHUNKS_PER_THREAD,
    LAYOUT_KERNELS,
    PARALLEL_MIN_WORK,
    PassPlan,
    blocks_layout,
    pass_work,
    plan_pass,
)
from fedge.privacy.pir.protocol import (
    TableSpec,
    as_words,
    domain_bits_for,
    query,
    reconstruct,
    row_indices,
)
from fedge.privacy.pir.server import (
    PIRServer,
    ServerTable,
    answer_batch,
    answer_many,
    as_batch,
    default_device,
    warm_up,
)
from fedge.privacy.pir.torch_backend import TorchAnswerer

__all__ = [
    "AFFINE",
    "AFFINE_TILE_BYTES",
    "CHUNKS_PER_THREAD",
    "CHUNK_BITS",
    "GRAY_MIN_QUERIES",
    "KERNELS",
    "LAYOUT_KERNELS",
    "PARALLEL_MIN_WORK",
    "PIRServer",
    "PassPlan",
    "ServerTable",
    "TableSpec",
    "TorchAnswerer",
    "answer_batch",
    "answer_many",
    "as_batch",
    "as_words",
    "blocks_layout",
    "default_device",
    "domain_bits_for",
    "pass_work",
    "plan_pass",
    "query",
    "row_indices",
    "reconstruct",
    "warm_up",
]
