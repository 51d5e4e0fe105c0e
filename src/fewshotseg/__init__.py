"""fewshotseg: few-shot semantic segmentation methods behind one Lightning + Hydra interface."""

__version__ = "0.1.0"

from fewshotseg import resolvers as _resolvers  # noqa: E402,F401  (config resolvers)
