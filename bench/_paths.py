"""Imported first by every benchmark script. Run as `python bench/<script>.py`, the bench/ folder
leads sys.path and bench/lora.py and bench/vision.py would shadow the packages lmq imports: import the
packages with bench/ out of the way, then put bench/ back, last, for the sibling modules."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != HERE]
import lora  # noqa: E402, F401
import vision  # noqa: E402, F401  (bench/vision.py would shadow it the same way)

sys.path.append(HERE)
