"""Reading a model folder: configs, headers, expert bytes, the skeleton, quantised formats.

The public face `models/` may use.
"""

from expertswap.engine.weights.checkpoint import Checkpoint, read_config
from expertswap.engine.weights.families import Family
from expertswap.engine.weights.quantize import native_packing, quantized_nbytes

__all__ = ["Checkpoint", "Family", "native_packing", "quantized_nbytes", "read_config"]
