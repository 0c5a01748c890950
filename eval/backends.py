"""Model backends: Hugging Face transformers (default) and vLLM (optional import).

A backend exposes::

    generate(prompts, *, max_new_tokens, temperature, top_p, stop) -> list[str]
    loglikelihood(requests: list[(context, continuation)]) -> list[float]
    uses_chat: bool                      # whether chat messages are rendered with the tokenizer's chat template
    describe() -> dict                   # recorded in results.json

Prompts are plain strings (completion style) or chat messages (``[{"role": "user", "content": ...}]``). Messages are
rendered with the tokenizer's chat template; a tokenizer without one gets the message contents joined by blank lines.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

Prompt = "str | list[dict]"


def render_messages_plain(messages: Sequence[dict]) -> str:
    return "\n\n".join(m["content"] for m in messages) + "\n"


def _truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class HFBackend:
    """Any ``AutoModelForCausalLM`` checkpoint (path or hub id); ``import deepseek_v3`` registers our classes first.

    Generation is batched with left padding; log-likelihoods are computed in batches with right padding.
    """

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, batch_size: int = 8,
                 trust_remote_code: bool = False, max_length: int | None = None, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import deepseek_v3  # noqa: F401  (registers DeepseekV3Config / DeepseekV3ForCausalLM with the Auto classes)

        self.torch = torch
        self.model_name = model
        self.batch_size = batch_size
        self.seed = seed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.model_name, "model_class": type(self.model).__name__,
                "dtype": str(self.model.dtype), "device": self.device, "batch_size": self.batch_size,
                "chat_template": self.has_chat_template}

    # ------------------------------------------------------------------ prompts
    def render(self, prompt: "str | list[dict]") -> tuple[str, bool]:
        """(text, add_special_tokens): chat-templated text already holds its BOS token."""
        if isinstance(prompt, str):
            return prompt, True
        if self.has_chat_template:
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return text, False
        return render_messages_plain(prompt), True

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence["str | list[dict]"], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = ()) -> list[str]:
        torch = self.torch
        encoded = [self._encode(*self.render(p)) for p in prompts]
        budget = max(1, self.max_length - max_new_tokens)
        encoded = [ids[-budget:] for ids in encoded]  # keep the end of over-long prompts
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):  # left padding
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                                  "eos_token_id": self.tokenizer.eos_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs["stopping_criteria"] = [_StopOnStrings(self.tokenizer, list(stop), width)]
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                      **kwargs)
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [_truncate_at_stop(t, stop) for t in texts]

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log-probabilities of each continuation given its context (lm-eval ``_encode_pair`` split)."""
        torch = self.torch
        pairs = []
        for context, continuation in requests:
            n_space = len(context) - len(context.rstrip())
            if n_space:  # move trailing whitespace of the context into the continuation, as lm-eval does
                context, continuation = context[:-n_space], context[-n_space:] + continuation
            whole = self._encode(context + continuation, True)
            ctx = self._encode(context, True)
            cont = whole[len(ctx):] or whole[-1:]
            seq = (ctx + cont)[-(self.max_length + 1):]
            pairs.append((seq, len(cont)))
        # Requests whose model input is identical (e.g. the four single-token MMLU answers after one context) share
        # one forward pass.
        unique: dict[tuple[int, ...], list[int]] = {}
        for i, (seq, _) in enumerate(pairs):
            unique.setdefault(tuple(seq[:-1]), []).append(i)
        keys = sorted(unique, key=len, reverse=True)
        results: list[float] = [0.0] * len(pairs)
        for start in range(0, len(keys), self.batch_size):
            batch = keys[start:start + self.batch_size]
            width = max(len(x) for x in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(batch):  # right padding: positions of real tokens stay 0..len-1
                ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, :len(x)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, key in enumerate(batch):
                for i in unique[key]:
                    seq, n_cont = pairs[i]
                    targets = torch.tensor(seq[-n_cont:], dtype=torch.long)
                    positions = torch.arange(len(seq) - 1 - n_cont, len(seq) - 1)
                    results[i] = float(logprobs[row, positions, targets].sum())
        return results


class _StopOnStrings:
    """Per-sequence stopping criterion: a row is done once its generated text contains a stop string."""

    def __init__(self, tokenizer, stop: list[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_width = prompt_width
        self.max_stop_tokens = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop) + 8

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids[:, self.prompt_width:]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


class VLLMBackend:
    """vLLM backend (``pip install vllm``): fast batched generation on GPUs; log-likelihood via prompt logprobs."""

    def __init__(self, model: str, *, dtype: str = "auto", seed: int = 0, trust_remote_code: bool = False,
                 max_length: int | None = None, **_: Any):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("--backend vllm needs vLLM: pip install vllm (or use --backend hf)") from err
        self.model_name = model
        self.llm = LLM(model=model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
                       max_model_len=max_length)
        self.tokenizer = self.llm.get_tokenizer()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> dict:
        return {"backend": "vllm", "model": self.model_name, "chat_template": self.has_chat_template}

    def _render(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return render_messages_plain(prompt)

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = ()) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p if temperature > 0 else 1.0, stop=list(stop) or None)
        outs = self.llm.generate([self._render(p) for p in prompts], params, use_tqdm=False)
        return [_truncate_at_stop(o.outputs[0].text, stop) for o in outs]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        results = []
        for context, continuation in requests:
            ctx = self.tokenizer(context)["input_ids"]
            whole = self.tokenizer(context + continuation)["input_ids"]
            out = self.llm.generate([{"prompt_token_ids": whole}], params, use_tqdm=False)[0]
            total = 0.0
            for pos in range(len(ctx), len(whole)):
                entry = out.prompt_logprobs[pos]
                total += entry[whole[pos]].logprob if entry and whole[pos] in entry else -math.inf
            results.append(total)
        return results


def load_backend(name: str, model: str, **kwargs) -> "HFBackend | VLLMBackend":
    if name == "hf":
        return HFBackend(model, **kwargs)
    if name == "vllm":
        return VLLMBackend(model, **kwargs)
    raise ValueError(f"unknown backend {name!r}; use 'hf' or 'vllm'")
