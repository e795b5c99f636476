"""Downstream evaluation of pretrained encoders: fine-tuning, linear / attentive probes, kNN (entry points in run.py)."""
