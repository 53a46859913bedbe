"""What the service exports at /metrics (Prometheus text format, prometheus-client).

Each app gets its own registry, so that several apps in one process (the tests) never
share or clash over series. Routes are labelled by the app's own paths; any other path
is "other", so a client cannot grow the number of series by inventing URLs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the /metrics route

from ..classes import CLASSES

ROUTES = frozenset({"/", "/api/health", "/api/model", "/api/predict", "/api/explain", "/livez", "/readyz",
                    "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# A CPU answer takes 0.1-2 s an image; the buckets reach a 16-image request on a busy machine.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGES = ("decode", "queue", "inference")


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mask_service_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("mask_service_request_duration_seconds", "Time from a request's start to the "
                                 "end of its answer, by route", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("mask_service_stage_seconds", "Time a prediction request spent decoding its "
                               "images, waiting for the model and in inference", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.queue_images = Gauge("mask_service_queue_images", "Images (and explanations) waiting for the model",
                                  registry=r)
        self.requests_admitted = Gauge("mask_service_requests_admitted", "Requests admitted: decoding, waiting "
                                       "for or in inference (at most --queue-size)", registry=r)
        self.pixels_held = Gauge("mask_service_decoded_pixels", "Decoded pixels held by requests in flight",
                                 registry=r)
        self.images = Counter("mask_service_images", "Images answered", registry=r)
        self.faces = Counter("mask_service_faces", "Faces counted at each request's threshold, by class",
                             ["class"], registry=r)
        self.batch_images = Histogram("mask_service_batch_images", "Images per forward pass",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        for name in CLASSES:
            self.faces.labels(name)  # every class from the start, at 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
