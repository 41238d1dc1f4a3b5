"""Configurations for every dataset, size and method, built from one place.

``configs/cifar10.py``, ``configs/cifar100.py`` and ``configs/gtsrb.py`` each call
:func:`get_config` with their dataset. The config argument (the part after ``:`` in
``--config=configs/cifar10.py:cpu,sgd``) is a comma-separated list of variant names, at most
one size and one method:

* sizes: ``full`` (default: VGG-11, batch 128, the published recipe), ``cpu`` (the small
  4-stage CNN, sized for a 2-core CPU) and ``smoke`` (a tiny network on a few hundred
  images; a run takes well under a minute on CPU);
* methods (:data:`METHODS`), each a scheduler and a per-stage objective:

  ==============  ================  =============  ============================================================
  method          scheduler         objective      what it is
  ==============  ================  =============  ============================================================
  ``greedy_dib``  ``sequential``    ``dib``        the greedy DIB method (the default)
  ``greedy_ce``   ``sequential``    ``ce``         greedy layer-wise training with the heads' CE only
  ``dgl``         ``simultaneous``  ``ce``         decoupled greedy learning (Belilovsky et al. 2020)
  ``predsim``     ``simultaneous``  ``predsim``    local prediction + similarity losses (Nøkland & Eidnes 2019)
  ``hsic``        ``simultaneous``  ``hsic``       the HSIC bottleneck (Ma, Lewis & Kleijn 2020)
  ``infopro``     ``simultaneous``  ``infopro``    InfoPro: reconstruction + contrastive losses (Wang et al. 2021)
  ``random``      ``simultaneous``  ``head_only``  the stages left as initialised, only the heads trained
  ``sgd``         ``end_to_end``    ``ce``         end-to-end backpropagation, the baseline
  ==============  ================  =============  ============================================================

  The layer-wise methods cut the network per layer and give every stage a convolutional auxiliary head (``sgd``
  keeps the network's own classifier, a linear head), except those whose authors publish their own: ``predsim``
  (pool-and-linear prediction heads and a convolution before the similarity matrix, dropout 0.2 between stages),
  ``hsic`` (its SGD recipe and a format phase) and ``infopro`` (linear probes and InfoPro's decoder and
  contrastive head). ``train.num_epochs`` counts the epochs of every stage for
  the sequential scheduler and of the whole run otherwise.

Any field can then be overridden on the command line, e.g. ``--config.train.num_epochs=3``. :func:`check_config`
refuses unknown names and impossible settings before any data is read or any model is built.
"""

from __future__ import annotations

import ml_collections

from dibjax import analysis, data, models, objectives, optim, schedulers
from dibjax.errors import ConfigError

DATASETS = ("cifar10", "cifar100", "gtsrb")
SIZES = ("full", "cpu", "smoke")
METHODS = ("greedy_dib", "greedy_ce", "dgl", "predsim", "hsic", "infopro", "random", "sgd")
# (scheduler, objective) of every method.
METHOD_RECIPES = {
    "greedy_dib": ("sequential", "dib"),
    "greedy_ce": ("sequential", "ce"),
    "dgl": ("simultaneous", "ce"),
    "predsim": ("simultaneous", "predsim"),
    "hsic": ("simultaneous", "hsic"),
    "infopro": ("simultaneous", "infopro"),
    "random": ("simultaneous", "head_only"),
    "sgd": ("end_to_end", "ce"),
}


def parse_variant(arg: str | None) -> tuple[str, str]:
    """Splits ``"cpu,sgd"`` into (size, method), refusing unknown or repeated names."""
    size, method = None, None
    tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
    for token in tokens:
        if token in SIZES:
            if size is not None:
                raise ConfigError(f"config variant {arg!r} names two sizes ({size!r}, {token!r}); give at most one")
            size = token
        elif token in METHODS:
            if method is not None:
                raise ConfigError(f"config variant {arg!r} names two methods ({method!r}, {token!r}); give at most one")
            method = token
        else:
            raise ConfigError(
                f"unknown config variant {token!r} in {arg!r}; accepted sizes: {SIZES}, methods: {METHODS}"
            )
    return size or "full", method or "greedy_dib"


