"""Ray Serve application for MC-TI classification: HTTP ingress + batched classifier deployment.

`serving.app:build_app` is the Serve application builder; `mcti serve` (mcti/cli/serve.py) runs it
on a local Ray instance started by serving/local_ray.py; serving/serve_config.yaml is the same
application as a Serve config file. The classifier deployment is in serving/classifier.py, the
ingress in serving/deployments.py (its HTTP parsing and errors in serving/http.py), the batcher
in serving/batcher.py (plain Python), and the served token sets (the classifier's user_config,
swapped on running replicas) in serving/tokensets.py.
"""
