"""Pictures and captions: the training folder and its batches, buckets, image cleaning, import into a project,
and the health check."""
