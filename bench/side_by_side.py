"""Import first in a script that times refimpl (NumPy) and PyTorch alternately in one process.

Both libraries keep their idle worker threads spinning for a while after each parallel region
(OpenBLAS: 2**28 cycles; torch's OpenMP: ~200 ms). Run alternately on the same cores, one side's
spinning threads steal the cores the other side is computing on: on 2 cores torch's conv1 went
from 7.3 ms alone to 13.9 ms alternating with refimpl. Short/passive waits remove that (7.6 ms);
refimpl's own times did not change. This must run before numpy and torch are imported;
explicit environment settings win.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
