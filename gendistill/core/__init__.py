"""Shared core: scenes, cameras, the Gaussian rasterizer, feature alignment, guidance."""
