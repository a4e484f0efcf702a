"""A training run's machinery: batches and their random draws, when to stop, the image log, the notebooks' setup."""
