"""Reading pickles that hold plain data only (the Revisited Oxford/Paris ground truth ``gnd_<name>.pkl``): dicts,
lists, tuples, strings, numbers and numpy arrays load; anything that would import other code is refused, naming it."""

from __future__ import annotations

import io
import pickle
from typing import Any

# What numpy arrays need to rebuild themselves (numpy 1.x and 2.x module names; protocol 2 stores their bytes through
# codecs.encode, which only turns a string into bytes); builtins need nothing.
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than plain data or numpy arrays."""


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, name: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (revisitop's) keep their byte strings readable
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self.name}: refused to load {module}.{name} (only plain data and numpy arrays)")


def load_plain_pickle(data: bytes, name: str = "pickle") -> Any:
    """Unpickle ``data`` if it holds only plain data and numpy arrays.

    Raises:
        UnsafePickleError: naming the class the pickle asked for.
    """
    return _PlainDataUnpickler(io.BytesIO(data), name).load()
