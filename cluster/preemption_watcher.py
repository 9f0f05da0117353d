"""Turn a cloud's spot/preemption notice into Ray's drain of this node (started by worker_start_ray_commands).

Ray Train reacts to drains, not to cloud metadata: when this node is drained with reason PREEMPTION and a
deadline, ``ray.train.get_preemption_info()`` reports it on every rank, dyrep-ray's loop finishes the step in
flight, rank 0 writes a mid-epoch checkpoint, every rank reports it, and Ray restarts the run from it once
the node is gone (cluster/README.md, "Preemption").  The cloud gives the notice; this script forwards it:

    python preemption_watcher.py aws    # EC2 spot: IMDSv2 spot/instance-action (2-minute notice)
    python preemption_watcher.py gcp    # GCE spot/preemptible: instance/preempted (30-second notice)

It exits at once on a node that is not spot/preemptible, and after draining.  Standard library only.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

POLL_S = 5.0
HTTP_TIMEOUT_S = 2.0
AWS_IMDS = "http://169.254.169.254/latest"
AWS_NOTICE_S = 120  # EC2 reclaims a spot instance two minutes after the notice
GCP_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance"
GCP_NOTICE_S = 30  # GCE gives preemptible/spot VMs 30 seconds
DEADLINE_MARGIN_S = 5  # the drain deadline is set this much before the cloud's, to be on the safe side

logger = logging.getLogger("preemption_watcher")


def _get(url: str, headers: dict, method: str = "GET") -> str | None:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # "no notice yet" on EC2
            return None
        raise


def _aws_headers() -> dict:
    session = _get(f"{AWS_IMDS}/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, method="PUT")
    return {"X-aws-ec2-metadata-token": session or ""}


def aws_seconds_left() -> float | None:
    """Seconds until the reclaim when EC2 has sent a spot interruption notice, else None."""
    notice = _get(f"{AWS_IMDS}/meta-data/spot/instance-action", _aws_headers())
    if not notice:
        return None
    when = json.loads(notice).get("time")
    if not when:
        return AWS_NOTICE_S
    reclaim = datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return max((reclaim - datetime.now(timezone.utc)).total_seconds(), 0.0)


def aws_is_spot() -> bool:
    return _get(f"{AWS_IMDS}/meta-data/instance-life-cycle", _aws_headers()) == "spot"


def gcp_seconds_left() -> float | None:
    preempted = _get(f"{GCP_METADATA}/preempted", {"Metadata-Flavor": "Google"})
    return GCP_NOTICE_S if (preempted or "").strip().upper() == "TRUE" else None


def gcp_is_spot() -> bool:
    return (_get(f"{GCP_METADATA}/scheduling/preemptible", {"Metadata-Flavor": "Google"}) or "").strip() == "TRUE"


CLOUDS = {"aws": (aws_is_spot, aws_seconds_left), "gcp": (gcp_is_spot, gcp_seconds_left)}


def drain_this_node(seconds_left: float) -> int:
    deadline = max(int(seconds_left) - DEADLINE_MARGIN_S, 1)
    return subprocess.run(["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                           "--reason-message", "spot/preemptible reclaim notice",
                           "--deadline-remaining-seconds", str(deadline)], check=False).returncode


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(argv) != 1 or argv[0] not in CLOUDS:
        logger.error("usage: preemption_watcher.py {%s}", "|".join(CLOUDS))
        return 2
    is_spot, seconds_left = CLOUDS[argv[0]]
    try:
        if not is_spot():
            logger.info("not a spot/preemptible instance: nothing to watch")
            return 0
    except (OSError, urllib.error.URLError) as exc:
        logger.error("instance metadata unreachable (%s): not watching", exc)
        return 1
    while True:
        try:
            left = seconds_left()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            logger.warning("metadata poll failed (%s); retrying", exc)
            left = None
        if left is not None:
            logger.warning("reclaim notice: %.0f s left; draining this Ray node", left)
            return drain_this_node(left)
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
