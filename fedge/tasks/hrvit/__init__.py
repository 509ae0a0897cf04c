"""HRViT semantic segmentation: the multi-branch model, procedural scenes and the Task."""
