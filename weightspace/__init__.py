"""weightspace: a model-merging and weight-space toolbox.

    from weightspace import load_space
    base, ft = load_space("./base"), load_space("./ft")
    (base + (ft - base) * 0.5).save("./halfway")      # streamed, tensor by tensor
"""

from weightspace.errors import InputError, NonFiniteError, SpecError, WeightspaceError
from weightspace.ir import ExprRef, MemoryRef, SafetensorsRef, TensorRef, WeightSpace, task_vector
from weightspace.sources import load_space
from weightspace.structure import LayerName, Structure, parse_layer, structure_of

__version__ = "0.1.0"

__all__ = [
    "ExprRef",
    "InputError",
    "LayerName",
    "MemoryRef",
    "NonFiniteError",
    "SafetensorsRef",
    "SpecError",
    "Structure",
    "TensorRef",
    "WeightSpace",
    "WeightspaceError",
    "__version__",
    "load_space",
    "parse_layer",
    "structure_of",
    "task_vector",
]
