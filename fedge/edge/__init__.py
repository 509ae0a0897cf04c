"""What runs on or for a device: on-device co-scheduling of real-time inference and local
training (XRBench scenarios, FCFS/EDF/latency-greedy/DREAM-like schedulers)."""
