"""Serving HybridStitch on Triton Inference Server from a model repository (DESIGN §8).

``protocol`` defines the two models' inputs and outputs once; ``batching`` turns Triton requests
into typed generation requests and groups them into engine calls (pure, no Triton needed);
``handlers`` serves a dynamic batch with one outcome per request (no Triton needed either);
``triton_model`` is the Python-backend model, a thin skin over the handlers; ``repository`` writes
the model repository (``hs-export triton-repo``); ``server`` runs it on the ``tritonserver`` binary
of the ``nvidia-pytriton`` wheel (``hs-export serve``); ``client`` and ``bench_serve`` speak the
standard KServe v2 protocol through ``tritonclient``.

Nothing here is imported by ``hs_runtime``; tritonclient and Triton's
``triton_python_backend_utils`` are imported only by the modules that need them.
"""
