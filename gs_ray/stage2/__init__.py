"""Stage II: per-sample gradients streamed into the GradientSpace clusterer.

``plan`` (which batch when), ``computer`` (gradients of a batch), ``host`` (the clusterer and
its position: what the centroid actor hosts), ``transports`` (how gradients reach the host),
``worker`` (the gradient actor), ``executors`` (one process, or Ray), ``collective`` (the
replicated transport's own Ray loop), ``launch`` and ``group`` (starting the Ray actors, and the
gradient workers as one ``WorkerGroup``), ``phase_end`` (the end of a pass, for every executor),
``result`` (what Stage II returns, whichever executor ran it), ``consumers`` (other readers of
the same gradient stream) and ``stage`` (Stage II inside the pipeline).
"""

from gs_ray.stage2.computer import GradientBatch, GradientComputer, NonFiniteGradientError
from gs_ray.stage2.consumers import ConsumerSet, GradientConsumer, StreamBatch
from gs_ray.stage2.executors import run_stage2_local, run_stage2_ray
from gs_ray.stage2.host import CentroidHost
from gs_ray.stage2.launch import make_clusterer
from gs_ray.stage2.plan import Stage2Plan
from gs_ray.stage2.result import Stage2Result

__all__ = [
    "CentroidHost",
    "ConsumerSet",
    "GradientBatch",
    "GradientComputer",
    "GradientConsumer",
    "NonFiniteGradientError",
    "Stage2Plan",
    "StreamBatch",
    "Stage2Result",
    "make_clusterer",
    "run_stage2_local",
    "run_stage2_ray",
]
