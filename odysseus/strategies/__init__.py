"""The four strategies as modules: the registry, the regions, and the attention and FFN modules they build."""
