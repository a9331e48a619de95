"""python -m bench: the GPU benchmark (bench/sections.py)."""
from bench.sections import main

main()
