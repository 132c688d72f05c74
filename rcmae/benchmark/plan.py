"""The benchmark's plan: backbones x protocols x a preset -> a graph of tool runs, each in its own folder.

    export  -> cost, pictures, knn, linprobe, finetune, detection
    finetune -> robustness (on the fine-tuned classifier)

A job is the command line a user could type (``python -m rcmae.tools.<tool> ...``); its folder is the
tool's output directory, ``<output>/<backbone>/<protocol>``. The preset (``configs/benchmark/*.yaml`` or a
user's YAML) names each protocol's recipe by ViT size, its overrides and its share of a cluster.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rcmae.core.config import config_path, read_sections
from rcmae.core.errors import ConfigError

PROTOCOLS = ("knn", "linprobe", "finetune", "detection", "robustness")
DETECTION_PROTOCOLS = ("vitdet", "paper")
# preset sections: the protocols, the detection protocols by name, the cost measurement and the feature pictures
PRESET_SECTIONS = ("cost", "pictures", "knn", "linprobe", "finetune", "detection_vitdet", "detection_paper",
                   "robustness")
PRESET_KEYS = ("config", "overrides", "slurm")
SLURM_KEYS = ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout", "partition", "account", "qos",
              "constraint")
# how each tool spreads over the processes of a machine: torchrun, detectron2's own launch, not at all, or not at
# all and always on this machine (seconds of CPU work, never worth a SLURM job)
TOOLS = {"export": ("export_encoder", "here"), "pictures": ("visualize", "here"),
         "cost": ("measure_cost", "single"), "knn": ("knn", "torchrun"),
         "linprobe": ("linprobe", "torchrun"), "finetune": ("finetune", "torchrun"),
         "detection": ("train_det", "detectron2"), "robustness": ("eval_robustness", "torchrun")}
SIZES = {"vit_micro_patch8": "micro", "vit_mini_patch8": "mini", "vit_tiny_patch16": "tiny",
         "vit_small_patch16": "small", "vit_base_patch16": "base", "vit_large_patch16": "large",
         "vit_huge_patch14": "huge"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Backbone:
    """What is benchmarked: a checkpoint of any origin (None: a randomly initialised ``arch``, a baseline),
    its architecture read off its tensors, and the pretraining run that made it when known (its curves)."""
    name: str
    checkpoint: str | None
    arch: str
    img_size: int
    origin: str
    run_dir: str | None = None

    @property
    def size(self) -> str:
        return SIZES[self.arch]


def read_backbone(spec: str) -> Backbone:
    """``[NAME=]PATH`` (a checkpoint file, a pretraining run directory, an exported encoder) or
    ``[NAME=]random:ARCH[@IMG_SIZE]``; the name defaults to the run directory's or file's."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = "", spec
    if source.startswith("random:"):
        arch, _, size = source[len("random:"):].partition("@")
        if arch not in SIZES:
            raise ConfigError(f"backbone {spec!r}: unknown architecture {arch!r}; choose one of {', '.join(SIZES)}")
        from rcmae.core.vit import ARCHS

        img = int(size) if size.isdigit() else (64 if ARCHS[arch]["patch_size"] == 8 else 224)
        return Backbone(check_name(name or "random", spec), None, arch, img, "random initialisation")
    path, run_dir = Path(source).expanduser(), None
    if path.is_dir():
        from rcmae.core.checkpoint import find_last_checkpoint

        last = find_last_checkpoint(path)
        if last is None:
            raise ConfigError(f"backbone {spec!r}: {path} is a folder without a last_checkpoint pointer: pass a "
                              "pretraining run directory or a checkpoint file")
        run_dir, name = absolute(path), name or Path(absolute(path)).name
        path = last
    elif not path.is_file():
        raise ConfigError(f"backbone {spec!r}: {path} does not exist")
    elif (path.parent / "metrics.jsonl").is_file() and (path.parent / "last_checkpoint").is_file():
        run_dir = absolute(path.parent)  # a checkpoint inside its pretraining run: the curves are known
    arch, img_size, origin = checkpoint_arch(path)
    return Backbone(check_name(name or path.stem, spec), absolute(path), arch, img_size, origin, run_dir)


def absolute(path: str | Path) -> str:
    """An absolute path as the user named it (symbolic links kept: the commands show the user's paths)."""
    return os.path.abspath(Path(path).expanduser())


def check_name(name: str, spec: str) -> str:
    if not NAME.match(name):
        raise ConfigError(f"backbone {spec!r}: the name {name!r} is not a folder name (letters, digits, . _ -): "
                          "write NAME=PATH")
    return name


