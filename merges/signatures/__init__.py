"""Robust weight signatures: robustness as a patch you add to a model's weights and take off again.

    report = layer_report(pre, clean, robust)               # where the robust fine-tune moved
    sig = extract_signature(pre, clean, robust, layers="auto", bits=4)
    save_signature(sig, "noise.rws.safetensors")
    patched = patch(clean, [("noise.rws.safetensors", 1.0), ("blur.rws.safetensors", 0.5)])
    save_patched(patched, "clean+noise+blur")                # records what was added
    as_run = patch(clean, [("noise.rws.safetensors", 2.0), ("blur.rws.safetensors", 2.0)],
                   scaling="authors")                        # (2/2)^2 = 1 x each, as the authors' code
    restored = unpatch(load_space("clean+noise+blur"), [("noise.rws.safetensors", 1.0),
                                                         ("blur.rws.safetensors", 0.5)])

With theta_pre the shared starting point, theta_std fine-tuned on clean data and theta_c
fine-tuned on corruption c, for every kept tensor l (flattened):

    d_c = theta_c(l) - theta_pre(l)          d_s = theta_std(l) - theta_pre(l)
    RWS_c(l) = d_c - (<d_c, d_s> / <d_s, d_s>) d_s          (RWS_c(l) = d_c when d_s = 0)

the part of the robust change orthogonal to the clean change. Patching computes
theta(l) + sum_c k_c RWS_c(l) on the tensors a signature keeps (every other tensor
passes through) and unpatching subtracts the same terms, with k_c = alpha_c (scaling
"linear", the default) or k_c = (alpha_c / n)^2 for n signatures (scaling "authors", what
the authors' model_patching.py adds; see patching.py).

One file per job:

    formula.py      robust_weight_signature: the projection above, one tensor
    report.py       layer_report, layer_summary: where the robust fine-tune moved
    selection.py    select_layers: the shallow layers a signature keeps (all, auto,
                    first:K, a glob or re:REGEX on names)
    quantize.py     2..8-bit uniform or log quantization, packed into uint8 bit streams
    file_format.py  Signature, save_signature, load_signature: one safetensors file
    extract.py      extract_signature: the three models, streamed, to a Signature
    patching.py     patch, unpatch, save_patched and the patch records they keep
    inputs.py       opening the input models and checking that they match

Cai, Zhang & Wang 2023, "Robust Weight Signatures: Gaining Robustness as Easy as Patching
Weights?" (ICML 2023, arXiv:2302.12480).
"""

from weightspace.merges.signatures.extract import extract_signature
from weightspace.merges.signatures.file_format import (
    FORMAT,
    Signature,
    SignatureRef,
    load_signature,
    save_signature,
    signature_size_report,
)
from weightspace.merges.signatures.formula import robust_weight_signature
from weightspace.merges.signatures.inputs import checkpoint_file_bytes
from weightspace.merges.signatures.patching import (
    RECORD_KEY,
    SCALINGS,
    coefficients,
    patch,
    patch_record,
    read_patch_record,
    save_patched,
    unpatch,
)
from weightspace.merges.signatures.quantize import (
    dequantize_tensor,
    pack_bits,
    packed_size,
    quantize_tensor,
    unpack_bits,
)
from weightspace.merges.signatures.report import layer_report, layer_summary
from weightspace.merges.signatures.selection import select_layers

__all__ = [
    "FORMAT",
    "RECORD_KEY",
    "SCALINGS",
    "Signature",
    "SignatureRef",
    "checkpoint_file_bytes",
    "coefficients",
    "dequantize_tensor",
    "extract_signature",
    "layer_report",
    "layer_summary",
    "load_signature",
    "pack_bits",
    "packed_size",
    "patch",
    "patch_record",
    "quantize_tensor",
    "read_patch_record",
    "robust_weight_signature",
    "save_patched",
    "save_signature",
    "select_layers",
    "signature_size_report",
    "unpack_bits",
    "unpatch",
]
