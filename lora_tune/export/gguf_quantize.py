"""K-quants (q4_k_m and friends) through llama.cpp's own quantizer, called in-process via llama-cpp-python.

The Python converter writes f16/bf16/q8_0 itself; the k-quant formats exist only in llama.cpp's C code, so those
exports convert to f16 first and quantize that file here. llama-cpp-python is an optional install (it compiles
llama.cpp); without it the export says in one line what to install.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from lora_tune.export.errors import ExportError

# --quant name -> llama.cpp's llama_ftype (llama.h: LLAMA_FTYPE_MOSTLY_*)
K_QUANTS = {
    "q2_k": 10,
    "q3_k_m": 12,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
INSTALL_HINT = "pip install 'lora-tune[llama-cpp]' (compiles llama.cpp), or `make llama-cpp` in a checkout"


def llama_cpp_module():  # noqa: ANN201 - the llama_cpp module, imported lazily (a compiled, optional package)
    """llama_cpp, or one line saying how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(f"this needs llama.cpp's Python binding (llama-cpp-python): {INSTALL_HINT}") from exc
    return llama_cpp


def quantize(source: Path, target: Path, quant: str) -> None:
    """Write `target` as `source` quantized to `quant`; `target` is removed again if llama.cpp fails."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        target.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's quantizer failed ({quant}, status {status}) on {source}")
