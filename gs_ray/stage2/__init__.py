"""Stage II: per-sample gradients streamed into the GradientSpace clusterer.

``plan`` (which batch when), ``computer`` (gradients of a batch; ``batch``: a batch of them as
it travels, NumPy only), ``host`` (the clusterer and
its position: what the centroid actor hosts), ``transports`` (how gradients reach the host),
``worker`` (the gradient actor), ``executors`` (one process, or Ray), ``collective`` (the
replicated transport's own Ray loop), ``launch`` and ``group`` (starting the Ray actors, and the
gradient workers as one ``WorkerGroup``), ``phase_end`` (the end of a pass, for every executor),
``result`` (what Stage II returns, whichever executor ran it), ``consumers`` (other readers of
the same gradient stream) and ``stage`` (Stage II inside the pipeline).
"""

# The names below are loaded when first used (PEP 562), not when the package is imported: the
# centroid actor's process imports gs_ray.stage2.host, which needs NumPy and scikit-learn only,
# and importing the gradient computer here would cost it torch, transformers and peft (about
# 4 s of CPU per actor start-up).
_WHERE = {
    "GradientBatch": "batch",
    "GradientComputer": "computer",
    "NonFiniteGradientError": "batch",
    "ConsumerSet": "consumers",
    "GradientConsumer": "consumers",
    "StreamBatch": "consumers",
    "run_stage2_local": "executors",
    "run_stage2_ray": "executors",
    "CentroidHost": "host",
    "make_clusterer": "launch",
    "Stage2Plan": "plan",
    "Stage2Result": "result",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
