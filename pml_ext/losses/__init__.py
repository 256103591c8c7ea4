from .embedding_expansion_loss import EmbeddingExpansionLoss
from .hphn_triplet_loss import HPHNTripletLoss

__all__ = ["EmbeddingExpansionLoss", "HPHNTripletLoss"]
