"""How tutorial_train.py's settings are read: its config blocks, a preset, then the flags given.

The script's top holds plain dicts (one block per branch, one per preset); this file turns them into a
command line. Every key of a block is a flag in both spellings (`--batch-size` and `--batch_size`), read
by a type that refuses a bad value where it is parsed, naming the flag (nanoGPT keeps the same machinery
apart from its training script, in `configurator.py`). Left out: config files; the blocks are the config.
"""
import argparse

from tinylllite.data.fidelity import EVALUATION_SEED
from tinylllite.errors import InputError
from tinylllite.run.cores import usable_cores
from tinylllite.run.batches import TIMESTEP_SAMPLING
from tinylllite.training import LOSS_WEIGHTINGS


def strict_bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def count(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    return parse


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def off_or_positive(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, or 0 for off, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (0 = off; e.g. 0.999), got {text}")
    return value


def thread_count(text: str) -> int:
    """--threads: at most the cores this process may run on (its CPU affinity)."""
    value, cores = count(1)(text), len(usable_cores())
    if value > cores:
        raise argparse.ArgumentTypeError(f"{value} threads for {cores} usable cores: more threads than "
                                         f"cores only wait on each other; give 1 to {cores}")
    return value


# how each setting is read from the command line (0 = off where a count or snr_gamma allows it)
SETTING_TYPES = dict(
    batch_size=count(1), learning_rate=positive_float, gradient_accumulation=count(1), max_steps=count(1),
    max_minutes=positive_float, sd_locked=strict_bool, only_mid_control=strict_bool, prompt_dropout=fraction,
    timestep_sampling=str, snr_gamma=off_or_positive, loss_weighting=str, lr_decay=fraction, ema_decay=decay, max_grad_norm=positive_float, mixed_precision=str,
    gradient_checkpointing=strict_bool, use_8bit_adam=strict_bool, cache=strict_bool, data_workers=count(0),
    channels_last=strict_bool, compile=strict_bool,
    logger_freq=count(0), log_every=count(1), eval_metric=str, canny_low=positive_float, canny_high=positive_float,
    eval_every=count(0), eval_pairs=count(1), eval_steps=count(1), eval_cfg=positive_float, checkpoint_every=count(1),
    keep_checkpoints=count(1), seed=count(0), threads=thread_count, cond_emb_dim=count(1), mlp_dim=count(1),
    lllite_blocks=str)
CHOICES = dict(mixed_precision=("fp32", "bf16", "fp16"), eval_metric=("fill50k-iou", "edge-f1", "none"),
               timestep_sampling=TIMESTEP_SAMPLING, loss_weighting=tuple(LOSS_WEIGHTINGS))
SWITCHES = ("gradient_checkpointing", "use_8bit_adam", "cache", "compile")  # `--cache` alone means true


def parse_args(argv, branches: dict, presets: dict, description: str) -> argparse.Namespace:
    """The command line of tutorial_train.py: run identity flags, then one flag per setting of the blocks."""
    p = argparse.ArgumentParser(prog="tutorial_train.py", description=description)
    every_key = {k: v for block in branches.values() for k, v in block.items()}

    def add(name, **kw):  # --batch-size and --batch_size both work
        p.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, **kw)

    add("control", choices=tuple(branches), help="which branch to train (default controlnet; a resumed run: its own)")
    add("preset", choices=tuple(presets), help="settings for a real SD base (default for any base but the tiny SD)")
    add("base", help="'tiny' (the package's tiny SD, the default) or an SD checkpoint file / diffusers folder "
                     "(a resumed run: its own)")
    add("data", help="training data: a Fill50K-layout folder, JSON Lines file or kohya .toml "
                     "(default ./training/fill50k; tiny SD: ./training/fill50k_<size>, made if missing; "
                     "a resumed run: its own)")
    add("out", help="run folder to create (default ./runs/<control>-<time>)")
    add("resume_from", help="a run folder or checkpoint folder to continue")
    add("resume_path", help="initial control weights: any ControlNet or LLLite file or diffusers folder")
    add("max_train_samples", type=count(1), help="train on the first N pairs only")
    add("cache_dir", default="./cache", help="where --cache keeps encoded latents and prompts (default ./cache)")
    add("eval_seed", type=count(0), default=EVALUATION_SEED,
        help="seed of the held-out evaluation pairs (tuning uses another seed: bench/convergence.py)")
    add("fit_memory", nargs="?", const="pick", choices=("refuse", "warn", "pick"), default="refuse",
        help="on CUDA, a run whose estimated peak exceeds the card's free memory is refused naming switches that "
             "fit (refuse, the default); --fit-memory turns them on (pick); warn runs anyway")
    add("validation_prompt", action="append", default=[], help="with --validation-image; repeatable")
    add("validation_image", action="append", default=[], help="hint image for the --validation-prompt at its place")
    for name, parse in SETTING_TYPES.items():
        extra = dict(nargs="?", const=True) if name in SWITCHES else {}
        add(name, type=parse, choices=CHOICES.get(name), help=f"default {every_key[name]!r} (tiny SD)", **extra)
    args = p.parse_args(argv)
    if len(args.validation_prompt) != len(args.validation_image):
        p.error(f"{len(args.validation_prompt)} --validation-prompt for {len(args.validation_image)} "
                f"--validation-image: give them in pairs")
    return args


def given_settings(args) -> dict:
    """The settings the command line named (a flag left out is None)."""
    return {k: getattr(args, k) for k in SETTING_TYPES if getattr(args, k, None) is not None}


# settings that shape the trained parameters: a resumed run cannot change them
SHAPING = ("sd_locked", "cond_emb_dim", "mlp_dim", "lllite_blocks")


def resolve_settings(args, branches: dict, presets: dict, tiny: bool,
                     recorded: dict | None = None) -> tuple[dict, str | None]:
    """The branch's block, then a preset (sd15 for any real base unless named), then the flags given.

    A resumed run (`recorded`: the config.json it wrote) starts from its own settings and branch instead, so
    a flag given now is applied and recorded, and one that cannot apply to it is refused in one line.
    """
    if recorded is not None:
        if args.control is not None and args.control != recorded["control"]:
            raise InputError(f"--control {args.control}: the run in --resume-from {args.resume_from} trains a "
                             f"{recorded['control']}; drop --control (the run's config says what it is)")
        args.control = recorded["control"]
        args.base = args.base or recorded.get("base")  # the run's own base and data unless others are named
        args.data = args.data or recorded.get("data")
        preset = recorded.get("preset")
        settings = dict(branches[args.control], **recorded["settings"])  # settings newer than the run: defaults
        for name in SHAPING:
            given = getattr(args, name, None)
            if given is not None and name in settings and given != settings[name]:
                raise InputError(f"--{name.replace('_', '-')} {given}: the run in --resume-from {args.resume_from} "
                                 f"was trained with {settings[name]!r}, which decides which weights it trains; "
                                 f"start a new run from its weights with --resume-path instead")
    else:
        args.control = args.control or "controlnet"
        preset = args.preset or (None if tiny else "sd15")
        settings = dict(branches[args.control], **(presets[preset][args.control] if preset else {}))
    args.base = args.base or "tiny"
    settings.update({k: v for k, v in given_settings(args).items() if k in settings})
    if args.control == "lllite" and (not settings["sd_locked"] or settings["only_mid_control"]):
        raise InputError("--sd-locked false / --only-mid-control are ControlNet options; LLLite has no such switch")
    return settings, preset
