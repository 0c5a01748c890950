"""Model cards (`README.md`) for every training run: the Hub's YAML front matter, the architecture, the recipe, the
training figures, the evaluation results and how to load the checkpoint.

- `write_model_card(output_dir, ...)` writes the card of a run (the train scripts call it through
  `card_from_trainer`, which also replaces TRL's generic card on every checkpoint; the demo calls it directly).
- `add_eval_results(model_dir, results)` adds / replaces the evaluation table and the `model-index` entries of an
  existing card (`deepseek-v3 eval run --update-card`).
- `read_front_matter(path)` parses a card's YAML front matter.

The architecture summary comes from the checkpoint's `config.json` (`deepseek_v3.info.parameter_report`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import yaml

CARD_NAME = "README.md"
EVAL_START, EVAL_END = "<!-- eval-results:start -->", "<!-- eval-results:end -->"
BASE_TAGS = ("deepseek_v3", "deepseek-v3-hf", "mixture-of-experts", "multi-token-prediction", "text-generation")
TASK_DATASETS = {  # eval task -> (pretty name, hub dataset id) for the model-index
    "gsm8k": ("GSM8K", "openai/gsm8k"),
    "math500": ("MATH-500", "HuggingFaceH4/MATH-500"),
    "mmlu": ("MMLU", "cais/mmlu"),
    "humaneval": ("HumanEval", "openai/openai_humaneval"),
    "mbpp": ("MBPP", "google-research-datasets/mbpp"),
    "aime24": ("AIME 2024", "HuggingFaceH4/aime_2024"),
    "arithmetic": ("synthetic arithmetic (held-out)", "synthetic-arithmetic"),
}


def read_front_matter(path: str | os.PathLike) -> tuple[dict, str]:
    """(front matter dict, markdown body) of a card; raises ValueError when the card has no front matter."""
    text = Path(path).read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    if not match:
        raise ValueError(f"{path} has no YAML front matter (a first line '---', the YAML, then '---')")
    return yaml.safe_load(match.group(1)) or {}, match.group(2)


def _render(front: dict, body: str) -> str:
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip() + "\n---\n" + body


def _num(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def architecture_section(model_dir: str | os.PathLike, config=None) -> tuple[str, dict]:
    """Markdown table of the parameter counts, experts and MLA ranks of `config` (default: the checkpoint's
    `config.json` in `model_dir`)."""
    from deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from deepseek_v3.info import parameter_report

    config = config if config is not None else DeepseekV3Config.from_pretrained(model_dir)
    report = parameter_report(config)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    rows = [
        ("total parameters (with MTP)", f"{report['total_params_with_mtp']:,}"),
        ("main model", f"{report['main_params']:,}"),
        ("activated per token", f"{report['activated_params_per_token']:,}"),
        ("MTP modules (unique; embedding and head shared)",
         f"{report['mtp_params_unique']:,} ({config.num_nextn_predict_layers} module(s))"),
        ("layers", f"{config.num_hidden_layers} ({config.first_k_dense_replace} dense, {moe_layers} MoE)"),
        ("experts", f"{config.n_routed_experts} routed (top-{config.num_experts_per_tok}, {config.n_group} groups, "
                    f"top-{config.topk_group} groups) + {config.n_shared_experts} shared, sigmoid scores, "
                    "aux-loss-free bias"),
        ("MLA", f"{config.num_attention_heads} heads, q_lora_rank {config.q_lora_rank}, kv_lora_rank "
                f"{config.kv_lora_rank}, qk_nope/rope {config.qk_nope_head_dim}/{config.qk_rope_head_dim}, v "
                f"{config.v_head_dim}"),
        ("hidden size / vocabulary", f"{config.hidden_size} / {config.vocab_size}"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return table, report


def _eval_block(results: dict) -> str:
    lines = [EVAL_START, "## Evaluation", "", "| task | metric | value | problems | samples |", "|---|---|---|---|---|"]
    for task, metrics in results.items():
        for key in ("accuracy", "accuracy_strict", "pass@1", "score"):
            if key in metrics and isinstance(metrics[key], (int, float)):
                lines.append(f"| {task} | {key} | {_num(float(metrics[key]))} | {metrics.get('num_docs', '')} | "
                             f"{metrics.get('num_samples', '')} |")
    lines += ["", "Scored with `deepseek_v3.eval` (`deepseek-v3 eval run`); see its `results.json` for the settings.",
              EVAL_END]
    return "\n".join(lines)


def _model_index(name: str, results: dict) -> list[dict]:
    entries = []
    for task, metrics in results.items():
        pretty, dataset_id = TASK_DATASETS.get(task, (task, task))
        values = [{"type": "accuracy", "name": key, "value": round(float(metrics[key]), 6)}
                  for key in ("accuracy", "pass@1_sampled") if isinstance(metrics.get(key), (int, float))]
        if values:
            entries.append({"task": {"type": "text-generation", "name": "Text Generation"},
                            "dataset": {"name": pretty, "type": dataset_id}, "metrics": values})
    return [{"name": name, "results": entries}] if entries else []


def build_model_card(model_dir: str | os.PathLike, *, base_model: str | None, recipe: dict | str | None = None,
                     overrides: list[str] | None = None, training: dict | None = None, balancing_gamma: float | None = None,
                     eval_results: dict | None = None, datasets: list[str] | None = None, pipeline: str = "training",
                     tags: list[str] | None = None, license: str = "apache-2.0", name: str | None = None,
                     config=None) -> str:
    """The card text. `training`: figures to list (final losses, MaxVio, rewards, ...); `eval_results`: {task:
    metrics with `accuracy`} for the evaluation table and the model-index; `config`: the model config (default:
    `model_dir/config.json`)."""
    model_dir = Path(model_dir)
    name = name or model_dir.resolve().name
    architecture, report = architecture_section(model_dir, config)
    front: dict = {"library_name": "transformers"}
    if base_model:
        front["base_model"] = base_model
    front.update({
        "license": license,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys([*BASE_TAGS, *(tags or [])])),
    })
    if datasets:
        front["datasets"] = list(datasets)
    index = _model_index(name, eval_results or {})
    if index:
        front["model-index"] = index

    origin = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})" if base_model else \
        "trained from a random initialisation"
    body = [f"# {name}", "",
            f"A DeepSeek-V3-architecture model ({pipeline}), {origin} with "
            "deepseek-v3-hf (`import deepseek_v3`): MLA attention, DeepSeekMoE with "
            "auxiliary-loss-free balancing and a Multi-Token Prediction (MTP) module.", "",
            "## Architecture", "", architecture, ""]
    body += ["## Training", ""]
    if balancing_gamma is not None:
        state = "on" if balancing_gamma > 0 else "off"
        body.append(f"Aux-loss-free expert balancing: **{state}** (bias update speed gamma = {balancing_gamma}).")
        body.append("")
    if training:
        body += ["| figure | value |", "|---|---|"]
        body += [f"| {k} | {_num(v)} |" for k, v in training.items() if v is not None]
        body.append("")
    if recipe is not None:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
        body += ["Recipe:", "", "```yaml", text.strip(), "```", ""]
    if overrides:
        body += ["Command-line overrides:", "", "```", " ".join(overrides), "```", ""]
    if eval_results:
        body += [_eval_block(eval_results), ""]
    repo = name if "/" in name else f"ORG/{name}"
    body += ["## How to load it", "",
             "With `deepseek_v3` installed (`pip install deepseek-v3-hf`), `import deepseek_v3` registers the "
             "classes that keep the MTP module and decode fast (absorbed MLA on the latent cache, MTP "
             "self-speculative decoding):", "",
             "```python", "import deepseek_v3  # registers DeepseekV3ForCausalLM (with MTP) for model_type deepseek_v3",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo}")', f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
             'inputs = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
             '                                       return_tensors="pt", return_dict=True)',
             "out = model.generate(**inputs, max_new_tokens=64, use_mtp=True)  # MTP self-speculative decoding",
             "print(model.speculative_stats.acceptance_rate)", "```", "",
             "Plain `transformers` (without `import deepseek_v3`) loads it too, with its built-in DeepseekV3 "
             "class, which has no MTP module (the MTP weights are skipped) and no speculative decoding.", ""]
    return _render(front, "\n".join(body))


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> str:
    """Write `build_model_card(model_dir, **kwargs)` to `model_dir/README.md`; returns the path."""
    path = Path(model_dir) / CARD_NAME
    path.write_text(build_model_card(model_dir, **kwargs), encoding="utf-8")
    return str(path)


def add_eval_results(model_dir: str | os.PathLike, results: dict) -> str:
    """Add (or replace) the evaluation table and `model-index` results of the card in `model_dir` from
    `results.json`'s `results` ({task: metrics}); tasks already in the card's index are replaced."""
    path = Path(model_dir) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train with the package's scripts (they write the card) "
                                "or write one with deepseek_v3.trainers.model_card.write_model_card")
    front, body = read_front_matter(path)
    index = front.get("model-index") or [{"name": Path(model_dir).resolve().name, "results": []}]
    new = _model_index(index[0]["name"], results)
    if new:
        names = {entry["dataset"]["name"] for entry in new[0]["results"]}
        kept = [e for e in index[0].get("results", []) if e.get("dataset", {}).get("name") not in names]
        index[0]["results"] = kept + new[0]["results"]
        front["model-index"] = index
    block = _eval_block(results)
    if EVAL_START in body and EVAL_END in body:
        body = body[: body.index(EVAL_START)] + block + body[body.index(EVAL_END) + len(EVAL_END):]
    else:
        marker = "## How to load it"
        body = body.replace(marker, block + "\n\n" + marker, 1) if marker in body else body + "\n" + block + "\n"
    path.write_text(_render(front, body), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# the train scripts
# ----------------------------------------------------------------------------------------------------------------


def training_figures(log_history: list[dict]) -> dict:
    """The last logged value of the losses, rewards and MoE metrics of a Trainer's `state.log_history`."""
    keys = ("loss", "main_loss", "mtp_loss", "aux_loss", "mean_token_accuracy", "reward",
            "rewards/math_accuracy_reward/mean", "rewards/gsm8k_accuracy_reward/mean", "rewards/format_reward/mean",
            "moe/maxvio_step", "moe/maxvio_batch", "moe/load_entropy", "moe/dead_expert_fraction", "train_loss")
    figures = {}
    for key in keys:
        values = [e[key] for e in log_history if isinstance(e.get(key), (int, float))]
        if values:
            figures[f"final {key}"] = float(values[-1])
    steps = [e["step"] for e in log_history if "step" in e]
    if steps:
        figures["optimizer steps"] = max(steps)
    return figures


