"""``python -m somaflow_service``: start the inference service with the settings in the environment."""

from somaflow_service.server import main

raise SystemExit(main())
