"""Files on disk: state dicts, the original and diffusers layouts, telling a file apart, bases, control files, checkpoints."""
