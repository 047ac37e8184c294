"""Independent PyTorch reference of the switchyard model (see model.py)."""