def get_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The configuration of a run on ``dataset`` for the variant string ``arg``."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; accepted: {', '.join(DATASETS)}")
    size, method = parse_variant(arg)

    config = ml_collections.ConfigDict()
    config.variant = f"{size},{method}"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = dataset
    config.data.source = "gtsrb" if dataset == "gtsrb" else "tfds"
    config.data.dir = ""
    config.data.train_limit = 0
    config.data.test_limit = 0
    config.data.validation_size = 0  # >0: hold out this many training images and evaluate on them, not on test
    config.data.label_noise = 0.0  # fraction of training labels replaced by another class (symmetric noise)
    config.data.image_size = 32
    config.data.crop_padding = 4
    config.data.download = True  # tfds source: fetch and prepare CIFAR on first use

    config.model = ml_collections.ConfigDict()
    config.model.name = "vgg11"
    config.model.split = "block"
    config.model.num_groups = 0
    config.model.head = "linear"
    config.model.width = 0  # 0: the network's published width
    config.model.batchnorm = True
    config.model.head_width = 128  # conv head: 0 gives each head as many channels as its stage
    config.model.head_hidden = 0
    # conv head: pool larger maps to this size before its convolution (0: never). 8 keeps the head of a 32×32 stage
    # from needing more memory than the stage and costs no accuracy (docs/benchmarks.md, "Accuracy of the heads").
    config.model.head_pool = 8
    config.model.head_features = 2048  # prediction head: values per sample after its average pool
    config.model.head_extras = ()  # ("similarity",): predsim's convolution before its similarity matrix
    config.model.dtype = "float32"  # or "bfloat16": mixed precision, float32 parameters

    config.method = method
    config.scheduler, objective = METHOD_RECIPES[method]
    config.objective = ml_collections.ConfigDict()
    config.objective.name = objective
    # Every objective's options, so any can be overridden (e.g. --config.objective.dib.beta=0.01); only the section
    # of config.objective.name is read.
    # β < 0 rewards the information each stage keeps: of the settings tried, entropy at β = −0.01 did best on
    # held-out data over benchmarks.regimes and the cpu protocol's sweep; no β > 0 helped (docs/regimes.md).
    config.objective.dib = ml_collections.ConfigDict(
        {
            "beta": -0.01,
            "beta_growth": 1.0,
            "gamma": 0.0,
            "compression": "entropy",
            "alpha": 1.01,
            "width": "median",
            "pool": 4,
        }
    )
    config.objective.predsim = ml_collections.ConfigDict({"beta": 0.99, "similarity_conv": True})
    config.objective.hsic = ml_collections.ConfigDict({"beta": 500.0, "sigma": 5.0, "epsilon": 1e-5})
    config.objective.hsic_unnormalized = ml_collections.ConfigDict({"lam": 100.0, "width": "median", "pool": 4})
    # InfoPro's weights for ResNet-32 in K = 4 modules (their ixx_1, ixx_2, ixy_1, ixy_2).
    config.objective.infopro = ml_collections.ConfigDict(
        {"task": "contrast", "lambda_1_first": 6.0, "lambda_1_last": 1.0, "lambda_2_first": 0.0, "lambda_2_last": 2.0}
    )

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # or "adam"
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4
    config.optimizer.lr_schedule = "cosine"  # or "multistep"
    config.optimizer.milestones = (0.5, 0.75)  # fractions of training, for "multistep"
    config.optimizer.decay_factor = 0.1
    # Linear warm-up: without it the full-size networks at rate 0.1 sit near chance for their first epochs.
    config.optimizer.warmup_epochs = 2 if size == "full" else 0
    config.optimizer.stage_learning_rates = ()  # one peak rate per stage (layer-wise schedules), overriding it

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.eval_batch_size = 500
    config.train.num_epochs = 200 if dataset != "gtsrb" else 30
    config.train.label_smoothing = 0.0
    config.train.stage_dropout = 0.0  # channel dropout on each stage's output as it enters the next stage
    config.train.stage_epochs = ()  # sequential scheduler: epochs of each stage, overriding num_epochs
    # >0: then train every head for this many epochs on the frozen stages (the HSIC bottleneck's "format" phase)
    config.train.format_epochs = 0
    config.train.log_every_steps = 20
    # Score the evaluation split after every N-th epoch of a phase and after its last (each phase's last epoch
    # gives the run's results, so N changes no result, only the per-epoch curve and the time evaluation takes).
    config.train.eval_every_epochs = 1
    config.train.checkpoint = True
    config.train.overwrite = False  # start over in a workdir that holds another config's run
    config.train.progress = True  # progress bars, drawn only when the console is a terminal

    # Information-theoretic analysis of the run (dibjax.analysis, whose default_options documents every field).
    config.analysis = ml_collections.ConfigDict(analysis.default_options())

    if method != "sgd":
        config.model.split = "layer"
        config.model.head = "conv"
        if size == "full" and config.scheduler == "sequential":
            config.train.num_epochs = 50 if dataset != "gtsrb" else 15
    if method == "hsic":
        # Ma, Lewis & Kleijn (2020), their CIFAR-10 run: plain SGD at a constant 0.01 with weight decay 1e-3 (their
        # momentum never acts: the optimizer is rebuilt every step), then 5 epochs of the format phase.
        config.optimizer.learning_rate = 0.01
        config.optimizer.momentum = 0.0
        config.optimizer.nesterov = False
        config.optimizer.weight_decay = 1e-3
        config.optimizer.warmup_epochs = 0
        config.optimizer.lr_schedule = "multistep"
        config.optimizer.milestones = ()
        config.train.format_epochs = 5
    if method == "infopro":
        # Linear probes report the stages' accuracy; InfoPro's decoder and contrastive head carry its losses.
        config.model.head = "linear"
        config.model.head_extras = ("decoder", "projection")
        if size == "full":
            # Their CIFAR-10 recipe: ResNet-32 in 4 local modules, SGD (Nesterov) 0.8 at batch 1024 with a 10-epoch
            # warm-up and cosine decay over 160 epochs, weight decay 1e-4.
            config.model.name = "resnet32"
            config.model.split = "groups"
            config.model.num_groups = 4
            config.train.batch_size = 1024
            config.train.num_epochs = 160
            config.optimizer.learning_rate = 0.8
            config.optimizer.weight_decay = 1e-4
            config.optimizer.warmup_epochs = 10
    if method == "predsim":
        # Nøkland & Eidnes (2019): pool-and-linear prediction heads, the convolution before the similarity matrix,
        # dropout 0.2 on every block's output (their VGG8b CIFAR-10 run).
        config.model.head = "prediction"
        config.model.head_extras = ("similarity",)
        config.train.stage_dropout = 0.2
        if size == "full":
            # Their optimizer: Adam at 5e-4 for 400 epochs, the rate × 0.25 at epochs 200, 300, 350 and 375.
            config.optimizer.name = "adam"
            config.optimizer.learning_rate = 5e-4
            config.optimizer.weight_decay = 0.0
            config.optimizer.warmup_epochs = 0
            config.optimizer.lr_schedule = "multistep"
            config.optimizer.milestones = (0.5, 0.75, 0.875, 0.9375)
            config.optimizer.decay_factor = 0.25
            config.train.num_epochs = 400 if dataset != "gtsrb" else 30

    if size == "cpu":
        config.model.name = "small_cnn"
        config.model.split = "layer"
        config.model.width = 32
        # Sized so that an end-to-end run on CIFAR-10's 24,000-image subset fits in 15 minutes on 2 CPU cores.
        config.train.num_epochs = 17 if dataset != "gtsrb" else 10
        config.train.label_smoothing = 0.1
        if dataset != "gtsrb":
            # A run this short underfits: 2-pixel crops fit faster than the usual 4 (docs/results.md).
            config.data.crop_padding = 2
    elif size == "smoke":
        config.model.name = "small_cnn"
        config.model.split = "layer"
        config.model.width = 4
        config.model.head_width = 8
        config.data.train_limit = 256
        config.data.test_limit = 128
        config.train.batch_size = 32
        config.train.eval_batch_size = 64
        config.train.num_epochs = 2
        config.train.log_every_steps = 2
        config.analysis.probe_size = 64
    return config


