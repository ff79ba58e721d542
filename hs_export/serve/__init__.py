"""Serving HybridStitch on Triton Inference Server through PyTriton (DESIGN §8).

``protocol`` defines the two models' inputs and outputs once; ``batching`` turns Triton requests
into typed generation requests and groups them into engine calls (pure, no Triton needed);
``server`` binds one runtime per model instance into Triton; ``client`` and ``bench_serve`` speak
the standard KServe v2 protocol through ``tritonclient``.

Nothing here is imported by ``hs_runtime``; PyTriton and tritonclient are imported only by the
modules that need them (``pip install 'hybridstitch[serve]'``).
"""
