"""The server half of SecAgg+ (Bell et al., CCS 2020): a wrapper around a summing strategy.

The wrapped strategy samples the clients and makes the training instructions as usual.
Inside the same Flower round, `configure_train` runs the protocol's first two stages over
the Grid (advertise keys, share keys) and returns the instructions with each client's
forwarded shares (stage three, collect); `aggregate_train` runs the unmask stage, removes
the masks from the sum and hands the wrapped strategy every survivor's reply carrying the
same weighted mean, so FedAvg, FedAdam & co. aggregate what plain FedAvg would have summed.
The server never holds a plain update: only masked vectors and their sum.

Threat model and what was checked: the semi-honest variant of the paper (no signatures or
consistency round), with the random Harary graph of its section 3 and a degree from its
connectivity bound (`masking.graph_degree`); stage structure as Flower's legacy
SecAggPlusWorkflow (setup, share keys, collect masked vectors, unmask).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedge.compat import bytes_to_public_key, error_reply, public_key_to_bytes
from fedge.errors import ConfigError
from fedge.strategies.oort import Oort
from fedge.strategies.registry import round_metrics
from fedge.strategies.secagg.masking import (
    MAX_QUANT_BITS,
    SEED_BYTES,
    add_mask,
    apply_update,
    decode,
    graph_degree,
    harary_graph,
    max_weight,
    pair_seed,
    pair_sign,
    private_key,
    threshold,
)
from fedge.strategies.wrapper import StrategyWrapper
from fedge.wire import SECAGG, SECAGG_MASKED, SecAggKey, SecAggStage

K = SecAggKey
# Strategies whose aggregate_train is a weighted mean of the updates (then, for FedAvgM and
# FedOpt's family, a server step from it): all they need is the sum.
SUMMING = (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
REFUSED = {
    FedMedian: "takes the coordinate-wise median of the plain updates",
    FedTrimmedAvg: "trims the largest and smallest plain values of each coordinate",
    MultiKrum: "scores each plain update by its distance to the others (Krum)",
    Bulyan: "selects plain updates by their distances to the others (Krum, then trimming)",
    QFedAvg: "weights each plain update by its client's loss",
}


class SecAggAbort(Exception):
    """The round cannot be aggregated securely; the message says why."""


@dataclass
class ProtocolRun:
    """One round of the protocol: who is still in, and what the server was sent."""

    server_round: int
    grid: Grid
    sent: ArrayRecord  # the global model of the round
    arrays_key: str  # the instructions' ArrayRecord name
    instructions: dict[int, Message]  # node -> its training instruction
    neighbours: dict[int, list[int]] = field(default_factory=dict)
    t: int = 0
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> pk_enc, pk_mask
    peers: dict[int, list[int]] = field(default_factory=dict)  # who node shared with (U1)
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # stage -> clients lost there
    reasons: list[str] = field(default_factory=list)
    abort: str = ""  # why the round failed before its masked vectors were asked for
    seconds: float = 0.0  # in the stages around training (setup, share keys, unmask)


class SecAggPlus(StrategyWrapper):
    """Secure aggregation of `strategy`'s training round: the server learns only the sum.

    Parameters
    ----------
    strategy : Strategy
        A strategy whose aggregation is a weighted sum (FedAvg, FedProx, FedAvgM, FedAdam,
        FedYogi, FedAdagrad), optionally inside Flower's client-side DP wrapper.
    threshold : float
        Shares needed to rebuild a client's secrets, as a fraction of its share holders
        (its neighbours and itself): t = ceil(threshold x (k + 1)), at least 2.
    clip_range : float
        Each entry of a client's update w_k - w_t is clipped to [-clip_range, clip_range]
        before quantization: the bound secure aggregation enforces instead of inspecting.
    quantization_bits : int
        An entry is stochastically quantized onto 2^bits + 1 levels across the clip range.
    timeout : float
        Seconds each protocol stage waits for replies.
    degree : int or None
        The graph's degree k; None takes Bell et al.'s O(log n) bound for n clients.
    """

    def __init__(
        self,
        strategy: Strategy,
        threshold: float = 0.5,
        clip_range: float = 1.0,
        quantization_bits: int = 24,
        timeout: float = 3600.0,
        degree: int | None = None,
    ) -> None:
        self.base = summing_base(strategy)
        if not 0 < threshold <= 1:
            raise ConfigError(f"secagg_threshold: must be in (0, 1], got {threshold!r}")
        if not clip_range > 0:
            raise ConfigError(f"secagg_clip_range: must be > 0, got {clip_range!r}")
        if not 1 <= quantization_bits <= MAX_QUANT_BITS:
            raise ConfigError(
                f"secagg_quantization: must be 1..{MAX_QUANT_BITS} bits, got {quantization_bits!r}"
            )
        super().__init__(strategy)
        self.threshold = threshold
        self.clip_range = clip_range
        self.quantization_bits = quantization_bits
        self.timeout = timeout
        self.degree = degree
        self.run: ProtocolRun | None = None
        self.report: dict[str, Any] = {}

    # --- Flower's Strategy interface --------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's instructions, after the setup and share-keys stages."""
        instructions = list(self.strategy.configure_train(server_round, arrays, config, grid))
        names = {name for m in instructions for name in m.content.array_records}
        run = ProtocolRun(
            server_round,
            grid,
            arrays,
            next(iter(names), ""),
            {m.metadata.dst_node_id: m for m in instructions},
        )
        self.run, self.report = run, {}
        started = time.perf_counter()
        try:
            if len(names) != 1:
                raise SecAggAbort(f"the instructions carry ArrayRecords {sorted(names)}, not one")
            self.setup_stage(run)
            self.share_keys_stage(run)
        except SecAggAbort as abort:
            run.abort = str(abort)
            return []
        finally:
            run.seconds += time.perf_counter() - started
        return self.collect_messages(run)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies; the wrapped strategy aggregates the mean."""
        run, self.run = self.run, None  # the Grid is not kept past the round (checkpoints)
        if run is None:
            return None, None
        started = time.perf_counter()
        try:
            if run.abort:
                raise SecAggAbort(run.abort)
            survivors, failed = self.collect_replies(run, list(replies))
            mean = self.unmask_stage(run, survivors)
        except SecAggAbort as abort:
            run.seconds += time.perf_counter() - started
            self.fail(run, str(abort))
            why = f"secure aggregation failed: {abort}"
            # the wrapped strategy sees the round fail (DP's accountant closes its round)
            self.strategy.aggregate_train(
                server_round, [error_reply(m, why) for m in run.instructions.values()]
            )
            return None, None
        for reply in survivors.values():
            del reply.content[SECAGG_MASKED]
            del reply.content[SECAGG]
            reply.content[run.arrays_key] = mean
        run.seconds += time.perf_counter() - started
        self.record(run, aggregated=len(survivors))
        return self.strategy.aggregate_train(server_round, [*survivors.values(), *failed])

    def round_metrics(self) -> dict[str, Any]:
        """The round's protocol figures for history (a failed round: its reason), after the
        wrapped strategy's own (Oort's)."""
        return {**round_metrics(self.strategy), **self.report}

    def privacy_spent(self) -> Any:
        """The wrapped DP strategy's privacy spent (None without DP)."""
        spent = getattr(self.strategy, "privacy_spent", None)
        return spent() if spent else None

    # --- the protocol's stages -------------------------------------------------------
    def setup_stage(self, run: ProtocolRun) -> None:
        """Stage 0: draw the graph, send each client its neighbours and the protocol's
        parameters, collect two public keys from each."""
        nodes = sorted(run.instructions)
        if len(nodes) < 2:
            raise SecAggAbort(
                f"secure aggregation needs 2 or more clients a round, got {len(nodes)}"
            )
        degree = min(self.degree or graph_degree(len(nodes)), len(nodes) - 1)
        run.neighbours = harary_graph(nodes, degree)
        run.t = threshold(self.threshold, degree + 1)
        weight_key = str(getattr(self.base, "weighted_by_key", ""))
        common = {
            K.THRESHOLD: run.t,
            K.CLIP_RANGE: self.clip_range,
            K.QUANT_BITS: self.quantization_bits,
            K.WEIGHT_KEY: weight_key,
            K.MAX_WEIGHT: max_weight(self.quantization_bits, len(nodes)),
        }
        answers = self.send(
            run, SecAggStage.SETUP, {u: {**common, K.NEIGHBOURS: run.neighbours[u]} for u in nodes}
        )
        for node, answer in answers.items():
            pk_enc, pk_mask = answer.get(K.PK_ENC), answer.get(K.PK_MASK)
            if (
                isinstance(pk_enc, bytes)
                and isinstance(pk_mask, bytes)
                and readable(pk_enc, pk_mask)
            ):
                run.keys[node] = (pk_enc, pk_mask)
            else:
                self.lose(run, SecAggStage.SETUP, node, "sent no readable public keys")
        alive = set(run.keys)
        while True:  # a client with fewer than t - 1 neighbours left can never be unmasked
            short = {u for u in alive if len(set(run.neighbours[u]) & alive) + 1 < run.t}
            if not short:
                break
            for node in short:
                self.lose(
                    run, SecAggStage.SETUP, node, f"fewer than t = {run.t} share holders left"
                )
            alive -= short
        if not alive:
            raise SecAggAbort(f"no client kept t = {run.t} share holders after the setup stage")
        run.keys = {u: run.keys[u] for u in alive}

    def share_keys_stage(self, run: ProtocolRun) -> None:
        """Stage 1: send each client its live neighbours' public keys; collect its encrypted
        shares (one per neighbour) and file them for forwarding."""
        configs = {}
        for node in run.keys:
            peers = [v for v in run.neighbours[node] if v in run.keys]
            run.peers[node] = peers
            configs[node] = {
                K.PEERS: peers,
                K.PK_ENC: [run.keys[v][0] for v in peers],
                K.PK_MASK: [run.keys[v][1] for v in peers],
            }
        answers = self.send(run, SecAggStage.SHARE_KEYS, configs)
        shared: dict[int, dict[int, bytes]] = {}
        for node, answer in answers.items():
            dsts, ciphertexts = answer.get(K.PEERS), answer.get(K.CIPHERTEXTS)
            if (
                dsts != run.peers[node]
                or not isinstance(ciphertexts, list)
                or len(ciphertexts) != len(dsts)
            ):
                self.lose(run, SecAggStage.SHARE_KEYS, node, "did not send one share per neighbour")
                continue
            shared[node] = dict(zip(run.peers[node], cast(list[bytes], ciphertexts), strict=True))
        for node in list(run.peers):
            if node not in shared:
                del run.peers[node]
        for node in shared:
            srcs = [u for u in run.peers[node] if u in shared]
            if len(srcs) + 1 < run.t:
                raise SecAggAbort(
                    f"after the share-keys stage node {node} has {len(srcs) + 1} share holders; "
                    f"t = {run.t}"
                )
            run.forward[node] = (srcs, [shared[u][node] for u in srcs])

    def collect_messages(self, run: ProtocolRun) -> list[Message]:
        """Stage 2's instructions: the wrapped strategy's, plus each client's forwarded
        shares (the model and config records stay shared between the messages)."""
        messages = []
        for node, (srcs, ciphertexts) in run.forward.items():
            instruction = run.instructions[node]
            stage = self.stage_config(
                run, SecAggStage.COLLECT, {K.PEERS: srcs, K.CIPHERTEXTS: ciphertexts}
            )
            content = RecordDict({**instruction.content, SECAGG: stage})
            message = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=instruction.metadata.group_id,
            )
            run.instructions[node] = message
            messages.append(message)
        return messages

    def collect_replies(
        self, run: ProtocolRun, replies: list[Message]
    ) -> tuple[dict[int, Message], list[Message]]:
        """The survivors' masked replies, and the failures: clients that did not answer,
        sent no masked vector, or sent a share another client could not open (excluded)."""
        survivors: dict[int, Message] = {}
        failed = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in run.forward:
                continue
            if masked_vector(reply) is None:
                if not reply.has_error():
                    reply = error_reply(run.instructions[node], "sent no masked vector")
                failed.append(reply)
                self.lose(run, SecAggStage.COLLECT, node, str(reply.error.reason))
                continue
            survivors[node] = reply
        sizes = {len(cast(np.ndarray, masked_vector(r))) for r in survivors.values()}
        if len(sizes) > 1:
            raise SecAggAbort(f"the masked vectors differ in length: {sorted(sizes)}")
        excluded: set[int] = set()
        for node, reply in survivors.items():
            excluded |= set(run.forward[node][0]) - accepted_peers(reply)
        for node in sorted(excluded):
            self.lose(run, "excluded", node, "sent a share its neighbour could not open")
            if node in survivors:
                del survivors[node]
                failed.append(
                    error_reply(
                        run.instructions[node],
                        "excluded from secure aggregation: a malformed share",
                    )
                )
        if not survivors:
            raise SecAggAbort("no client sent a masked vector")
        return survivors, failed

    def unmask_stage(self, run: ProtocolRun, survivors: dict[int, Message]) -> ArrayRecord:
        """Stage 3: ask the survivors for shares of each survivor's seed b and each dropout's
        mask key; rebuild them, remove every mask from the sum, decode the mean update."""
        accepted = {u: accepted_peers(r) for u, r in survivors.items()}
        alive = set(survivors)
        dead = {d for u in alive for d in accepted[u]} - alive
        for node in sorted(alive | dead):
            holders = {u for u in alive if node in accepted[u]} | ({node} & alive)
            if len(holders) < run.t:
                raise SecAggAbort(
                    f"fewer than t survivors: node {node}'s secrets have {len(holders)} live "
                    f"share holders, t = {run.t}; nothing was aggregated"
                )
        asked = {
            u: (sorted(alive & (accepted[u] | {u})), sorted(dead & accepted[u])) for u in alive
        }
        answers = self.send(
            run, SecAggStage.UNMASK, {u: {K.ALIVE: a, K.DEAD: d} for u, (a, d) in asked.items()}
        )
        seed_shares: dict[int, list[bytes]] = {u: [] for u in alive}
        key_shares: dict[int, list[bytes]] = {d: [] for d in dead}
        for node, answer in answers.items():
            alive_asked, dead_asked = asked[node]
            shares = answer.get(K.SHARES)
            if answer.get(K.PEERS) != alive_asked + dead_asked or not isinstance(shares, list):
                self.lose(run, SecAggStage.UNMASK, node, "sent other shares than asked for")
                continue
            for peer, share in zip(
                alive_asked + dead_asked, cast(list[bytes], shares), strict=True
            ):
                (seed_shares[peer] if peer in alive else key_shares[peer]).append(share)
        vectors = [cast(np.ndarray, masked_vector(r)) for r in survivors.values()]
        total = np.stack(vectors).sum(axis=0, dtype=np.uint64)  # wraps in Z_2^64
        for node, shares in seed_shares.items():
            add_mask(total, self.rebuild(run, node, shares, "mask seed"), -1)
        for node, shares in key_shares.items():
            secret = private_key(self.rebuild(run, node, shares, "mask key"))
            if public_key_to_bytes(secret.public_key()) != run.keys[node][1]:
                raise SecAggAbort(f"node {node}'s rebuilt mask key does not match its public key")
            for peer in alive:
                if node in accepted[peer]:
                    seed = pair_seed(secret, bytes_to_public_key(run.keys[peer][1]))
                    add_mask(total, seed, -pair_sign(peer, node))
        weight, update = decode(total, self.clip_range, self.quantization_bits)
        if weight > max_weight(self.quantization_bits, len(run.instructions)) * len(alive):
            raise SecAggAbort("the unmasked weights are out of range: a mask was not removed")
        return apply_update(run.sent, update)

    # --- helpers ---------------------------------------------------------------------
    def stage_config(self, run: ProtocolRun, stage: str, values: dict[str, Any]) -> ConfigRecord:
        return ConfigRecord({K.STAGE: stage, K.ROUND: run.server_round, **values})

    def send(
        self, run: ProtocolRun, stage: str, configs: dict[int, dict[str, Any]]
    ) -> dict[int, ConfigRecord]:
        """One protocol stage over the Grid: each client's answer, by node; the rest lost."""
        messages = [
            Message(
                RecordDict({SECAGG: self.stage_config(run, stage, values)}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(run.server_round),
            )
            for node, values in configs.items()
        ]
        answers: dict[int, ConfigRecord] = {}
        heard: set[int] = set()
        for reply in run.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in configs or node in heard:
                continue
            heard.add(node)
            if reply.has_error() or SECAGG not in reply.content.config_records:
                self.lose(
                    run,
                    stage,
                    node,
                    str(reply.error.reason) if reply.has_error() else "sent no answer",
                )
                continue
            answers[node] = reply.content.config_records[SECAGG]
        for node in configs.keys() - heard:
            self.lose(run, stage, node, "never answered")
        return answers

    def rebuild(self, run: ProtocolRun, node: int, shares: list[bytes], what: str) -> bytes:
        """A secret from t of its shares (Flower's Shamir); abort if too few came back."""
        if len(shares) < run.t:
            raise SecAggAbort(
                f"only {len(shares)} shares of node {node}'s {what} came back; t = {run.t}"
            )
        try:
            secret = combine_shares(shares[: run.t])
        except ValueError:
            raise SecAggAbort(
                f"node {node}'s {what} could not be rebuilt from its shares"
            ) from None
        if what == "mask seed" and len(secret) != SEED_BYTES:
            raise SecAggAbort(f"node {node}'s rebuilt {what} has {len(secret)} bytes")
        return secret

    def lose(self, run: ProtocolRun, stage: str, node: int, why: str) -> None:
        run.dropped[stage] = run.dropped.get(stage, 0) + 1
        run.reasons.append(f"secure aggregation, {stage}: node {node} {why}")

    def fail(self, run: ProtocolRun, reason: str) -> None:
        self.record(run, aggregated=0)
        self.report["secagg_failure"] = reason
        self.report["failure_reasons"] = [reason, *run.reasons]

    def record(self, run: ProtocolRun, aggregated: int) -> None:
        self.report = {
            "secagg_degree": len(next(iter(run.neighbours.values()), [])),
            "secagg_threshold": run.t,
            "secagg_aggregated": aggregated,
            **{f"secagg_lost_{stage.replace('-', '_')}": n for stage, n in run.dropped.items()},
            "secagg_seconds": run.seconds,
            "num_clients": aggregated,  # whose updates are in the sum (0: a failed round)
        }


def readable(*keys: bytes) -> bool:
    try:
        for key in keys:
            bytes_to_public_key(key)
    except (ValueError, TypeError):
        return False
    return True


def accepted_peers(reply: Message) -> set[int]:
    """The peers whose shares a client opened (its collect reply says)."""
    return {
        int(p) for p in cast(list[int], reply.content.config_records[SECAGG].get(K.ACCEPTED, []))
    }


def masked_vector(reply: Message) -> np.ndarray | None:
    """The uint64 masked vector of a collect reply, or None."""
    if reply.has_error() or SECAGG_MASKED not in reply.content.array_records:
        return None
    record = reply.content.array_records[SECAGG_MASKED]
    if K.VECTOR not in record or SECAGG not in reply.content.config_records:
        return None
    vector = record[K.VECTOR].numpy()
    return vector if vector.dtype == np.uint64 and vector.ndim == 1 else None


def summing_base(strategy: Strategy) -> Strategy:
    """The strategy that aggregates, through Oort and Flower's client-side DP wrapper; a ConfigError
    naming why for any whose aggregation needs the plain updates."""
    base = strategy
    if isinstance(base, Oort):  # it only chooses the clients
        base = base.strategy
    if isinstance(base, DifferentialPrivacyClientSideFixedClipping):
        base = base.strategy
    name = type(base).__name__
    for cls, why in REFUSED.items():
        if isinstance(base, cls):
            raise ConfigError(
                f"secure_aggregation: strategy {name} {why}, but the server sees only the sum; "
                "use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
            )
    owner = next(c for c in type(base).__mro__ if "aggregate_train" in vars(c))
    if owner not in SUMMING:
        raise ConfigError(
            f"secure_aggregation: strategy {name} aggregates with its own "
            f"{owner.__name__}.aggregate_train, not a weighted sum of one model update; "
            "use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
        )
    return base
