"""Ray Serve application for MC-TI classification: HTTP ingress + batched classifier deployment.

`serving.app:build_app` is the Serve application builder; `mcti serve` (mcti/cli/serve.py) runs it
locally; serving/serve_config.yaml is the same application as a Serve config file.
"""
