"""Data sets: the procedural SportBalls generator, writer and reader."""

from gradcheck.data.sportballs import (
    GENERATOR_VERSION,
    SPLITS,
    SportBalls,
    ball_masks,
    generate_dataset,
    load_factors,
    load_split,
    load_tensors,
    render_images,
)

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "SportBalls",
    "ball_masks",
    "generate_dataset",
    "load_factors",
    "load_split",
    "load_tensors",
    "render_images",
]
