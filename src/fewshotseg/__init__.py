"""fewshotseg: few-shot semantic segmentation methods behind one Lightning + Hydra interface."""

__version__ = "0.1.0"
