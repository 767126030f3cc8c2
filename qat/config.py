"""Where a run's configuration lives, how it is composed, and how a run's model is built from it.

Every entry point goes through this module: ``qat-train`` (``qat.train``), ``qat-eval``,
``qat-export``, the launch pre-flight (``python -m qat.distributed``), the benchmarks and the tests.

**Layout.** The config groups (``configs/``: model, data, quant, optim, trainer, ...) and the named
recipes (``recipes/experiment/``, ``recipes/hparams_search/``) sit at the top level of a checkout;
a wheel carries the same files inside the package (``qat/configs``, ``qat/recipes``: pyproject's
``package-dir``), so ``pip install qat`` works from any directory. ``config_dir()`` finds whichever
copy is there. The recipes join the config groups ``recipe`` and ``hparams_search`` through Hydra's
ConfigStore (``register_recipes``: each YAML file loaded as it is, under ``# @package _global_``),
so no symlink ties the two folders. A folder of your own joins the search path as Hydra's usual
``--config-dir DIR`` (or ``hydra.searchpath=[file://DIR]``): its ``recipe/NAME.yaml`` and
``quant/NAME.yaml`` are found beside ours.

    >>> from qat.config import compose
    >>> cfg = compose(["recipe=smollm2_w4_lsq"])
    >>> cfg.recipe_name, cfg.quant.weight.bits, cfg.trainer.max_steps
    ('smollm2_w4_lsq', 4, 60)

**A run's model** is built in three steps that ``qat-train`` takes one by one (it measures the FP and
round-to-nearest references between the first two) and ``build_model`` takes at once for a run
that has finished: ``load`` (the pretrained model and its tokenizer), ``quantize`` (``qat.quantize_``
with the run's quantizer factories, then its adapters), and the checkpoint's weights.
"""

from __future__ import annotations

from pathlib import Path

from qat.errors import UserError

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent
RECIPE_GROUPS = {"recipe": "experiment", "hparams_search": "hparams_search"}  # config group -> folder under recipes/


def _roots() -> tuple[Path, Path]:
    for base in (_PACKAGE, _CHECKOUT):  # an installed wheel holds them in the package; a checkout at its top level
        if (base / "configs" / "train.yaml").is_file() and (base / "recipes").is_dir():
            return base / "configs", base / "recipes"
    raise UserError(f"qat's configs are missing from {_PACKAGE} and {_CHECKOUT}: reinstall the package (pip install qat)")


def config_dir() -> Path:
    """The directory of the config groups and ``train.yaml`` (package data, or ``configs/`` of a checkout)."""
    return _roots()[0]


def recipes_dir() -> Path:
    """The directory of the named recipes (``experiment/``) and sweeps (``hparams_search/``)."""
    return _roots()[1]


def recipe_names(group: str = "recipe") -> list[str]:
    """The names ``recipe=NAME`` (or ``hparams_search=NAME``) accepts, sorted."""
    return sorted(p.stem for p in (recipes_dir() / RECIPE_GROUPS[group]).glob("*.yaml"))


def register_recipes() -> None:
    """Put every recipe and sweep YAML into Hydra's ConfigStore, under groups ``recipe`` and ``hparams_search``.

    Idempotent; each file keeps its own defaults list (``override /quant: ...``) and is placed at
    the global package, as its ``# @package _global_`` header says.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    for group, folder in RECIPE_GROUPS.items():
        for path in sorted((recipes_dir() / folder).glob("*.yaml")):
            header = path.read_text().splitlines()[:1]
            if header != ["# @package _global_"]:
                raise UserError(f"{path}: a recipe starts with the line `# @package _global_` (it sets keys across groups)")
            store.store(group=group, name=path.stem, node=OmegaConf.load(path), package="_global_", provider="qat")


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train", return_hydra_config: bool = False):
    """``qat-train``'s configuration with ``overrides`` (Hydra syntax), outside a Hydra app.

    Raises:
        hydra.errors.HydraException: an unknown key, group option or recipe (Hydra's own message).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_recipes()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


def load_run_config(run_dir: Path):
    """The resolved config ``qat-train`` saved in ``run_dir/config.yaml`` (what a finished run is rebuilt from).

    Raises:
        UserError: no ``config.yaml`` there.
    """
    from omegaconf import OmegaConf

    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{cfg_file} is missing: the model is rebuilt from the config qat-train saved there")
    return OmegaConf.load(cfg_file)


def locate_run(path: Path) -> tuple[Path, Path]:
    """``(run directory, checkpoint)`` from either of them.

    Raises:
        UserError: a directory without ``checkpoints/last.ckpt``.
    """
    path = Path(path)
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    ckpt = path / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"{path} has no checkpoints/last.ckpt: pass a run directory of qat-train or a .ckpt file")
    return path, ckpt


