"""Print the commit a Prefect deployment pins its flow runs to, or stop the deploy.

`prefect deploy` runs this as a build step (infra/prefect/prefect.yaml) and writes what it prints
into the deployment's git_clone pull step, so every flow run clones that exact commit, never
whatever a branch points to when the run starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# SHA-1 (40) or SHA-256 (64) object names; a short or symbolic ref could move.
FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def pinned_commit(environ: Mapping[str, str]) -> str:
    """MMOPS_GIT_COMMIT as a full commit SHA; SystemExit naming the variable otherwise."""
    commit = environ.get("MMOPS_GIT_COMMIT", "").strip().lower()
    if not FULL_SHA.fullmatch(commit):
        raise SystemExit(
            "MMOPS_GIT_COMMIT must be the full SHA of a pushed commit to deploy "
            f"(MMOPS_GIT_COMMIT=$(git rev-parse HEAD), or the image's GIT_COMMIT); got {commit!r}"
        )
    return commit


if __name__ == "__main__":
    print(pinned_commit(os.environ))
