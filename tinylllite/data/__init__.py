"""Data: Fill50K, paired image folders, kohya's dataset .toml, dataset checks, Canny edges, fidelity metrics."""
