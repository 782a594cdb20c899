"""DALL-E 2 / unCLIP family parts: the diffusion prior and the decoder's CLIP conditioning.

- PriorTransformer: CLIP text -> CLIP image embedding (diffusers' PriorTransformer layout).
- UnCLIPTextProjModel: image/text embeddings -> decoder context tokens + time embedding.
- manipulations: the paper's variations (DDIM-inverted x_T), slerp interpolations and text diffs.
"""

from diffkern.models.unclip.prior import PriorTransformer, PriorTransformerOutput
from diffkern.models.unclip.text_proj import UnCLIPTextProjModel

__all__ = ["PriorTransformer", "PriorTransformerOutput", "UnCLIPTextProjModel"]