def checkpoint_arch(path: Path) -> tuple[str, int, str]:
    """(arch, input size, origin) of a checkpoint's encoder, read off its tensors."""
    from rcmae.core.checkpoint import encoder_arch, read_checkpoint

    ckpt = read_checkpoint(path)
    which, sd = ckpt.model("auto")
    arch, img_size = encoder_arch(sd, str(path))
    meta = ckpt.raw.get("meta") if isinstance(ckpt.raw.get("meta"), dict) else {}
    if "which" in meta:  # written by tools/export_encoder.py
        return arch, img_size, f"exported encoder ({meta['which']} weights of {meta.get('source')} {meta.get('from')})"
    origin = {"ours": "ours (pretraining)", "rcmae": "official RC-MAE", "mae": "MAE-format",
              "timm": "timm state dict", "ours-classifier": "our classifier"}[ckpt.source]
    return arch, img_size, f"{origin}, {which} weights" if ckpt.source in ("ours", "rcmae") else origin


@dataclass(frozen=True)
class DataRoots:
    """The datasets, laid out as distributed: ImageNet ``train/`` and ``val/`` wnid folders, COCO 2017
    (``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/``), ImageNet-C
    (``corruption/severity/wnid``), -A, -R, -Sketch (wnid folders)."""
    imagenet: str | None = None
    coco: str | None = None
    imagenet_c: str | None = None
    imagenet_a: str | None = None
    imagenet_r: str | None = None
    imagenet_sketch: str | None = None

    def resolved(self) -> DataRoots:
        return DataRoots(**{k: absolute(v) if v else None for k, v in asdict(self).items()})

    @property
    def robustness(self) -> dict[str, str]:
        sets = {"imagenet_c": self.imagenet_c, "imagenet_a": self.imagenet_a, "imagenet_r": self.imagenet_r,
                "imagenet_sketch": self.imagenet_sketch}
        return {k: v for k, v in sets.items() if v}

    def coco_files(self) -> dict[str, tuple[str, str]]:
        root = Path(self.coco)
        return {split: (str(root / "annotations" / f"instances_{split}2017.json"), str(root / f"{split}2017"))
                for split in ("train", "val")}


@dataclass
class Job:
    """One tool run: ``python -m rcmae.tools.<tool> <args>`` with its output in ``dir``."""
    backbone: str
    protocol: str  # export, cost, pictures, knn, linprobe, finetune, detection, robustness
    section: str  # the preset's section it follows (detection_vitdet or detection_paper for detection)
    args: list[str]
    dir: str
    deps: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)  # this job's share of a cluster (the launch options)
    inputs: dict = field(default_factory=dict)  # files the job reads that an upstream job writes: {arg: job}

    @property
    def name(self) -> str:
        return f"{self.backbone}/{self.protocol}"

    @property
    def tool(self) -> str:
        return TOOLS[self.protocol][0]

    @property
    def spread(self) -> str:
        return TOOLS[self.protocol][1]


