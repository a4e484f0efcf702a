"""tinylllite: ControlNet and ControlNet-LLLite in plain PyTorch, on diffusers' Stable Diffusion parts.

Each file holds one idea and reads top to bottom; import the one you need, e.g.
`from tinylllite.controlnet import ControlNet` or `from tinylllite.lllite_unet import attach_lllite`.

Reading order:

1. The two branches
   hint.py            the hint encoder and the one check of a control image (RGB, [0, 1])
   controlnet.py      ControlNet: the trainable encoder copy, zero convs, residuals into the UNet
   lllite.py          one LLLite module and LLLiteLinear, y = W (x + Δ) + b
   lllite_unet.py     LLLite modules placed in a diffusers UNet; kohya's file format
   control_branch.py  the one switch between the two (training, sampling and checkpoints ask it)
2. The base they control
   base.py            StableDiffusionBase: UNet, VAE, text encoders, SD's noise schedule
   tokenizer.py       the CLIP tokenizer, offline
   tiny_sd.py         the tiny SD shipped with the package, trainable on a CPU
3. Training and sampling (tutorial_train.py at the top of the repository is the loop)
   training.py        the pieces of one training step: schedule, loss, optimizer step, gradient averaging
   batches.py         samples -> batches: per-sample random draws, DataLoader workers, the latent cache
   stopping.py        when a run stops: --max-steps, Ctrl-C, --max-minutes from the start of the process
   sample.py          images from a base (+ branch): DDIM / UniPC, CFG, the control knobs
   image_log.py       the image log, metrics and evaluations of a run
   fidelity.py        Fill50K's disc IoU and colour error; edge_fidelity.py: edge F1 for Canny data
   datasets.py, fill50k.py, canny.py, kohya_toml.py, dataset_check.py, nan_guard.py
   notebook_setup.py  the notebooks' switch between the tiny SD on a CPU and your SD1.5 on a GPU
4. Files on disk
   state_dicts.py     opening and writing weight files, atomically; unreadable files refused
   identify.py        what a file or folder holds: layout, branch or base, SD family
   naming.py          diffusers UNet module paths in the original (LDM) names
   ldm_format.py      state-dict names between the original single-file layout and diffusers
   sd_loading.py      an SD base from an original file or a diffusers folder
   control_io.py      any control file into a branch; the metadata this project writes
   checkpoint.py      training checkpoints: save, resume, load
   convert.py         `python -m tinylllite.convert`: between original, diffusers and kohya layouts
   errors.py          how user mistakes are reported
"""
