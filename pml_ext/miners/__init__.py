from .embedding_expansion_miner import EmbeddingExpansionMiner, HardenedBatch

__all__ = ["EmbeddingExpansionMiner", "HardenedBatch"]
