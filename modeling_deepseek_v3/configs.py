"""Configs shipped with the package (`hub_configs/`), loadable by name.

- `deepseek-v3` (aliases `deepseek-v3-671b`, `deepseek-r1`, `671b`): the published DeepSeek-V3/V3-0324/R1 config.
- `tiny`: < 1M parameters with MTP on, for tests.
- `small`: tens of millions of parameters, for demos and benchmarks.
"""

import json
import os
from importlib import resources

from .configuration_deepseek_v3 import DeepseekV3Config

ALIASES = {"deepseek-v3-671b": "deepseek-v3", "deepseek-r1": "deepseek-v3", "671b": "deepseek-v3", "v3": "deepseek-v3"}


def available_configs() -> list[str]:
    files = resources.files("deepseek_v3.hub_configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_config(name_or_path: str, **overrides) -> DeepseekV3Config:
    """A shipped config by name, a local `config.json` (or a directory holding one), or a hub id."""
    name = ALIASES.get(name_or_path, name_or_path)
    if name in available_configs():
        text = resources.files("deepseek_v3.hub_configs").joinpath(f"{name}.json").read_text()
        return DeepseekV3Config(**{**json.loads(text), **overrides})
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return DeepseekV3Config(**{**json.load(f), **overrides})
    if os.path.isdir(name_or_path) or "/" in name_or_path:
        return DeepseekV3Config.from_pretrained(name_or_path, **overrides)
    raise ValueError(
        f"Unknown config {name_or_path!r}: use one of {available_configs()} (or aliases {sorted(ALIASES)}), "
        "a path to a config.json / checkpoint directory, or a hub id like 'deepseek-ai/DeepSeek-V3'"
    )
