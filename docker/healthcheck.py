"""Container health check of the somaflow images (HEALTHCHECK; stdlib only, no curl needed).

GET ``$SOMAFLOW_HEALTHCHECK_URL`` (the service's own health endpoint: Dask's ``/health``,
Triton's ``/v2/health/ready``, the Prefect worker's ``/health``) and exit 0 on a 2xx answer
within 4 s, 1 otherwise. Without the variable (a one-shot command such as ``somaflow
archive``) the container is healthy while its interpreter can import somaflow.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = os.environ.get("SOMAFLOW_HEALTHCHECK_URL", "")
    if not url:
        try:
            import somaflow  # noqa: F401
        except ImportError as exc:
            print(f"unhealthy: cannot import somaflow: {exc}", file=sys.stderr)
            return 1
        return 0
    if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
        print(f"unhealthy: SOMAFLOW_HEALTHCHECK_URL must be a loopback URL, not {url}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (loopback only)
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
