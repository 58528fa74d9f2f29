"""Checkpoints in the layouts of the original research repositories (e.g. haotian-liu/LLaVA)."""
