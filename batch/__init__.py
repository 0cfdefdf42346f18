"""Batch classification of an archive on Ray (`python -m batch.classify`; on KubeRay the RayJob
in cluster/kuberay/rayjob-classify.yaml): the driver plans shards and resumes (`classify.py`),
each worker runs the service's engine and classification encoder on its shards and writes them
(`worker.py`), reading and writing inputs and outputs on any filesystem (`dataio.py`)."""
