"""The client half of SecAgg+: a `flwr.clientapp` mod, for fedge's ClientApp or any other.

`ClientApp(mods=[secaggplus_mod])` is all a Flower app needs. Messages without a SECAGG
ConfigRecord pass straight through. Each stage's message is answered here, except the
collect stage, whose instruction the app trains on as usual: the mod then replaces the
reply's model by the masked update. Between stages the client's secrets live in its
`Context.state` (which Flower's SuperNode and fedge's grids keep per node and run); they
are deleted after the unmask stage, so no client reveals both shares of one peer.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, cast

from cryptography.exceptions import InvalidKey
from cryptography.fernet import InvalidToken
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from fedge.compat import bytes_to_public_key, generate_key_pairs, public_key_to_bytes
from fedge.strategies.secagg.masking import (
    SEED_BYTES,
    add_mask,
    agreed_key,
    encode,
    flat_update,
    pair_seed,
    pair_sign,
    private_bytes,
    private_key,
)
from fedge.wire import SECAGG, SECAGG_MASKED, SECAGG_STATE, SecAggKey, SecAggStage, number

Handler = Callable[[Message, Context], Message]
K = SecAggKey


class S:
    """Keys of the client's secrets in its SECAGG_STATE record (they never leave the node)."""

    ENC_SK = "enc-sk"  # c_u^SK, the private key that agrees the share encryption keys
    MASK_SK = "mask-sk"  # s_u^SK, the private key that agrees the pairwise mask seeds
    SEED = "seed"  # b_u, the self-mask seed
    ENC_KEYS = "enc-keys"  # the agreed share encryption key with each peer
    OWN_SEED_SHARE = "own-seed-share"  # the share of b_u this client keeps
    OWN_KEY_SHARE = "own-key-share"  # the share of s_u^SK this client keeps
    SEED_SHARES = "seed-shares"  # the accepted peers' shares of their b
    KEY_SHARES = "key-shares"  # the accepted peers' shares of their s^SK


def secaggplus_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Answer the SecAgg+ stage a message carries; pass any other message through."""
    if SECAGG not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content.config_records[SECAGG]
    stage = str(config.get(K.STAGE, ""))
    if stage == SecAggStage.SETUP:
        return reply(msg, setup(config, context))
    state = round_state(context, config)
    if stage == SecAggStage.SHARE_KEYS:
        return reply(msg, share_keys(config, state, context.node_id))
    if stage == SecAggStage.COLLECT:
        return collect(msg, context, call_next, state)
    if stage == SecAggStage.UNMASK:
        answer = unmask(config, state, context.node_id)
        del context.state.config_records[SECAGG_STATE]  # each secret is revealed at most once
        return reply(msg, answer)
    raise ValueError(f"unknown secure aggregation stage {stage!r}")


def reply(msg: Message, config: dict[str, Any]) -> Message:
    return Message(RecordDict({SECAGG: ConfigRecord(config)}), reply_to=msg)


def round_state(context: Context, config: ConfigRecord) -> ConfigRecord:
    """This round's secrets, from the setup stage of the same round."""
    state = context.state.config_records.get(SECAGG_STATE)
    if state is None or state[K.ROUND] != config.get(K.ROUND):
        raise ValueError(
            f"secure aggregation stage {config.get(K.STAGE)!r} of round "
            f"{config.get(K.ROUND)!r} without this round's setup stage on this client"
        )
    return state


def setup(config: ConfigRecord, context: Context) -> dict[str, Any]:
    """Stage 0: make the round's two key pairs (one encrypts shares, one agrees on masks)
    and the self-mask seed b; keep them, send the public keys."""
    enc_sk, enc_pk = generate_key_pairs()
    mask_sk, mask_pk = generate_key_pairs()
    context.state.config_records[SECAGG_STATE] = ConfigRecord(
        {
            **{k: config[k] for k in config if k != K.STAGE},
            S.ENC_SK: private_bytes(enc_sk),
            S.MASK_SK: private_bytes(mask_sk),
            S.SEED: secrets.token_bytes(SEED_BYTES),
        }
    )
    return {K.PK_ENC: public_key_to_bytes(enc_pk), K.PK_MASK: public_key_to_bytes(mask_pk)}


def share_keys(config: ConfigRecord, state: ConfigRecord, me: int) -> dict[str, Any]:
    """Stage 1: t-out-of-(|peers| + 1) Shamir shares of b and of s^SK, one pair for each
    neighbour that advertised keys (encrypted to it) and one kept by this client."""
    peers = [int(p) for p in cast(list[int], config[K.PEERS])]
    t = int(number(state, K.THRESHOLD))
    if not set(peers) <= set(cast(list[int], state[K.NEIGHBOURS])):
        raise ValueError("the server named peers that are not this client's neighbours")
    if len(peers) + 1 < t:
        raise ValueError(f"only {len(peers)} neighbours left; the threshold is {t}")
    seed_shares = create_shares(cast(bytes, state[S.SEED]), t, len(peers) + 1)
    key_shares = create_shares(cast(bytes, state[S.MASK_SK]), t, len(peers) + 1)
    enc_sk = private_key(cast(bytes, state[S.ENC_SK]))
    pk_enc = cast(list[bytes], config[K.PK_ENC])
    keys = [agreed_key(enc_sk, bytes_to_public_key(pk)) for pk in pk_enc]  # kept for stage 2
    ciphertexts = [
        encrypt(key, share_keys_plaintext_concat(me, peer, b_share, sk_share))
        for peer, key, b_share, sk_share in zip(
            peers, keys, seed_shares[:-1], key_shares[:-1], strict=True
        )
    ]
    state[K.PEERS] = peers
    state[S.ENC_KEYS] = keys
    state[K.PK_MASK] = list(cast(list[bytes], config[K.PK_MASK]))
    state[S.OWN_SEED_SHARE], state[S.OWN_KEY_SHARE] = seed_shares[-1], key_shares[-1]
    return {K.PEERS: peers, K.CIPHERTEXTS: ciphertexts}