def split_recipe_argv(argv: list[str] | None) -> tuple[str | None, list[str]]:
    """(the `--config` recipe's YAML text, the other command-line flags) of a train script's arguments."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 < len(argv):
            recipe = Path(argv[i + 1]).read_text(encoding="utf-8")
            del argv[i : i + 2]
    return recipe, argv


def base_model_id(model_name_or_path: str) -> str | None:
    """The Hub id a run started from: a hub id as given; for a local checkpoint, its own card's `base_model`;
    None for a shipped config name (random initialisation)."""
    import deepseek_v3

    if model_name_or_path in deepseek_v3.available_configs():
        return None
    card = Path(model_name_or_path) / CARD_NAME
    if Path(model_name_or_path).is_dir():
        try:
            return read_front_matter(card)[0].get("base_model") if card.is_file() else None
        except ValueError:
            return None
    return model_name_or_path


def card_from_trainer(trainer, script_args, argv: list[str] | None, pipeline: str) -> str:
    """Write the card of a finished (or checkpointing) train-script run into `trainer.args.output_dir`."""
    recipe, overrides = split_recipe_argv(argv)
    dataset = getattr(script_args, "dataset_name", None)
    return write_model_card(
        trainer.args.output_dir,
        base_model=base_model_id(script_args.model_name_or_path),
        recipe=recipe, overrides=overrides, pipeline=pipeline,
        training=training_figures(trainer.state.log_history),
        balancing_gamma=getattr(script_args, "balancing_gamma", None),
        datasets=[dataset] if dataset and not os.path.exists(dataset) else None,
        tags=["trl", pipeline.split()[0].lower()],
        config=trainer.accelerator.unwrap_model(trainer.model).config,
    )


__all__ = ["add_eval_results", "build_model_card", "card_from_trainer", "read_front_matter", "training_figures",
           "write_model_card"]
