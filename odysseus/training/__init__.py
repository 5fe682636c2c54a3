"""What a training loop calls around the parallel modules: ``parallelize``; ``dense_state_dict``,
``finalize_grads`` and ``zero3`` (state.py); the dense model's gradient norm and clipping (clip.py); and
``MemoryTracker`` (memtrack.py)."""
