from .embedding_expansion_loss import EmbeddingExpansionLoss
from .hdml_loss import HDMLLoss, HDMLNonFiniteError
from .hphn_triplet_loss import HPHNTripletLoss
from .running_loss_average import RunningLossAverage

__all__ = ["EmbeddingExpansionLoss", "HDMLLoss", "HDMLNonFiniteError", "HPHNTripletLoss", "RunningLossAverage"]
