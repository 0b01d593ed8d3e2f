"""somaflow: calcium-imaging movies in, neurons out."""

__version__ = "0.1.0"
