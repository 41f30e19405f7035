"""Files in and out, with no knowledge of the method: the checkpoints users bring (modules, state dicts,
safetensors/.pt files, HF directories), open_clip key names mapped to HF's, hub ids and the offline check, and
atomic writes with regular-file checks. The lowest wing of ``mass``: it imports nothing of ``mass``."""
