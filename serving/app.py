"""The Serve application builder: `build_app(args)` (`import_path: serving.app:build_app`).

    proxy -> Ingress (HTTP: serving/http.py) -> MctiClassifier (model, batching, generation)

The deployments are in serving/classifier.py and serving/deployments.py, the batcher they use
in serving/batcher.py, and the local Ray instance `mcti serve` starts in serving/local_ray.py.
"""

from serving.classifier import MctiClassifier
from serving.config import AppConfig, load_config
from serving.deployments import Ingress
from serving.tokensets import token_config


def build_app(args: dict | AppConfig):
    """Serve application builder: `serve run serving.app:build_app tokens=DIR`, or the
    `import_path` of serving/serve_config.yaml. `args` are AppConfig keys; `tokens` among them
    becomes the classifier's initial user_config (a Serve config file sets that user_config
    itself, so that changing the token sets changes no replica)."""
    cfg = load_config(args, need_tokens=False)
    settings = cfg.model_dump(exclude={"tokens"})  # the replicas' constructor args
    opts: dict = dict(
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    )
    if cfg.min_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    if cfg.tokens:
        opts["user_config"] = token_config(cfg.tokens)
    classifier = MctiClassifier.options(**opts).bind(settings)
    # The ingress only awaits the classifier: let it hold far more requests than the classifiers
    # can, so back-pressure happens at the classifier handle (a JSON 503), never at the proxy.
    ingress_capacity = (
        4
        * (cfg.max_replicas or cfg.num_replicas)
        * (cfg.max_ongoing_requests + cfg.max_queued_requests)
    )
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=max(100, ingress_capacity),
        ray_actor_options={"num_cpus": 0},
    ).bind(classifier, settings)
