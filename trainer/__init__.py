"""mnist8k's trainer: data, augmentation, engine, tracking, serving and the `trainer` command line."""
