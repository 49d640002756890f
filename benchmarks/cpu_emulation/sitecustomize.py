"""Run this Python process as on an older x86 CPU (benchmark-only).

Imported by Python at start-up when this directory is on ``PYTHONPATH``
(``throughput_sweep.py --emulate-cpu`` puts it there for its engine
processes, whose children inherit it): ``KVC_EMULATE_CPU`` = ``avx2`` or
``avx512`` (``emulate_cpu.py``).  The rest comes from the environment the
sweep sets beside it: ``ATEN_CPU_CAPABILITY`` (torch's own kernels),
``ONEDNN_MAX_CPU_ISA`` (its matmuls) and ``KVCOMPRESS_CPU_ISA`` (the
plugin's kernels).
"""

import os

if os.environ.get("KVC_EMULATE_CPU"):
    from emulate_cpu import emulate

    emulate(os.environ["KVC_EMULATE_CPU"])
