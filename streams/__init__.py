"""Stream processing: topics, processors and the Faust worker."""

# What a worker prints when it is ready or cannot start (`streamrec.workers` waits for them).
READY = "streamrec worker ready"
FAILED = "streamrec worker failed to start: "  # followed by the reason, on one line
