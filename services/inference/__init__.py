"""somaflow's CNN inference service: the registered models of :mod:`somaflow.nn` served by NVIDIA
Triton Inference Server (started through ``nvidia-pytriton``), over the Open Inference Protocol.

* :mod:`~somaflow_service.settings` — every setting, from ``SOMAFLOW_SERVE_*`` environment variables;
* :mod:`~somaflow_service.repository` — writes the Triton model repository (one Python-backend model
  per served network, with dynamic batching, one instance per GPU or on the CPU);
* :mod:`~somaflow_service.backend` — the Python-backend model: checks every request against the
  model's signature (:mod:`somaflow.nn.signatures`), batches, runs the network;
* :mod:`~somaflow_service.server` — starts Triton and serves until stopped (``python -m somaflow_service``);
* :mod:`~somaflow_service.launch` — used by ``somaflow serve`` from somaflow's own environment:
  finds or creates the service's environment and starts the server in it.

Only ``launch`` runs in somaflow's main environment; the rest runs in the service's own
(numpy < 2, nvidia-pytriton, torch).
"""
