"""What runs on or for a device: the warm ClientApp runtime beside a Flower SuperNode
(runtime, supervisor, supernode, poll) and on-device co-scheduling of real-time inference and
local training (XRBench scenarios, FCFS/EDF/latency-greedy/DREAM-like schedulers)."""
