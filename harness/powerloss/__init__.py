"""A disk that loses what was not flushed, and ext4 on it (see stack.py)."""
