"""fedge.strategies."""
