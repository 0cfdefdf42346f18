"""Manifest generation: the RayService (`rayservice.py`) and the batch RayJob (`rayjob.py`, from
the RayService's cluster and config); `scripts/gen_kuberay.py` writes and checks them all."""
