"""On-device language modelling: MobileLLM (model.py), LayerSkip (layerskip.py), LoRA
(lora.py), local text (data.py) and the federated task (task.py)."""
