"""fedge.data."""
