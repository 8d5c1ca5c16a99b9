#!/bin/sh
# One-shot job of the compose stack: train the models and load the features into Redis, once.
# Skipped when the artifacts volume already holds a trained version (FORCE_TRAIN=1 retrains);
# extra arguments go to `streamrec train` (e.g. --data /path/to/recbole-dir).
set -eu
current="${STREAMREC_ARTIFACT_DIR:?}/current/manifest.json"
if [ -f "$current" ] && [ "${FORCE_TRAIN:-0}" != "1" ]; then
    echo "artifacts present ($current): not retraining (set FORCE_TRAIN=1 to retrain)"
    exit 0
fi
exec streamrec train "$@"
