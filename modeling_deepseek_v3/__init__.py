"""DeepSeek-V3 for Hugging Face transformers.

`import deepseek_v3` registers our config and models for model_type `deepseek_v3` with the Auto classes (replacing
transformers' built-in classes), so `AutoModelForCausalLM.from_pretrained(<DeepSeek-V3 checkpoint>)` returns
`DeepseekV3ForCausalLM` from this package, MTP layer included.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .checkpoint import register_conversions
from .configuration_deepseek_v3 import DeepseekV3Config
from .configs import available_configs, load_config
from .modeling_deepseek_v3 import (
    DeepseekV3CausalLMOutputWithPast,
    DeepseekV3ForCausalLM,
    DeepseekV3ForSequenceClassification,
    DeepseekV3ForTokenClassification,
    DeepseekV3Model,
    DeepseekV3ModelOutput,
    DeepseekV3PreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register("deepseek_v3", DeepseekV3Config, exist_ok=True)
AutoModel.register(DeepseekV3Config, DeepseekV3Model, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV3Config, DeepseekV3ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DeepseekV3Config, DeepseekV3ForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(DeepseekV3Config, DeepseekV3ForTokenClassification, exist_ok=True)
register_conversions()

__all__ = [
    "DeepseekV3Config",
    "DeepseekV3Model",
    "DeepseekV3ForCausalLM",
    "DeepseekV3ForSequenceClassification",
    "DeepseekV3ForTokenClassification",
    "DeepseekV3PreTrainedModel",
    "DeepseekV3ModelOutput",
    "DeepseekV3CausalLMOutputWithPast",
    "available_configs",
    "load_config",
]
