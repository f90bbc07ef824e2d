"""Old path of `hf_m2n2.demo.tasks`, kept for specs naming `hf_m2n2.tasks.digits:...` (aliases, same objects)."""