def make(node, key: str, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``, where a ``UserError`` raised by the target is named by its config key.

    Hydra wraps whatever the target raises in an ``InstantiationException``; a mistake in the
    input comes back out as ``UserError("KEY: message")``, anything else (a bug) as it was.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise UserError(f"{key}: {e.__cause__}") from None
        raise


def quantizer_factories(cfg) -> dict:
    """``quantize_``'s keywords from ``cfg.quant``: ``weight`` / ``activation`` / ``embedding`` factories and ``rules``.

    ``quant.rules`` is an ordered list of ``{pattern, weight?, activation?}``; a layer takes the first
    rule whose glob pattern matches its name. A rule's ``weight`` (or ``activation``) is merged onto
    ``quant.weight`` (so ``{bits: 2}`` changes the width alone), replaces it when it names its own
    ``_target_``, and ``null`` leaves that part of the layer float; a key the rule leaves out keeps
    the default.

    Example (YAML)::

        rules:
          - {pattern: "model.layers.0.*", weight: {bits: 4}}     # the first block wider
          - {pattern: "*.mlp.*", weight: {bits: 2}}               # every other MLP narrower
    """
    from omegaconf import OmegaConf

    out = {k: make(cfg.quant[k], f"quant.{k}") for k in ("weight", "activation", "embedding") if cfg.quant.get(k) is not None}
    rules = []
    for i, rule in enumerate(cfg.quant.get("rules") or []):
        key = f"quant.rules[{i}]"
        extra = set(rule) - {"pattern", "weight", "activation"}
        if not isinstance(rule.get("pattern"), str) or extra:
            raise UserError(f"{key}: a rule is {{pattern: GLOB, weight: ..., activation: ...}}, got {OmegaConf.to_container(rule)}")
        parts = {}
        for part in ("weight", "activation"):
            if part not in rule:
                continue
            node, base = rule[part], cfg.quant.get(part)
            if node is not None and "_target_" not in node:
                if base is None:
                    raise UserError(f"{key}.{part}: quant.{part} is null, so the rule must name its own _target_")
                node = OmegaConf.merge(base, node)
            parts[part] = None if node is None else make(node, f"{key}.{part}")
        rules.append((rule.pattern, parts))
    if rules:
        out["rules"] = rules
    return out


def map_factories(factories: dict, fn) -> dict:
    """``factories`` (as ``quantizer_factories`` gives them) with ``fn`` applied to every factory, the rules' too."""
    out = {k: fn(f) for k, f in factories.items() if k != "rules"}
    if "rules" in factories:
        out["rules"] = [(p, {k: None if f is None else fn(f) for k, f in parts.items()}) for p, parts in factories["rules"]]
    return out


def load(cfg):
    """``(model, tokenizer)``: the run's pretrained model, in float (``qat.models.load_model``)."""
    from qat.models import load_model

    return load_model(cfg.model.name, task=cfg.model.task, dtype=cfg.model.dtype)


def quantize(cfg, model, factories: dict | None = None):
    """Quantize ``model`` in place as the run does, then attach the run's adapters; returns the adapter (or None).

    ``factories`` defaults to ``quantizer_factories(cfg)``.

    Raises:
        UserError: the quantizers do not fit the model (a group size that divides no layer, ...).
    """
    import qat  # noqa: F811 (the package, for quantize_)

    factories = quantizer_factories(cfg) if factories is None else factories
    qat.quantize_(model, **factories, include=list(cfg.quant.include), exclude=cfg.quant.exclude)
    if not cfg.get("adapter"):
        return None
    adapter = make(cfg.adapter, "adapter")  # L4Q / LoRA / scale-only (qat.adapters)
    adapter.apply_(model)
    return adapter


def build_model(cfg, ckpt: Path | None = None, float_copy: bool = False):
    """A run's model: loaded, quantized and adapted as in training, with the checkpoint's weights and quantizer state.

    ``ckpt`` None gives the quantized model at the start of training.

    Returns:
        ``(model, tokenizer, fp)``: ``fp`` is a float copy taken before quantization when
        ``float_copy`` (a distillation teacher), else None.
    """
    import copy

    import torch

    model, tokenizer = load(cfg)
    fp = copy.deepcopy(model).eval() if float_copy else None
    quantize(cfg, model)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model, tokenizer, fp
