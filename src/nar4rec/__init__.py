"""nar4rec: reranking for recommender systems around NAR4Rec (Ren et al., KDD '24).

The library's calls for a user without the command line live in `nar4rec.api` and are
reachable from here (`nar4rec.load`, `nar4rec.write_requests`, ...; docs/python-api.md). They
are imported on first use, so that `import nar4rec` (and the command line's start) stays light.
"""

__version__ = "0.1.0"

_API = ("Exploration", "Reranker", "evaluate", "load", "split_by_time", "train_model",
        "write_requests")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from nar4rec import api
        return getattr(api, name)
    raise AttributeError(f"module 'nar4rec' has no attribute {name!r}")
