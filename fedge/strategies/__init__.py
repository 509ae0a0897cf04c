"""Strategies: Flower's by name, fedge's own, and any Strategy subclass as `module:Class`."""

from fedge.strategies.registry import STRATEGIES, build_strategy, strategy_class

__all__ = ["STRATEGIES", "build_strategy", "strategy_class"]
