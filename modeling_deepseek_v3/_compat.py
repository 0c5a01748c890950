"""The transformers API differences between the releases pyproject allows (5.23 .. the newest).

transformers 5.24 renamed the cache argument `past_key_values` to `cache`: `generate()` calls
`forward(..., cache=...)`, `create_causal_mask` takes `cache=` and the output classes carry a `cache` field, while
5.23 passes, takes and carries `past_key_values`. Every forward of this package accepts both names (a model that
read only one of them would silently decode without context on the other releases), and the calls this package
makes into transformers use whichever name the installed release declares, so neither release warns.
"""

import inspect

from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast

#: The cache field of transformers' output classes on the installed release ("cache" from 5.24 on).
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(_create_causal_mask).parameters else "past_key_values"


def resolve_cache(cache, kwargs: dict):
    """The cache a forward was given under either name; pops `past_key_values` out of `kwargs`.

    Raises when both names carry different objects (nothing says which one the caller meant)."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is None:
        return cache
    if cache is not None and cache is not legacy:
        raise ValueError("Pass the cache once: `cache=` (transformers >= 5.24) or `past_key_values=`, not both")
    return legacy


def create_causal_mask(*, cache=None, **kwargs):
    """transformers' `create_causal_mask`, given the cache under the name the installed release declares."""
    return _create_causal_mask(**{_MASK_CACHE_ARG: cache}, **kwargs)


def cache_kwargs(cache) -> dict:
    """`{CACHE_FIELD: cache}`: builds output objects (and calls into transformers) with the installed release's name."""
    return {CACHE_FIELD: cache}


def output_cache(output):
    """The cache an output object carries, read through the installed release's field name (no deprecation)."""
    return getattr(output, CACHE_FIELD)
