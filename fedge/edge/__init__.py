"""What runs on or for a device: the warm ClientApp runtime beside a Flower SuperNode."""