def model_fields(config: ml_collections.ConfigDict) -> dict:
    """``config.model`` as :func:`dibjax.models.build_model` takes it (0 meaning "the default" becomes None)."""
    fields = config.model.to_dict()
    fields["width"] = fields.get("width") or None
    fields["num_groups"] = fields.get("num_groups") or None
    fields["head_extras"] = tuple(fields.get("head_extras") or ())
    fields["image_size"] = config.data.image_size
    return fields


def stage_epochs(config: ml_collections.ConfigDict, num_stages: int) -> int | tuple[int, ...]:
    """Epochs per phase: ``train.stage_epochs`` for a sequential run when given, else ``train.num_epochs``."""
    given = tuple(config.train.get("stage_epochs", ()) or ())
    if not given:
        return config.train.num_epochs
    if config.scheduler != "sequential":
        raise ConfigError(
            f"train.stage_epochs={given} is only read by the sequential scheduler, not {config.scheduler!r}"
        )
    if len(given) != num_stages:
        raise ConfigError(f"train.stage_epochs={given} has {len(given)} entries; the model has {num_stages} stages")
    return given


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuses unknown names and impossible settings before any data is read or any model is built.

    Raises:
        ConfigError: naming the field, its value and what is accepted.
    """
    for field, accepted in (
        ("name", models.MODELS),
        ("split", models.SPLITS),
        ("head", models.HEADS),
        ("dtype", models.COMPUTE_DTYPES),
    ):
        value = config.model.get(field, "float32" if field == "dtype" else None)
        if value not in accepted:
            raise ConfigError(f"unknown model.{field} {value!r}; accepted: {', '.join(accepted)}")
    if config.data.name not in data.DATASETS:
        raise ConfigError(f"unknown data.name {config.data.name!r}; accepted: {', '.join(data.DATASETS)}")
    if config.data.source not in data.SOURCES:
        raise ConfigError(f"unknown data.source {config.data.source!r}; accepted: {', '.join(data.SOURCES)}")
    if config.scheduler not in schedulers.SCHEDULERS:
        raise ConfigError(f"unknown scheduler {config.scheduler!r}; accepted: {', '.join(schedulers.SCHEDULERS)}")
    if config.optimizer.get("name", "sgd") not in optim.OPTIMIZERS:
        raise ConfigError(f"unknown optimizer.name {config.optimizer.name!r}; accepted: {', '.join(optim.OPTIMIZERS)}")
    if config.optimizer.lr_schedule not in optim.LR_SCHEDULES:
        raise ConfigError(
            f"unknown optimizer.lr_schedule {config.optimizer.lr_schedule!r}; accepted: {', '.join(optim.LR_SCHEDULES)}"
        )
    stage_dropout = config.train.get("stage_dropout", 0.0)
    if isinstance(stage_dropout, bool) or not isinstance(stage_dropout, int | float) or not 0 <= stage_dropout < 1:
        raise ConfigError(f"train.stage_dropout must be a number in [0, 1), got {stage_dropout!r}")
    for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "eval_every_epochs"):
        value = config.train.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{field} must be a positive integer, got {value!r}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {config.seed!r}")
    objective = objectives.from_config(config.objective, config.train.label_smoothing)
    missing = [e for e in getattr(objective, "head_extras", ()) if e not in tuple(config.model.get("head_extras", ()))]
    if missing:
        raise ConfigError(
            f"objective {config.objective.name!r} needs model.head_extras to include {tuple(missing)}, got "
            f"{tuple(config.model.get('head_extras', ()))!r}"
        )
    num_stages = len(models.stage_sizes(model_fields(config)))
    schedulers.make_phases(
        config.scheduler, num_stages, stage_epochs(config, num_stages), config.train.get("format_epochs", 0)
    )
    optim.peak_learning_rates(config, schedulers.num_groups(config.scheduler, num_stages))
    if "analysis" in config:
        analysis.check_options({**analysis.default_options(), **config.analysis.to_dict()})
        if config.analysis.enabled and not config.train.checkpoint:
            raise ConfigError("analysis.enabled=True analyses the run's checkpoints: it needs train.checkpoint=True")
    minimum = objectives.minimum_batch_size(objective)
    if config.train.batch_size < minimum:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is too small for the {config.objective.name!r} objective's "
            f"estimators, which need at least {minimum} samples per batch"
        )


def check_batch_sizes(config: ml_collections.ConfigDict, train_size: int, device_count: int) -> None:
    """Refuses a training batch the loaded training set or the devices cannot take, before any compilation."""
    batch = config.train.batch_size
    if batch > train_size:
        raise ConfigError(f"train.batch_size={batch} must be between 1 and the {train_size} training images")
    if batch % device_count:
        raise ConfigError(
            f"train.batch_size={batch} must be a multiple of the {device_count} devices it is split over "
            f"(for example {max(device_count, batch // device_count * device_count)} or "
            f"{-(-batch // device_count) * device_count})"
        )


def eval_batch_size(config: ml_collections.ConfigDict, device_count: int) -> int:
    """``train.eval_batch_size`` rounded up to a multiple of ``device_count``.

    Evaluation pads its last batch and masks the padding, so a larger batch changes no metric; it only lets the
    batch split evenly over the devices.
    """
    return -(-config.train.eval_batch_size // device_count) * device_count
