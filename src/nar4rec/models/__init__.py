"""Rerankers, one per file, and the few layers they share (layers.py)."""
