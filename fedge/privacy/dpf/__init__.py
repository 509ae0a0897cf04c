"""Distributed point function: Boyle-Gilboa-Ishai 2016 tree DPF over XOR shares.

`gen(alpha, n)` splits the point function f(x) = [x == alpha] on {0,1}^n into two keys; each key
alone is pseudorandom, and `eval_all(k0) ^ eval_all(k1)` is the unit vector e_alpha. Following
BGI-2016 (Fig. 1 with the early-termination optimisation):

- one correction word per tree level: a 128-bit seed correction and two control-bit corrections;
- early termination, widened: the tree stops LEAF_BITS = 7 + log2(W) levels early and each leaf
  converts its seed into W = LEAF_BLOCKS 128-bit output blocks, so a key is
  16 + 17*(n - LEAF_BITS) + 16*W bytes (plus a 5-byte header) and expansion touches
  L = 2^(n - LEAF_BITS) leaves: about 2L AES blocks for the tree and WL for the values, i.e.
  2^(n-7) * (1 + 2/W) blocks in all, against 3 * 2^(n-7) with one block per leaf (a domain
  smaller than one leaf is that one leaf with only the ceil(2^n / 128) blocks it needs,
  `leaf_blocks(n)`, so small tables keep keys of 21 + 16 * that bytes);
- the PRG is fixed-key AES-128 in Matyas-Meyer-Oseas form, G(s) = pi(s ^ c) ^ s ^ c with one public
  tweak c per output (left child, right child, and the W leaf values), so all nodes of a level, of
  all keys of a batch, go through ONE AES-ECB call on a preallocated buffer;
- on CPUs with VAES the leaf values (most of the AES) skip that call: a compiled loop runs the
  AES rounds itself, 4 blocks per 512-bit vector, and adds the feed-forward and the output
  correction in registers (bit-identical, and 2x cheaper at 1 GiB x 128 keys).

One module per concern, so that each can be audited alone:

- `keys`: the key format (sizes, `DPFKey` and its bytes, `KeyBatch` and its checked parsing);
- `prg`: the PRG (fixed key, tweaks, `cryptography`'s AES and the AES in registers);
- `keygen`: key generation (`gen`, `gen_batch`; seeds from `secrets`, the OS CSPRNG);
- `expansion`: evaluation (`expand`, `node_seeds`, `expand_below`, `eval_all`), the compiled
  level kernels and their reused buffers.

Bit x of an expansion is bit (x & 63) of 64-bit word (x >> 6), the little-endian reading of the
leaf blocks.
"""

from fedge.privacy.dpf.expansion import (
    EXPAND_BUFFER_BYTES,
    PARALLEL_MIN_NODES,
    Workspace,
    eval_all,
    expand,
    expand_below,
    node_seeds,
    serial_and_parallel,
    thread_workspace,
    warm_up,
)
from fedge.privacy.dpf.keygen import gen, gen_batch
from fedge.privacy.dpf.keys import (
    LEAF_BITS,
    LEAF_BLOCKS,
    MAGIC,
    MAX_DOMAIN_BITS,
    VERSION,
    DPFKey,
    KeyBatch,
    key_size,
    leaf_blocks,
    tree_depth,
)
from fedge.privacy.dpf.prg import BRANCH, SEED_ONLY, T_VALUE, VAES, round_keys

__all__ = [
    "BRANCH",
    "EXPAND_BUFFER_BYTES",
    "LEAF_BITS",
    "LEAF_BLOCKS",
    "MAGIC",
    "MAX_DOMAIN_BITS",
    "PARALLEL_MIN_NODES",
    "SEED_ONLY",
    "T_VALUE",
    "VAES",
    "VERSION",
    "DPFKey",
    "KeyBatch",
    "Workspace",
    "eval_all",
    "expand",
    "expand_below",
    "gen",
    "gen_batch",
    "key_size",
    "leaf_blocks",
    "node_seeds",
    "round_keys",
    "serial_and_parallel",
    "thread_workspace",
    "tree_depth",
    "warm_up",
]
