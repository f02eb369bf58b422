"""Import first in a script that times refimpl (NumPy) and PyTorch alternately in one process.

Both libraries keep their idle worker threads spinning for a while after each parallel region
(OpenBLAS: 2**28 cycles; torch's OpenMP: ~200 ms). Run alternately on the same cores, one side's
spinning threads steal the cores the other side is computing on: on 2 cores torch's conv1 went
from 7.3 ms alone to 13.9 ms alternating with refimpl. Short/passive waits remove that (7.6 ms);
refimpl's own times did not change. This must run before numpy and torch are imported;
explicit environment settings win, and ``BENCH_LIBRARY_DEFAULTS=1`` leaves both libraries'
defaults alone (bench/separate_processes.py sets it: a process running one side only has
nothing to disturb, and runs as a user would run it).
"""

import os

if os.environ.get("BENCH_LIBRARY_DEFAULTS") != "1":
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def gpu_setup(torch=None) -> str:
    """Prepare a fair CuPy-vs-torch GPU comparison and describe the device, in one line.

    TF32 is off on both sides: CuPy computes float32 GEMMs in full float32 unless
    ``CUPY_TF32=1`` is set; torch's two TF32 flags are switched off here.
    """
    import cupy

    if torch is not None:
        if not torch.cuda.is_available():
            raise SystemExit("backend cupy: torch sees no CUDA device; PyTorch's CUDA build is needed beside CuPy")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if os.environ.get("CUPY_TF32", "0") != "0":
        raise SystemExit("CUPY_TF32 is set: unset it so that CuPy's float32 GEMMs are full float32, like torch's here")
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    torch_part = "torch absent" if torch is None else (
        f"torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark "
        f"{torch.backends.cudnn.benchmark})")
    return (f"{props['name'].decode()} ({props['totalGlobalMem'] / 2**30:.0f} GiB), CUDA runtime "
            f"{cupy.cuda.runtime.runtimeGetVersion()}, driver {cupy.cuda.runtime.driverGetVersion()}; "
            f"cupy {cupy.__version__}; {torch_part}; TF32 off on both")
