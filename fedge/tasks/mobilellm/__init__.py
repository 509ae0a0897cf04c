"""On-device language modelling: MobileLLM (model.py), LayerSkip (layer_dropout.py,
early_exit.py, the training recipe layerskip.py, self-speculative decoding speculative.py),
LoRA (lora.py), local text (data.py) and the federated task (task.py)."""