def open_shares(
    config: ConfigRecord, state: ConfigRecord, me: int
) -> dict[int, tuple[bytes, bytes]]:
    """The shares forwarded to this client, by sender; a share that does not decrypt, or
    names another sender or receiver, is left out (its sender will be excluded)."""
    keys = dict(
        zip(cast(list[int], state[K.PEERS]), cast(list[bytes], state[S.ENC_KEYS]), strict=True)
    )
    opened: dict[int, tuple[bytes, bytes]] = {}
    for src, ciphertext in zip(
        cast(list[int], config[K.PEERS]), cast(list[bytes], config[K.CIPHERTEXTS]), strict=True
    ):
        if src not in keys:
            continue
        try:
            plain = decrypt(keys[src], ciphertext)
            sender, receiver, b_share, sk_share = share_keys_plaintext_separate(plain)
        except (InvalidToken, InvalidKey, ValueError, TypeError):
            continue
        if sender == src and receiver == me and b_share and sk_share:
            opened[src] = (b_share, sk_share)
    return opened


def collect(msg: Message, context: Context, call_next: Handler, state: ConfigRecord) -> Message:
    """Stage 2: keep the forwarded shares, train, and reply with y = [w, w q(x)] + PRG(b)
    + sum over the accepted peers v of +-PRG(s_{u,v}) instead of the model."""
    me = context.node_id
    config = msg.content.config_records[SECAGG]
    opened = open_shares(config, state, me)
    sent_arrays = [k for k in msg.content.array_records]
    if len(sent_arrays) != 1:
        raise ValueError(
            f"secure aggregation masks one ArrayRecord; the instruction has {sent_arrays}"
        )
    key = sent_arrays[0]
    sent = msg.content.array_records[key]
    answer = call_next(msg, context)
    if answer.has_error():
        return answer
    returned = list(answer.content.array_records)
    if returned != [key]:
        raise ValueError(
            f"secure aggregation masks one ArrayRecord {key!r}; the reply has {returned}"
        )
    metrics = next(iter(answer.content.metric_records.values()), None)
    weight_key = str(state[K.WEIGHT_KEY])
    if metrics is None or weight_key not in metrics:
        raise ValueError(f"the reply has no {weight_key!r} metric to weight the update by")
    weight = round(number(metrics, weight_key))
    if not 0 <= weight <= int(number(state, K.MAX_WEIGHT)):
        raise ValueError(f"weight {weight} is outside 0..{int(number(state, K.MAX_WEIGHT))}")
    update = flat_update(answer.content.array_records[key], sent)
    vector = encode(update, weight, number(state, K.CLIP_RANGE), int(number(state, K.QUANT_BITS)))
    add_mask(vector, cast(bytes, state[S.SEED]), 1)
    mask_sk = private_key(cast(bytes, state[S.MASK_SK]))
    pk_mask = dict(
        zip(cast(list[int], state[K.PEERS]), cast(list[bytes], state[K.PK_MASK]), strict=True)
    )
    for peer in opened:
        add_mask(
            vector, pair_seed(mask_sk, bytes_to_public_key(pk_mask[peer])), pair_sign(me, peer)
        )
    accepted = sorted(opened)
    state[K.ACCEPTED] = accepted
    state[S.SEED_SHARES] = [opened[p][0] for p in accepted]
    state[S.KEY_SHARES] = [opened[p][1] for p in accepted]
    content = RecordDict(
        {
            **{name: rec for name, rec in answer.content.items() if name != key},
            SECAGG_MASKED: ArrayRecord({K.VECTOR: Array(vector)}),
            SECAGG: ConfigRecord({K.ACCEPTED: accepted}),
        }
    )
    return Message(content, reply_to=msg)


def unmask(config: ConfigRecord, state: ConfigRecord, me: int) -> dict[str, Any]:
    """Stage 3: the shares of b for the peers that sent masked vectors and of s^SK for the
    ones that did not, never both for one peer; refuse if fewer than t survived."""
    alive = [int(p) for p in cast(list[int], config.get(K.ALIVE, []))]
    dead = [int(p) for p in cast(list[int], config.get(K.DEAD, []))]
    accepted = cast(list[int], state.get(K.ACCEPTED, []))
    known = set(accepted) | {me}
    t = int(number(state, K.THRESHOLD))
    if set(alive) & set(dead) or me in dead or not set(alive) | set(dead) <= known:
        raise ValueError("the server's lists of survivors and dropouts are inconsistent")
    if len(alive) < t:
        raise ValueError(f"only {len(alive)} of this client's share holders survived; t is {t}")
    seed_shares = dict(zip(accepted, cast(list[bytes], state[S.SEED_SHARES]), strict=True))
    key_shares = dict(zip(accepted, cast(list[bytes], state[S.KEY_SHARES]), strict=True))
    seed_shares[me] = cast(bytes, state[S.OWN_SEED_SHARE])
    shares = [seed_shares[p] for p in alive] + [key_shares[p] for p in dead]
    return {K.PEERS: alive + dead, K.SHARES: shares}
