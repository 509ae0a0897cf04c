"""Oort-style guided participant selection (Lai et al. 2021, "Oort: Efficient Federated
Learning via Guided Participant Selection", Algorithm 1), wrapped around any strategy.

The wrapped strategy configures the round as usual (its model, its config, how many
clients); Oort only chooses who receives those instructions, among the clients online now:
- statistical utility of client i, from its last training reply: U_i = |B_i| sqrt(mean loss^2)
  (|B_i| its examples; fedge clients report the example-weighted mean of their squared batch
  losses, a lower bound of the paper's per-sample mean by Jensen's inequality);
- temporal uncertainty: U_i + sqrt(0.1 ln R / L_i), L_i the round i last took part in;
- system penalty: times (T / t_i)^alpha when its round time t_i exceeds the preferred round
  time T (t_i: the virtual clock's `virtual_seconds`, else the measured `device_seconds`);
- exploitation: (1 - eps) of the slots go to explored clients, sampled in proportion to
  utility among those within c = 0.95 of the cut-off utility; the other eps explore clients
  never tried (random); eps decays from 0.9 by x0.98 a round down to 0.2;
- pacer: T starts at a percentile of the explored clients' round times; every W rounds, if
  the exploited utility of the last W rounds fell below that of the W before, T grows by
  one pacer step (Oort trades a longer round for more statistical utility).
A client whose reply failed (dropped past a deadline, a straggler, a fault) gets utility 0
until it succeeds again. The defaults are the paper's (alpha = 2, eps 0.9 -> 0.2 at 0.98,
c = 0.95, W = 20); `round_percentile` and `pacer_step` are fedge's choices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.errors import ConfigError, did_you_mean
from fedge.strategies.fedbuff import FedBuff
from fedge.strategies.wrapper import StrategyWrapper
from fedge.wire import (
    DEVICE_SECONDS,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_LOSS_SQUARED,
    VIRTUAL_SECONDS,
    number,
)


class Oort(StrategyWrapper):
    """`strategy` with Oort choosing its training clients.

    alpha: straggler penalty exponent. epsilon, epsilon_decay, epsilon_min: exploration.
    cutoff: c, the utility cut-off factor. window: W, rounds per pacer comparison.
    round_percentile: the initial preferred round time T as a percentile of the explored
    clients' round times. pacer_step: seconds T grows by (0: a tenth of its first value).
    seed: the selector's own sampling.
    """

    def __init__(
        self,
        strategy: Strategy,
        alpha: float = 2.0,
        epsilon: float = 0.9,
        epsilon_decay: float = 0.98,
        epsilon_min: float = 0.2,
        cutoff: float = 0.95,
        window: int = 20,
        round_percentile: float = 50.0,
        pacer_step: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not (0 <= epsilon_min <= epsilon <= 1 and 0 < epsilon_decay <= 1 and 0 < cutoff <= 1):
            raise ValueError(
                "oort needs 0 <= epsilon_min <= epsilon <= 1, 0 < epsilon_decay <= 1 and "
                f"0 < cutoff <= 1; got {epsilon_min}, {epsilon}, {epsilon_decay}, {cutoff}"
            )
        if alpha < 0 or window < 1 or not 0 < round_percentile <= 100 or pacer_step < 0:
            raise ValueError(
                "oort needs alpha >= 0, window >= 1, 0 < round_percentile <= 100 and "
                f"pacer_step >= 0; got {alpha}, {window}, {round_percentile}, {pacer_step}"
            )
        super().__init__(strategy)
        self.alpha, self.epsilon, self.epsilon_decay = alpha, epsilon, epsilon_decay
        self.epsilon_min, self.cutoff, self.window = epsilon_min, cutoff, window
        self.round_percentile, self.pacer_step = round_percentile, pacer_step
        self.rng = np.random.default_rng(seed)
        self.utility: dict[int, float] = {}  # explored clients' statistical utility
        self.duration: dict[int, float] = {}  # their last round time
        self.last_round: dict[int, int] = {}  # L_i
        self.preferred = 0.0  # T (0: not yet known)
        self.exploited: set[int] = set()
        self.exploit_utility: list[float] = []  # per round: utility of the exploited

    # --- selection --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's instructions, sent to the clients Oort picks."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        chosen = self.select(server_round, len(messages), list(grid.get_node_ids()))
        return [
            Message(m.content, node, m.metadata.message_type, group_id=m.metadata.group_id)
            for m, node in zip(messages, chosen, strict=True)
        ]

    def scores(self, server_round: int, nodes: list[int]) -> np.ndarray:
        """Utility + temporal uncertainty, times the system penalty past T."""
        out = np.empty(len(nodes))
        for j, node in enumerate(nodes):
            score = self.utility[node] + math.sqrt(
                0.1 * math.log(max(server_round, 2)) / max(self.last_round[node], 1)
            )
            t = self.duration.get(node, 0.0)
            if self.preferred and t > self.preferred:
                score *= (self.preferred / t) ** self.alpha
            out[j] = score
        return out

    def select(self, server_round: int, count: int, online: list[int]) -> list[int]:
        """`count` clients of `online`: exploit (1 - eps) of them, explore the rest."""
        explored = [n for n in online if n in self.utility]
        fresh = [n for n in online if n not in self.utility]
        n_exploit = min(len(explored), count - min(len(fresh), round(self.epsilon * count)))
        exploit: list[int] = []
        if n_exploit:
            scores = self.scores(server_round, explored)
            bar = self.cutoff * np.sort(scores)[::-1][n_exploit - 1]
            pool = np.flatnonzero(scores >= bar)
            weights = scores[pool] + 1e-12
            picks = self.rng.choice(pool, n_exploit, replace=False, p=weights / weights.sum())
            exploit = [explored[i] for i in picks]
        explore = [int(n) for n in self.rng.permutation(fresh)[: count - n_exploit]]
        self.exploited = set(exploit)
        self.epsilon = max(self.epsilon * self.epsilon_decay, self.epsilon_min)
        return exploit + explore

    # --- feedback -------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.feedback(server_round, replies)
        return self.strategy.aggregate_train(server_round, replies)

    def feedback(self, server_round: int, replies: list[Message]) -> None:
        """Each reply updates its client's utility, round time and last round; the pacer
        and the preferred round time move."""
        gained = 0.0
        for reply in replies:
            node = reply.metadata.src_node_id
            self.last_round[node] = server_round
            if reply.has_error() or METRICS not in reply.content.metric_records:
                self.utility[node] = 0.0
                continue
            m = reply.content.metric_records[METRICS]
            squared = number(m, TRAIN_LOSS_SQUARED, number(m, TRAIN_LOSS, 0.0) ** 2)
            self.utility[node] = number(m, NUM_EXAMPLES, 0.0) * math.sqrt(max(squared, 0.0))
            seconds = VIRTUAL_SECONDS if VIRTUAL_SECONDS in m else DEVICE_SECONDS
            if seconds in m:
                self.duration[node] = number(m, seconds)
            if node in self.exploited:
                gained += self.utility[node]
        self.exploit_utility.append(gained)
        self.pace()

    def pace(self) -> None:
        if not self.preferred and self.duration:
            self.preferred = float(
                np.percentile(list(self.duration.values()), self.round_percentile)
            )
            self.pacer_step = self.pacer_step or self.preferred / 10
            return
        w, history = self.window, self.exploit_utility
        if self.preferred and len(history) >= 2 * w and len(history) % w == 0:
            if sum(history[-w:]) < sum(history[-2 * w : -w]):
                self.preferred += self.pacer_step

    def round_metrics(self) -> dict[str, Any]:
        return {
            "oort_preferred_seconds": self.preferred,
            "oort_epsilon": self.epsilon,
            "oort_explored": len(self.utility),
        }


def with_oort(strategy: Strategy, options: dict[str, Any], seed: int = 0) -> Oort:
    """`strategy` wrapped in Oort's selector; bad options are a ConfigError naming them."""
    if isinstance(strategy, FedBuff):
        raise ConfigError(
            "selection: oort chooses the clients of synchronous rounds; fedbuff starts its "
            "own clients as others finish. Use --selection random with fedbuff"
        )
    known = [p for p in inspect.signature(Oort).parameters if p != "strategy"]
    for key in options:
        if key not in known:
            raise ConfigError(
                f"selection_options: unknown option {key!r}{did_you_mean(key, known)}; "
                f"oort takes {', '.join(known)}"
            )
    try:
        return Oort(strategy, **{"seed": seed, **options})
    except (TypeError, ValueError) as exc:  # a value of the wrong type or out of range
        raise ConfigError(f"selection_options: {exc}") from None
