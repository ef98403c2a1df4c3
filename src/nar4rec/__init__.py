"""nar4rec: reranking for recommender systems around NAR4Rec (Ren et al., KDD '24)."""

__version__ = "0.1.0"
