"""The Stable Diffusion being controlled: its parts, its tokenizer, its module names, its configs, the tiny SD."""
