#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs of this node in Spark's resource JSON format.
# Referenced by spark.executor.resource.gpu.discoveryScript in the cluster profiles.
set -euo pipefail
ids=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, - || true)
addrs=$(echo "${ids}" | sed -e 's/\([0-9][0-9]*\)/"\1"/g')
echo "{\"name\": \"gpu\", \"addresses\": [${addrs}]}"
