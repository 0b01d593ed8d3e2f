"""``python -m somaflow_service [OPTIONS]`` in the service environment: start the inference service.

The options are those of ``somaflow serve`` (which runs this after choosing the environment);
settings not given come from ``SOMAFLOW_SERVE_*`` variables. A container image that is the
service environment can use it as its entry point without somaflow's other dependencies.
"""

import argparse
import os
import sys

from somaflow_service.launch import DESCRIPTION, serve_environment, serve_options
from somaflow_service.server import main

parser = argparse.ArgumentParser(prog="python -m somaflow_service", description=DESCRIPTION)
serve_options(parser)
try:
    os.environ.update(serve_environment(parser.parse_args()))
except Exception as exc:  # a bad --weights pair: one line, as `somaflow serve` says it
    print(f"somaflow serve: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
raise SystemExit(main())
