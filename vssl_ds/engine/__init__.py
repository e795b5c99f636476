"""Engine package. `deepspeed.py` is imported lazily by the loop so configs and tools load without it."""
