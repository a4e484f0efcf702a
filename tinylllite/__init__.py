"""tinylllite: ControlNet and ControlNet-LLLite in plain PyTorch, on diffusers' Stable Diffusion parts.

Each file holds one idea and reads top to bottom; import the one you need, e.g.
`from tinylllite.controlnet import ControlNet` or `from tinylllite.lllite_unet import attach_lllite`.
"""
