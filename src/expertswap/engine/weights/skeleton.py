"""Load a checkpoint's non-expert weights through transformers while leaving every expert on disk.

transformers converts each family's hub layout on load (renames, fused experts). We keep that
machinery for the small, non-expert part by loading with the family's experts class patched to
own no parameters: the expert keys then have no target and are never read.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from expertswap.engine.weights.compat import after_init, mark_initialised
from expertswap.engine.weights.families import Family
from expertswap.engine.weights.store import ParamSpec
from expertswap.protocol.errors import ModelFormatError

_SPECS_ATTR = "_expertswap_param_specs"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class ExpertsSite:
    """Where one experts module sits in the model, with the parameters it no longer owns."""

    layer: int
    name: str
    parent: nn.Module
    module: Any  # the family's experts module (its class varies)
    params: tuple[ParamSpec, ...]


def experts_class(family: Family) -> type[nn.Module]:
    """The transformers class that holds one layer's experts for this family."""
    module = importlib.import_module(f"transformers.models.{family.model_type}.modeling_{family.model_type}")
    return getattr(module, family.experts_class)


def _drop_weights(experts: nn.Module) -> None:
    """Right after construction: remember the parameters' shapes, then drop them."""
    specs = tuple(ParamSpec(name, tuple(p.shape[1:]), p.dtype) for name, p in experts.named_parameters(recurse=False))
    for spec in specs:
        del experts._parameters[spec.name]
    setattr(experts, _SPECS_ATTR, specs)
    mark_initialised(experts)  # nothing left for transformers to initialise


def load_skeleton(
    folder: str, family: Family, device: torch.device, dtype: torch.dtype | str, packed: Any = None
) -> tuple[PreTrainedModel, list[ExpertsSite]]:
    """The model with non-expert weights on ``device`` and empty experts modules, and where those sit.

    ``packed``: a natively quantised checkpoint's ``quantization_config``. transformers then unpacks the
    (small) non-expert weights to the model's dtype as it loads them; the experts stay packed on disk.
    """
    cls = experts_class(family)
    kwargs: dict[str, object] = {"dtype": dtype}
    if packed is not None:
        from transformers.quantizers.auto import AutoQuantizationConfig

        settings = packed if isinstance(packed, dict) else packed.to_dict()
        kwargs["quantization_config"] = AutoQuantizationConfig.from_dict({**settings, "dequantize": True})
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report would list every expert key as unexpected
    hf_logging.disable_progress_bar()
    try:
        with after_init(cls, _drop_weights):
            # use_safetensors: never fall back to a pickle (pytorch_model.bin) lying beside the safetensors
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=False, use_safetensors=True, output_loading_info=True, **kwargs
            )
            model, info = loaded
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # transformers reports a bad checkpoint as any of many exception types
        raise ModelFormatError(f"cannot load the non-expert weights of {folder}: {exc}".splitlines()[0]) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info["missing_keys"] or info["mismatched_keys"]:
        bad = sorted(info["missing_keys"]) + [k for k, *_ in info["mismatched_keys"]]
        raise ModelFormatError(f"{folder} lacks or has wrong-shaped weights: {', '.join(bad[:5])}")
    model.eval()
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, cls):
            match = _LAYER.search(name + ".")
            parent_name, _, attr = name.rpartition(".")
            assert match and attr, f"unexpected experts module path {name}"
            sites.append(ExpertsSite(int(match.group(1)), name, model.get_submodule(parent_name), module,
                                     getattr(module, _SPECS_ATTR)))
    return model, sites
