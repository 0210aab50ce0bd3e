"""gradcheck: why classifier guidance works or fails, measured step by step."""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("baseball", "basketball", "soccer", "volleyball")
"""SportBalls classes in label order; index 0 (baseball) is the papers' target class."""
