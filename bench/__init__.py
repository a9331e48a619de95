"""Benchmarks: how fast the step and its kernels run, and how much work they do
(python -m bench --help).

    sections.py   the command (`python -m bench`): attention kernels, training steps, evaluation,
                  work, tuning
    steps.py      whole training steps timed, SFT against FocuSFT on the same batches, and their
                  matmul work (`--sections training`, `--sections work`)
    kernels.py    attention kernels under the hybrid and causal masks, their tile options
                  (`--sections tune`)
    flops.py      FLOPs a mask allows and the matmul work of a step, counted, not timed
                  (no GPU needed)
"""
