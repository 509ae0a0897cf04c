"""A user-written strategy, importable as `plugin_strategies:CountingFedAvg` in tests."""

from flwr.serverapp.strategy import FedAvg

CALLS: list[int] = []


class CountingFedAvg(FedAvg):
    """FedAvg that records each round it aggregates, so a test can see it was used."""

    def __init__(self, tag: str = "", **kwargs):
        super().__init__(**kwargs)
        self.tag = tag

    def aggregate_train(self, server_round, replies):
        CALLS.append(server_round)
        return super().aggregate_train(server_round, replies)
