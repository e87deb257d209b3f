"""Strategy registry. Each strategy is one module here that calls `register`; importing the package
imports them all, so adding a strategy is adding a file."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, get_args

from clue_adv.regularizers.base import Strategy, StrategyConfig

_REGISTRY: dict[str, type[Strategy]] = {}
_NOT_STRATEGIES = {"base", "perturb"}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy selectable by its config's `name` literal."""
    (name,) = get_args(cls.config_class.model_fields["name"].annotation)
    if name in _REGISTRY:
        raise RuntimeError(f"strategy {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_STRATEGIES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def registry() -> dict[str, type[Strategy]]:
    """name -> strategy class, in a stable order (baseline first)."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[0] != "none", kv[0])))


def config_classes() -> tuple[type[StrategyConfig], ...]:
    return tuple(cls.config_class for cls in registry().values())


def describe_strategies(configs: dict[str, StrategyConfig] | None = None) -> list[dict[str, Any]]:
    """Name, summary, cost, behaviour under gradient accumulation and parameters (default, description) of every
    strategy. A config in `configs` (by name) is costed instead of the defaults, and its values are listed as
    `value`: a strategy's cost depends on its settings (gradient_penalty's mode, PGD's steps, VAT's iterations)."""
    rows = []
    for name, cls in registry().items():
        config = (configs or {}).get(name) or cls.config_class()
        cost = cls(config).cost()
        params = {
            key: {"default": field.default, "value": getattr(config, key), "description": field.description}
            for key, field in cls.config_class.model_fields.items()
            if key != "name"
        }
        rows.append(
            {
                "name": name,
                "summary": cls.summary,
                "forward": cost.forward,
                "backward": cost.backward,
                "double_backward": cost.double_backward,
                "batch_factor": cost.batch_factor,
                "note": cost.note,
                "accumulation": cls.accumulation,
                "parameters": params,
            }
        )
    return rows


def build_strategy(config: StrategyConfig) -> Strategy:
    return _REGISTRY[config.name](config)


_discover()
