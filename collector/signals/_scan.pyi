# Type stub for the compiled reader (collector/signals/_scan.c);
# collector/signals/scan.py documents the tuples.
from typing import Any

class Scanner:
    def __init__(self, known: dict[str, int], aliases: dict[str, int], n_slots: int,
                 max_depth: int, empty: object, nested: object) -> None: ...
    def scan(self, wire: bytes) -> list[Any]: ...
