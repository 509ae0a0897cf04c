"""SecAgg+ (Bell et al. 2020) for the Message API: the server learns only the sum.

`SecAggPlus` wraps a summing strategy on the server; `secaggplus_mod` is the client half,
a `flwr.clientapp` mod (fedge's ClientApp carries it; any Flower ClientApp can).
"""

from fedge.strategies.secagg.client import secaggplus_mod
from fedge.strategies.secagg.server import SecAggPlus, summing_base

__all__ = ["SecAggPlus", "secaggplus_mod", "summing_base"]
