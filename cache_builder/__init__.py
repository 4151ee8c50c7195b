"""cache_builder: run a source model once over a corpus and store its sparse top-k signals."""

__version__ = "0.1.0"
