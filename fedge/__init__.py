"""fedge: federated learning for edge devices, built on Flower."""

__version__ = "0.1.0"
