"""fuse_trainer: train a pivot model from cached source signals; never loads a source model."""
