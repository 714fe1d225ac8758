# Optional dependency, not installed where the type check runs (CPU CI): every name is Any (pyrightconfig.json).
from typing import Any

def __getattr__(name: str) -> Any: ...
