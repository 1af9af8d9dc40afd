"""dynamic_s2: multi-scale, any-aspect-ratio feature extraction through any vision backbone.

The pipeline runs in one direction::

    sizes --plan_tiles--> TilePlan --tile_images--> TileBatch --encode_tiles--> features --merge-->
    MultiScaleFeatures

:func:`forward` runs all four stages and :class:`DynamicS2` wraps them in an ``nn.Module``.
"""

from .api import DynamicS2, default_scales, forward
from .backbones import Backbone, as_backbone, load_backbone
from .budget import plan_batch
from .encode import encode_tiles
from .merge import MultiScaleFeatures, merge
from .plan import ScalePlan, TilePlan, plan_tiles
from .tiling import TileBatch, collate, resize, tile_images

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "DynamicS2",
    "MultiScaleFeatures",
    "ScalePlan",
    "TileBatch",
    "TilePlan",
    "__version__",
    "as_backbone",
    "collate",
    "default_scales",
    "encode_tiles",
    "forward",
    "load_backbone",
    "merge",
    "plan_batch",
    "plan_tiles",
    "resize",
    "tile_images",
]
