"""fedge.privacy."""
