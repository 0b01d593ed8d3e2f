"""The LSTM seed classifier (sc-CNMF's seed cleansing): does a seed's trace hold a transient?

Each trace is cut into z-scored 100-sample windows at 10 Hz
(:func:`somaflow.nn.features.lstm_windows`); the LSTM scores every window and a
seed's verdict is its best window. CNMF's seed finder calls
:func:`seed_transient_probability` when ``cnmf.seeds.classifier`` is
``"lstm"`` (or ``"gmm+lstm"``: both must agree). torch is not imported here.
"""

from __future__ import annotations

import numpy as np

from somaflow.inference import get_backend
from somaflow.nn.features import lstm_windows, stack_windows


def seed_transient_probability(traces: np.ndarray, fps: float, *, weights: str = "default",
                               inference: str = "local") -> np.ndarray:
    """Probability that each trace holds a calcium transient.

    Parameters
    ----------
    traces : ndarray, (seed, frame)
        Seed traces (any units; each window is z-scored).
    fps : float
        Frame rate of the traces (Hz).
    weights : str
        ``"default"`` or an LSTM checkpoint.
    inference : str
        Backend spec (``"local"`` or the service's URL).

    Returns
    -------
    ndarray, (seed,) float32
    """

    traces = np.asarray(traces, np.float32)
    if traces.ndim != 2 or len(traces) == 0:
        return np.zeros(len(traces) if traces.ndim else 0, np.float32)
    windows = stack_windows([lstm_windows(t, 100, fps=fps) for t in traces])
    return get_backend(inference).predict("lstm", weights, windows)
