"""dynamic_s2: multi-scale, any-aspect-ratio feature extraction through any vision backbone.

The pipeline runs in one direction::

    sizes --plan_tiles--> TilePlan --tile_images--> TileBatch --encode_tiles--> features --merge-->
    MultiScaleFeatures

:func:`prepare` plans and tiles (CPU, no model), :func:`run` encodes and merges; :func:`forward`
is the two in a row and :class:`DynamicS2` wraps it in an ``nn.Module``. Every option is a field of
:class:`S2Options`.
"""

from . import nvila, s2wrapper
from .api import DynamicS2, forward, prepare, run
from .backbones import Backbone, as_backbone, load_backbone
from .budget import plan_batch
from .encode import encode_tiles
from .merge import MultiScaleFeatures, merge
from .options import S2Options, default_scales
from .plan import ScalePlan, TilePlan, plan_tiles
from .tiling import TileBatch, collate, resize, tile_images

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "DynamicS2",
    "MultiScaleFeatures",
    "S2Options",
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
    "nvila",
    "plan_batch",
    "plan_tiles",
    "prepare",
    "resize",
    "run",
    "s2wrapper",
    "tile_images",
]