# ------------------------------------------------------------------------------------------------ presets
def load_preset(name: str) -> tuple[str, dict]:
    """(path, sections) of a shipped preset (``paper``, ``quick``, ``demo``) or a user's YAML file, every
    key and config file checked."""
    path = Path(name)
    if not path.is_file():
        try:
            path = config_path(f"benchmark/{name}.yaml")
        except ConfigError:
            raise ConfigError(f"--preset {name}: neither a file nor a shipped preset (paper, quick, demo)") from None
    preset = read_sections(path)
    for section, entry in preset.items():
        where = f"{path}: {section}"
        if section not in PRESET_SECTIONS:
            raise ConfigError(f"{where}: unknown section; the sections are {', '.join(PRESET_SECTIONS)}")
        entry = preset[section] = entry or {}
        unknown = set(entry) - set(PRESET_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; a section has {', '.join(PRESET_KEYS)}")
        configs = entry.get("config")
        for size, file in (configs.items() if isinstance(configs, dict) else [("", configs)]):
            if file is not None:
                config_path(file)  # a ConfigError naming the closest shipped configs
            if size and size not in SIZES.values():
                raise ConfigError(f"{where}.config: {size!r} is no ViT size ({', '.join(SIZES.values())})")
        if not all(isinstance(o, str) and "=" in o for o in entry.get("overrides", [])):
            raise ConfigError(f"{where}.overrides: a list of key=value strings")
        unknown = set(entry.get("slurm", {})) - set(SLURM_KEYS)
        if unknown:
            raise ConfigError(f"{where}.slurm: unknown key(s) {sorted(unknown)}; allowed: {', '.join(SLURM_KEYS)}")
    return str(path), preset


def recipe(preset: dict, section: str, backbone: Backbone, preset_path: str) -> str | None:
    """The config file of ``section`` for the backbone's size; a ConfigError if the preset has none."""
    configs = preset.get(section, {}).get("config")
    if not isinstance(configs, dict):
        return configs
    if backbone.size not in configs:
        raise ConfigError(f"{preset_path}: {section} has no recipe for ViT-{backbone.size} (backbone "
                          f"{backbone.name}: {backbone.arch}); it has {', '.join(configs)}. Add one, or leave the "
                          "protocol out (--protocols)")
    return configs[backbone.size]


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Settings:
    """Everything of a benchmark but its backbones: the same for every backbone of an output directory."""
    protocols: list[str]
    detection: str
    preset: str
    data: DataRoots
    overrides: dict[str, list[str]] = field(default_factory=dict)  # --override PROTOCOL:key=value

    def to_json(self) -> dict:
        return {**asdict(self), "data": asdict(self.data)}

    @classmethod
    def from_json(cls, d: dict) -> Settings:
        return cls(**{**d, "data": DataRoots(**d["data"])})


def check_settings(s: Settings) -> None:
    """The protocols exist and have their data."""
    unknown = set(s.protocols) - set(PROTOCOLS)
    if unknown or not s.protocols:
        raise ConfigError(f"--protocols {','.join(s.protocols)}: choose among {', '.join(PROTOCOLS)}")
    if s.detection not in DETECTION_PROTOCOLS:
        raise ConfigError(f"--detection {s.detection}: choose vitdet or paper")
    needs = {"knn": "imagenet", "linprobe": "imagenet", "finetune": "imagenet", "detection": "coco"}
    missing = sorted({f"--{needs[p].replace('_', '-')} (for {p})" for p in s.protocols
                      if p in needs and getattr(s.data, needs[p]) is None})
    if "robustness" in s.protocols and not (s.data.robustness and s.data.imagenet):
        missing.append("--imagenet and at least one of --imagenet-c/-a/-r/-sketch (for robustness)")
    if "robustness" in s.protocols and "finetune" not in s.protocols:
        raise ConfigError("robustness evaluates the fine-tuned classifier: add finetune to --protocols")
    if missing:
        raise ConfigError(f"missing data: {'; '.join(missing)}; or leave the protocol out (--protocols)")
    for protocol, items in s.overrides.items():
        if protocol not in (*PROTOCOLS, "cost", "pictures"):
            raise ConfigError(f"--override {protocol}:...: no such job; jobs are {', '.join(PROTOCOLS)}, cost, "
                              "pictures")


@dataclass(frozen=True)
class Launch:
    """Where the jobs run: ``local`` (one process each, in order), ``torchrun`` (``nproc`` processes
    each) or ``slurm`` (``slurm``: the launch options of every job, which a preset section may lower:
    its ``nodes`` and ``gpus_per_node`` are maxima, its other keys replace)."""
    launcher: str = "local"
    nproc: int = 1
    slurm: dict = field(default_factory=dict)

    def job_slurm(self, section: dict) -> dict:
        if self.launcher != "slurm":
            return {}
        caps = {k: min(v, self.slurm[k]) for k, v in section.items() if k in ("nodes", "gpus_per_node")}
        return {**self.slurm, **section, **caps}

    def world_size(self, job_slurm: dict) -> int:
        if self.launcher == "slurm":
            return job_slurm["nodes"] * max(job_slurm["gpus_per_node"], 1)
        return self.nproc if self.launcher == "torchrun" else 1


def build_plan(backbones: list[Backbone], s: Settings, out_dir: Path, launch: Launch) -> list[Job]:
    """The jobs of every backbone, each after the jobs it depends on."""
    preset_path, preset = load_preset(s.preset)
    return [job for b in backbones for job in backbone_jobs(b, s, preset, preset_path, out_dir / b.name, launch)]


def backbone_jobs(b: Backbone, s: Settings, preset: dict, preset_path: str, root: Path, launch: Launch) -> list[Job]:
    data = s.data
    jobs = []

    def overrides(protocol: str, section: str) -> list[str]:
        return [*preset.get(section, {}).get("overrides", []), *s.overrides.get(protocol, [])]

    def add(protocol: str, section: str, args: list[str], deps=(), inputs=None, last=()) -> Job:
        job = Job(b.name, protocol, section, [*args, *overrides(protocol, section), *last], str(root / protocol),
                  list(deps), launch.job_slurm(preset.get(section, {}).get("slurm", {})), dict(inputs or {}))
        jobs.append(job)
        return job

    encoder, encoder_input = None, {}
    if b.checkpoint is not None:  # every consumer reads the exported encoder (timm keys, teacher for RC-MAE)
        export = add("export", "export", [b.checkpoint, str(root / "export" / "encoder.pth"), "--which", "auto"])
        encoder = str(root / "export" / "encoder.pth")
        encoder_input = {encoder: export.name}
    deps = [jobs[0].name] if jobs else []
    model = [f"model.arch={b.arch}", f"model.img_size={b.img_size}"]
    init = [f"init.checkpoint={encoder}"] if encoder else []
    add("cost", "cost", [*(["--checkpoint", encoder] if encoder else ["--arch", b.arch, "--img-size",
                                                                        str(b.img_size)]),
                         "--output", str(root / "cost")], deps, encoder_input)
    if data.imagenet:  # the last block's attention and the PCA of the patch tokens on a few val images
        add("pictures", "pictures", [encoder or f"random:{b.arch}@{b.img_size}", f"{data.imagenet}/val", "--kind",
                                     "attention,pca", "--pca", "each", "--out", str(root / "pictures" / "{kind}.png")],
            deps, encoder_input)  # a PCA per image: the images are of different classes
    # ImageNet-1k's class index whatever the folders hold (the same as the folder index on the full set):
    # the classifier keeps its 1000-way head, which the robustness sets need
    imagenet = [f"data.train_path={data.imagenet}/train", f"data.val_path={data.imagenet}/val",
                "data.label_space=imagenet1k"] if data.imagenet else []
    for protocol in ("knn", "linprobe", "finetune"):
        if protocol not in s.protocols:
            continue
        config = recipe(preset, protocol, b, preset_path)
        args = [*(["--config-file", config] if config else []), *model, *init, *imagenet,
                "--output-dir", str(root / protocol)]
        fit = []  # after the overrides: the micro-batch that fits their batch on this job's processes
        if protocol != "knn":
            world = launch.world_size(launch.job_slurm(preset.get(protocol, {}).get("slurm", {})))
            fit = micro_batch(protocol, config, overrides(protocol, protocol), world)
        add(protocol, protocol, args, deps, encoder_input, fit)
    if "detection" in s.protocols:
        section = f"detection_{s.detection}"
        config = recipe(preset, section, b, preset_path)
        if config is None:
            raise ConfigError(f"{preset_path}: {section} needs a config (a LazyConfig file by ViT size)")
        coco = data.coco_files()
        add("detection", section, [
            "--config-file", config, "--resume",
            "--dataset", "benchmark_coco_train", *coco["train"], "--dataset", "benchmark_coco_val", *coco["val"],
            f"train.output_dir={root / 'detection'}", "dataloader.train.dataset.names=benchmark_coco_train",
            "dataloader.test.dataset.names=benchmark_coco_val",
            f"train.init_checkpoint={encoder}" if encoder else "train.allow_scratch=True"], deps, encoder_input)
    if "robustness" in s.protocols:
        classifier = str(root / "finetune" / "classifier_best.pth")
        sets = [a for key, path in data.robustness.items() for a in (f"--{key.replace('_', '-')}", path)]
        add("robustness", "robustness", ["--checkpoint", classifier, "--imagenet-val", f"{data.imagenet}/val",
                                         *sets, "--output", str(root / "robustness")],
            [f"{b.name}/finetune"], {classifier: f"{b.name}/finetune"})
    return jobs


def micro_batch(protocol: str, config: str | None, overrides: list[str], world: int) -> list[str]:
    """``train.micro_batch`` that keeps the recipe's effective batch on ``world`` processes: the recipe's
    micro-batch, or the largest smaller one with which the batch splits evenly (accumulation makes up
    the rest; even under mixup / cutmix), so that the same preset runs on 8 GPUs or 32."""
    from rcmae.core.config import load_config
    from rcmae.finetune.defaults import DEFAULTS, LINPROBE_DEFAULTS

    defaults = LINPROBE_DEFAULTS if protocol == "linprobe" else DEFAULTS
    cfg = load_config(defaults, config_path(config) if config else None, overrides)
    batch, micro = cfg["optim"]["batch_size"], cfg["train"]["micro_batch"]
    pairs = cfg["aug"]["mixup"] > 0 or cfg["aug"]["cutmix"] > 0  # timm's Mixup mixes pairs: an even micro-batch
    fits = [m for m in range(min(micro, batch // world), 0, -1)
            if batch % (m * world) == 0 and not (pairs and m % 2)]
    if fits and fits[0] == micro:
        return []
    if not fits:
        raise ConfigError(f"{protocol}: optim.batch_size={batch} does not split over {world} processes; "
                          f"choose a world size that divides it, or --override {protocol}:optim.batch_size=...")
    return [f"train.micro_batch={fits[0]}"]

