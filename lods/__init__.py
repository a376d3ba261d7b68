"""LODS Studio: score-distillation text-to-3D with learned denoising scores."""

import os

# On a busy CPU, OpenMP threads that spin while waiting slow every torch op down by orders of magnitude;
# passive waiting costs nothing when the machine is idle. Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
