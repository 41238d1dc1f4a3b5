"""dibjax: greedy layer-wise CNN training with a deterministic information bottleneck.

Every information quantity is estimated with the matrix-based Rényi α-order entropy
(:mod:`dibjax.entropy`).
"""

from dibjax import entropy

__version__ = "0.1.0"
__all__ = ["entropy"]
