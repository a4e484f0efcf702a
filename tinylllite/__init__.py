"""tinylllite: ControlNet and ControlNet-LLLite in plain PyTorch, on diffusers' Stable Diffusion parts.

Each file holds one idea and reads top to bottom; import the one you need, e.g.
`from tinylllite.controlnet import ControlNet` or `from tinylllite.lllite_unet import attach_lllite`.

Reading order. The top of the package is the lesson; the folders hold what it stands on.

1. The two branches (the ideas)
   hint.py             the hint encoder and the one check of a control image (RGB, [0, 1])
   controlnet.py       ControlNet: the trainable encoder copy, zero convs, residuals into the UNet
   lllite.py           one LLLite module and LLLiteLinear, y = W (x + delta) + b
   lllite_unet.py      LLLite modules placed in a diffusers UNet; kohya's key names
   control_branch.py   the one switch between the two (training, sampling and checkpoints ask it)
2. Training and sampling (tutorial_train.py at the top of the repository is the loop)
   training.py         one training step: schedule, loss, optimizer, the NaN guard that never waits for the GPU
   sample.py           images from a base (+ branch): DDIM / UniPC, CFG, the control knobs
   errors.py           how user mistakes are reported
3. sd/      the Stable Diffusion being controlled
   base.py (the four parts, prompt encoding, SD's noise schedule, the size rule), tokenizer.py (CLIP,
   offline), naming.py (diffusers module paths in the original names), tiny_sd.py (the tiny SD), configs/,
   tiny_sd_weights/, assets/
4. files/   files on disk
   atomic.py (temporary, then rename), state_dicts.py (open and write weight files), ldm_format.py
   (original <-> diffusers names), identify.py (what a file holds), sd_loading.py (a base from a file or
   folder), control_io.py (any control file into a branch; the metadata written), checkpoint.py (training
   checkpoints), run_lock.py (one writer per run), convert.py (between layouts)
5. data/    data and how well samples follow it
   fill50k.py, datasets.py, kohya_toml.py, dataset_check.py, canny.py, fidelity.py (Fill50K's disc IoU),
   edge_fidelity.py (edge F1)
6. run/     a training run's machinery
   options.py (the script's flags), batches.py (samples -> batches, the latent cache), stopping.py,
   image_log.py (panels, evaluation, metrics), notebook_setup.py, memory.py (will a run fit a GPU?)

Commands: `python -m tinylllite.sample`, `python -m tinylllite.convert`, `python -m tinylllite.dataset_check`,
`python -m tinylllite.canny`, `python -m tinylllite.memory` (the last four are short names for the files above).
"""
